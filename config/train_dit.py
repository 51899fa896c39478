# Stage 2: the trajectory-conditioned DiT (upstream's train_2.py and models.py). train_2.py's upstream flags (--model,
# --global-batch-size, --epochs, ...) override the matching keys; --cfg-options overrides any key.
# The latent shape and the condition length come from the token dir's meta.json, not from here.
model = 'DiT-XL/2'               # upstream's network under that name: width 256, depth 28, 16 heads (36.8 M)
model_overrides = dict()         # preset keys to replace, e.g. dict(depth=2, hidden_size=64, num_heads=4), and
                                 # patch_size (latent cells per token side; 1 = upstream, model/dit.py)
class_dropout_prob = 0.1         # condition dropout to a learned null embedding (0.0 = upstream: no CFG possible)
# forecasting / rollouts (model/dit.py): the DiT also takes known latent time steps (C + 1 extra input channels);
# each training sample knows a prefix of 1 .. T'-1 latent steps with probability prob, none otherwise, and the
# loss covers the unknown steps only. Off = upstream's network (36,819,200 parameters). Needs latent T' >= 2.
known_prefix = dict(enabled=False, prob=0.5)
condition = 'traj_xy'            # 'traj_xy' (paper), 'command' (upstream code), 'delta_xy'
latent_scaling = 'standardize'   # per-channel mean/std from meta.json; 'upstream' = x * 0.1
# linear betas and eps-prediction, as DiT / IDDPM. Not upstream (model/diffusion.py): prediction_type
# 'v_prediction' or 'sample' (x0), min_snr_gamma (Min-SNR loss weighting, e.g. 5.0); the samplers read both
diffusion = dict(num_timesteps=1000, beta_start=1e-4, beta_end=0.02, prediction_type='epsilon', min_snr_gamma=None)
trajectory_map = False           # also give the DiT the trajectory as a per-cell map (model/trajectory_map.py)
static_warp = False              # 'hard' / 'gated': each predicted latent step after the first is the step before moved
                                 # by the ego motion where in view (model/dit.py)

lr = 1e-5                        # AdamW, constant
weight_decay = 0.0               # upstream code (the paper says 0.01)
global_batch_size = 16           # 2 per GPU on 8 GPUs: processes x per-process micro-batch x grad_accum_steps
grad_accum_steps = 1             # micro-batches per optimiser step (1 = upstream); steps count optimiser steps
bf16 = False                     # bf16 autocast of the forward passes; weights, AdamW, EMA, checkpoints stay fp32
epochs = 60000                   # upstream default; --max-steps stops earlier
max_steps = 0                    # 0 = no step limit
ema_decay = 0.9999
global_seed = 0
num_workers = 4
compile = False                  # torch.compile the DiT in place (2-core CPU: 84-101 s first step, then eager +-5 %)
log_every = 100
ckpt_every = 10000
results_dir = 'results'
