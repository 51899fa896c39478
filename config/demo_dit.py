# Stage 2 on the synthetic world's tokens, sized for `make demo` on a 2-core CPU: the same DiT code path with a
# small preset and four flags that make the trajectory steer the samples (docs/results.md, "Stage 2 recipes"):
# - trajectory_map: the ego path also enters as a per-cell map of first-frame coordinates (model/trajectory_map.py);
# - static_warp='gated': each predicted latent step after the first is mixed, by a learned per-cell gate, with the
#   step before moved by the ego motion, so a static world follows the trajectory; a forecast starts from the warped
#   copy of its context. 'hard' (the moved step taken as it is) turned less: the latent of a rotated scene is not
#   the rotated latent (the tokenizer's features depend on orientation), so hard-warped steps decode poorly;
# - v-prediction with Min-SNR-5 loss weighting instead of eps-prediction;
# - 10 x 10 latent cells per token (4 x 10 x 10 = 400 tokens of width 256): 1.4 s a step against 2.2 s for 1,600
#   tokens of width 128, and the same loss per step in our runs.
# A larger learning rate and a short EMA (at 0.9999 the EMA of a few hundred steps is still the initial network).
_base_ = ['./train_dit.py']

model = 'DiT-demo'               # depth 4, 4 heads; width 256 below
model_overrides = dict(patch_size=10, hidden_size=256)   # the demo tokenizer's 4 x 100 x 100 latent -> 400 tokens
diffusion = dict(prediction_type='v_prediction', min_snr_gamma=5.0)
trajectory_map = True
static_warp = 'gated'
lr = 6e-4
global_batch_size = 8
max_steps = 250
ema_decay = 0.99
known_prefix = dict(enabled=True, prob=0.5)    # one checkpoint for generation and forecasting (docs/evaluation.md)
num_workers = 1
log_every = 25
ckpt_every = 125
results_dir = 'out/demo/results'
