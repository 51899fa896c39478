# Stage 2 on the synthetic world's tokens, sized for `make demo` on a 2-core CPU: the same DiT code path with a
# small preset, 5 x 5 latent cells per token, a larger learning rate and a short EMA (at 0.9999 the EMA of a few
# hundred steps is still the initial network).
_base_ = ['./train_dit.py']

model = 'DiT-demo'               # width 128, depth 4, 4 heads
model_overrides = dict(patch_size=5)   # the demo tokenizer's 4 x 100 x 100 latent -> 4 x 20 x 20 = 1,600 tokens
lr = 6e-4
global_batch_size = 8
max_steps = 100                  # a step costs 1.6x the 1,250-token one (3.2 s against 2.0 s, one thread, batch 8)
ema_decay = 0.99
known_prefix = dict(enabled=True, prob=0.5)    # one checkpoint for generation and forecasting (docs/evaluation.md)
num_workers = 1
log_every = 20
ckpt_every = 50
results_dir = 'out/demo/results'
