# Stage 1 on the synthetic world, sized to train on a 2-core CPU inside `make demo` (at most 6 minutes). Same code
# path and layer layout as config/train_vqvae.py, with three flags on and a smaller network:
# - x2 compression on every axis (an 8-frame clip becomes a 4 x 100 x 100 latent, so the DiT can be told the first
#   frames and forecast the rest): at x4 in H and W the decoder predicts the class prior for its first few hundred
#   steps (docs/results.md, "Stage 1 recipes");
# - continuous latents (latent_type='gaussian', a small KL term) instead of the 512-code VQ: faster from the start
#   and better at every validation of the same schedule;
# - class-balanced cross-entropy (weights (max_count / count_c)^(1/3) from the train split, as DynamicCity) and a
#   Lovasz weight of 3 instead of 1 (10 CE + 3 Lovasz): each raised the small classes' IoU in our runs;
# - 64 hidden channels, one residual block, 16 latent channels, random 64 x 64 training windows (evaluated on the
#   full grid).
_base_ = ['./train_vqvae.py']

data_root = 'data/synthetic/'     # written by `python -m dataset.synthetic --out data/synthetic`
num_frames = 8
dataset = dict(
    train_pkl=data_root + 'nuscenes_infos_train_temporal_v3_scene.pkl',
    val_pkl=data_root + 'nuscenes_infos_val_temporal_v3_scene.pkl',
    common=dict(gts_root=data_root + 'nuscenes/gts', num_frames=num_frames),
    train=dict(times=68),         # 12 train scenes x 68 random windows = 816 steps per epoch (0.4 s each)
    val=dict(stride=8),
)
model = dict(hidden_channels=64, num_res_blocks=1, downsample=(2, 2, 2), latent_channels=16,
             latent_type='gaussian', kl_weight=1e-3)
class_weight_power = 1 / 3
loss = dict(lovasz_weight=3.0)
train_crop = (64, 64)
optimizer = dict(lr=2e-3)
scheduler = dict(warmup_iters=20)
max_epochs = 1
num_workers = 1
print_freq = 20
