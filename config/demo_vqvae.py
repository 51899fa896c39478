# Stage 1 on the synthetic world, sized to train on a 2-core CPU inside `make demo`. Same code path and layer
# layout as config/train_vqvae.py, but x4 compression in T (x8 in H, W: an 8-frame clip becomes 2 x 25 x 25 tokens,
# so the DiT can be told the first 4 frames and forecast the rest), 64 hidden channels and one residual block,
# trained on random 64 x 64 windows of the grid (evaluated on the full grid), with the codebook flags on: at this
# size the faithful codebook collapsed to 2 codes in our runs.
_base_ = ['./train_vqvae.py']

data_root = 'data/synthetic/'     # written by `python -m dataset.synthetic --out data/synthetic`
num_frames = 8
dataset = dict(
    train_pkl=data_root + 'nuscenes_infos_train_temporal_v3_scene.pkl',
    val_pkl=data_root + 'nuscenes_infos_val_temporal_v3_scene.pkl',
    common=dict(gts_root=data_root + 'nuscenes/gts', num_frames=num_frames),
    train=dict(times=17),         # 12 train scenes x 17 random windows = 204 steps per epoch
    val=dict(stride=8),
)
# A 64 x 64 window gives 2 x 8 x 8 = 128 latents per step for 512 codes: 0.25 uses per code and step on average.
# The restart threshold must sit well below that (at 1.0 most codes were restarted on every step).
model = dict(hidden_channels=64, num_res_blocks=1, downsample=(4, 8, 8), codebook_ema=True,
             dead_code_threshold=0.05)
train_crop = (64, 64)
optimizer = dict(lr=2e-3)
scheduler = dict(warmup_iters=20)
max_epochs = 1
num_workers = 1
print_freq = 20
