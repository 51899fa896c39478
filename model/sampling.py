"""Sampling latents from a trained DiT through diffusers' schedulers (DESIGN §6-§7).

Three samplers, all built on exactly the betas GaussianDiffusion trains with and on eps-prediction:
- 'ddpm': ancestral sampling with IDDPM's learned-range variance (what upstream samples with, 1000 steps by
  default). Fewer steps respace the chain like IDDPM: evenly spaced steps including t = T-1 and t = 0
  ('linspace'), betas recomputed from alpha_bar between kept steps (diffusers does this internally).
- 'ddim': deterministic DDIM (Song et al. 2021, eta = 0) on IDDPM's "ddimN" steps t = 0, k, 2k, ... with
  k = T // N ('leading' spacing: diffusers' DDIM steps by the fixed stride k, which only 'leading' spacing
  matches for every N). ``set_alpha_to_one=True`` makes the last update land on alpha_bar = 1, i.e. return
  the predicted x0 (DDIM's alpha_0 := 1) instead of a sample still carrying the t = 0 noise level.
- 'dpm-solver': DPM-Solver++ (Lu et al. 2022), 2nd-order multistep, final sigma 0 (returns clean x0).

The model callable returns eps || v (B, 2C, ...). DDPM consumes both halves (the variance half is v); DDIM and
DPM-Solver get only the eps half. diffusers' DPM-Solver would strip a variance half by slicing 3 channels, so
the split is done here.
"""
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor
from tqdm import tqdm

from model.diffusion import linear_betas

SCHEDULERS = ('ddpm', 'ddim', 'dpm-solver')


def make_scheduler(name, num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02):
    """A diffusers scheduler for sampler ``name`` (one of SCHEDULERS) on GaussianDiffusion's betas.

    The betas are passed explicitly (``trained_betas``) from model.diffusion.linear_betas, so that sampling and
    training share one schedule, including its 1000 / num_train_timesteps scaling (diffusers stores them
    in float32).
    """
    if name not in SCHEDULERS:
        raise ValueError(f'unknown sampler {name!r}; choose one of {SCHEDULERS}')
    common = dict(num_train_timesteps=num_train_timesteps, prediction_type='epsilon',
                  trained_betas=linear_betas(num_train_timesteps, beta_start, beta_end).tolist())
    if name == 'ddpm':
        return DDPMScheduler(**common, variance_type='learned_range', clip_sample=False, timestep_spacing='linspace')
    if name == 'ddim':
        return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=True, timestep_spacing='leading')
    return DPMSolverMultistepScheduler(**common, algorithm_type='dpmsolver++', solver_order=2,
                                       final_sigmas_type='zero', timestep_spacing='linspace')


@torch.no_grad()
def sample_latents(model_fn, shape, scheduler_name, num_steps, generator=None, device='cpu', progress=True,
                   schedule=None):
    """Draw latents by running a sampler from pure noise.

    Args:
        model_fn: callable (x (B, C, ...), t (B,) long) -> (B, 2C, ...) eps || v, e.g. the DiT's forward with the
            trajectory bound, or ``forward_with_cfg`` for guidance.
        shape: (B, C, T', H', W') of the latents to draw.
        scheduler_name: one of SCHEDULERS.
        num_steps: number of sampling steps, 1 .. num_timesteps.
        generator: torch.Generator for the initial noise and DDPM's per-step noise (reproducible sampling).
        device: where the latents live.
        progress: show a tqdm bar over the steps.
        schedule: the training diffusion's keyword arguments (GaussianDiffusion's num_timesteps, beta_start,
            beta_end; the config's ``diffusion`` dict); None = the defaults.
    Returns:
        (B, C, T', H', W') float32 latents x0 in the DiT's (scaled) latent space.
    """
    schedule = dict(schedule or {})
    scheduler = make_scheduler(scheduler_name, schedule.pop('num_timesteps', 1000), **schedule)
    num_train_timesteps = scheduler.config.num_train_timesteps
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f'num_steps must lie in [1, {num_train_timesteps}], got {num_steps}')
    scheduler.set_timesteps(num_steps, device=device)
    batch_size, latent_channels = shape[0], shape[1]

    x = randn_tensor(tuple(shape), generator=generator, device=torch.device(device), dtype=torch.float32)
    x = x * scheduler.init_noise_sigma
    for t in tqdm(scheduler.timesteps, desc=f'{scheduler_name} sampling', disable=not progress):
        output = model_fn(scheduler.scale_model_input(x, t), t.expand(batch_size))      # (B, 2C, ...)
        if tuple(output.shape) != (batch_size, 2 * latent_channels, *shape[2:]):
            raise ValueError(f'model_fn must return eps || v of shape {(batch_size, 2 * latent_channels, *shape[2:])},'
                             f' got {tuple(output.shape)}')
        if scheduler_name != 'ddpm':
            output = output[:, :latent_channels]                                         # eps only
        x = scheduler.step(output, t, x, generator=generator).prev_sample
    return x
