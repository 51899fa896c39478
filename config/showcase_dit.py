# Stage 2 of `make showcase`: the demo's DiT recipe (config/demo_dit.py) trained longer on the counterfactual
# showcase world's tokens (every start driven straight, left and right).
_base_ = ['./demo_dit.py']

max_steps = 700
log_every = 50
ckpt_every = 350
results_dir = 'out/showcase/results'
