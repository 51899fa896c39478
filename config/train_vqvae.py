# Stage 1: the 4D VQ-VAE tokenizer, faithful to upstream OccSora's config/train_vqvae.py
# (wzzheng/OccSora@9f8d1f0).
# 32 x 200 x 200 x 16 voxels, 18 classes -> 128 x 4 x 25 x 25 latent, 512 codes; 137,369,744 parameters.
_base_ = ['./_base_/occ3d_nuscenes.py']

# keyword arguments of model.tokenizer.OccTokenizer
model = dict(
    num_classes=18,              # class table 18 x 8, tied to the output classifier
    class_embed_dim=8,
    grid_height=16,              # the height axis is folded into 16 * 8 = 128 channels
    hidden_channels=512,
    num_res_blocks=4,            # residual blocks with axial attention, in the encoder and the decoder
    attention_heads=2,
    downsample=(8, 8, 8),        # (T, H, W) factors: three stride-2 convs
    latent_channels=128,
    codebook_size=512,
    codebook_weight=1.0,
    commitment_weight=1.0,
    codebook_ema=False,          # improvement flag: EMA codebook updates
    ema_decay=0.99,
    dead_code_threshold=0.0,     # improvement flag: > 0 restarts codes used less than this (EMA count)
    activation_checkpointing=False,   # memory flag: recompute residual blocks in the backward pass
    latent_type='vq',            # improvement flag: 'gaussian' = continuous latents with a KL term (no codebook)
    kl_weight=1e-3,              # weight of the mean KL per latent element ('gaussian' only)
)
# total loss = 10 CE + 1 Lovasz-softmax + 1 VQ (upstream's MultiLoss weights)
loss = dict(ce_weight=10.0, lovasz_weight=1.0, vq_weight=1.0)
camera_mask_loss = False         # improvement flag: CE and Lovasz only on camera-visible voxels
class_weight_power = 0.0         # improvement flag: > 0 weights CE by (max_count / count_c) ** power (DynamicCity: 1/3)

optimizer = dict(lr=1e-3, weight_decay=0.01, betas=(0.9, 0.999))      # AdamW
# timm CosineLRScheduler per iteration: 200-iteration linear warm-up from 1e-6, cosine down to 1e-6
scheduler = dict(warmup_iters=200, warmup_lr=1e-6, min_lr=1e-6)
max_epochs = 200
grad_max_norm = 35
batch_size = 1                   # per process (upstream: 1 per GPU on 8 GPUs)
num_workers = 1
sync_bn = True                   # BatchNorm -> SyncBatchNorm under DDP, as upstream
bf16 = False                     # bf16 autocast
compile = False                  # torch.compile encoder and decoder (about 5 % faster on CPU after a 45 s compile)
train_crop = None                # speed flag: train on random (X, Y) windows, e.g. (64, 64); evaluate on the full grid
seed = 42

print_freq = 10
eval_every_epochs = 1
val_every_steps = 0              # > 0: also validate every this many steps (the learning curve in metrics.jsonl)
metric_mode = 'exclude_absent'   # or 'upstream': a class absent from the ground truth scores IoU 1
metric_camera_mask = False       # evaluate only camera-visible voxels
