# Stage 1 on the synthetic world, sized to train on a 2-core CPU inside `make demo`. Same code path and
# architecture as config/train_vqvae.py, narrower: 8-frame clips (4 s), a 2-wide class embedding, 32 hidden
# channels and one residual block; x8 compression in T, H, W as upstream, so a clip is 1 x 25 x 25 tokens.
_base_ = ['./train_vqvae.py']

data_root = 'data/synthetic/'     # written by `python -m dataset.synthetic --out data/synthetic`
num_frames = 8
dataset = dict(
    train_pkl=data_root + 'nuscenes_infos_train_temporal_v3_scene.pkl',
    val_pkl=data_root + 'nuscenes_infos_val_temporal_v3_scene.pkl',
    common=dict(gts_root=data_root + 'nuscenes/gts', num_frames=num_frames),
    train=dict(times=8),
    val=dict(stride=8),
)
model = dict(class_embed_dim=2, hidden_channels=32, num_res_blocks=1)
# Lovasz-softmax sorts every voxel once per class: about 2 s of a CPU step here, so the demo leaves it out.
loss = dict(lovasz_weight=0.0)
scheduler = dict(warmup_iters=20)
max_epochs = 4
num_workers = 1
print_freq = 10
