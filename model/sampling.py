"""Sampling latents from a trained DiT through diffusers' schedulers.

Three samplers, all built on exactly the betas and the prediction type (eps by default) GaussianDiffusion trains
with:
- 'ddpm': ancestral sampling with IDDPM's learned-range variance (what upstream samples with, 1000 steps by
  default). Fewer steps respace the chain like IDDPM: evenly spaced steps including t = T-1 and t = 0
  ('linspace'), betas recomputed from alpha_bar between kept steps (diffusers does this internally).
- 'ddim': deterministic DDIM (Song et al. 2021, eta = 0) on IDDPM's "ddimN" steps t = 0, k, 2k, ... with
  k = T // N ('leading' spacing: diffusers' DDIM steps by the fixed stride k, which only 'leading' spacing
  matches for every N). ``set_alpha_to_one=True`` makes the last update land on alpha_bar = 1, i.e. return
  the predicted x0 (DDIM's alpha_0 := 1) instead of a sample still carrying the t = 0 noise level.
- 'dpm-solver': DPM-Solver++ (Lu et al. 2022), 2nd-order multistep, final sigma 0 (returns clean x0).

The model callable returns eps || v (B, 2C, ...) (with another prediction type, v-prediction or x0 in place of
eps). DDPM consumes both halves (the variance half is v); DDIM and DPM-Solver get only the first half.
diffusers' DPM-Solver would strip a variance half by slicing 3 channels, so the split is done here.

Known latents (forecasting, rollouts; a DiT built with known_prefix): the known positions of x are set to the
clean known latents before the first step and again after every step, as training sets them in x_t
(GaussianDiffusion.training_losses with known_mask). All three updates are element-wise, so the unknown positions
never see the overwritten values except through the network; the result equals the known latents exactly there.
A rollout (``sample_rollout``) chains windows that each know their first steps from the window before.
"""
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor
from tqdm import tqdm

from model.diffusion import PREDICTION_TYPES, broadcasts_to, linear_betas
from model.dit import prefix_mask

SCHEDULERS = ('ddpm', 'ddim', 'dpm-solver')


def make_scheduler(name, num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, prediction_type='epsilon'):
    """A diffusers scheduler for sampler ``name`` (one of SCHEDULERS) on GaussianDiffusion's betas.

    The betas are passed explicitly (``trained_betas``) from model.diffusion.linear_betas, so that sampling and
    training share one schedule, including its 1000 / num_train_timesteps scaling (diffusers stores them
    in float32). ``prediction_type`` is the training diffusion's ('epsilon', 'v_prediction' or 'sample').
    """
    if name not in SCHEDULERS:
        raise ValueError(f'unknown sampler {name!r}; choose one of {SCHEDULERS}')
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f'prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}')
    common = dict(num_train_timesteps=num_train_timesteps, prediction_type=prediction_type,
                  trained_betas=linear_betas(num_train_timesteps, beta_start, beta_end).tolist())
    if name == 'ddpm':
        return DDPMScheduler(**common, variance_type='learned_range', clip_sample=False, timestep_spacing='linspace')
    if name == 'ddim':
        return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=True, timestep_spacing='leading')
    return DPMSolverMultistepScheduler(**common, algorithm_type='dpmsolver++', solver_order=2,
                                       final_sigmas_type='zero', timestep_spacing='linspace')


@torch.no_grad()
def sample_latents(model_fn, shape, scheduler_name, num_steps, generator=None, device='cpu', progress=True,
                   schedule=None, known=None, known_mask=None):
    """Draw latents by running a sampler from pure noise.

    Args:
        model_fn: callable (x (B, C, ...), t (B,) long) -> (B, 2C, ...) eps || v, e.g. the DiT's forward with the
            trajectory (and known latents) bound, or ``forward_with_cfg`` for guidance.
        shape: (B, C, T', H', W') of the latents to draw.
        scheduler_name: one of SCHEDULERS.
        num_steps: number of sampling steps, 1 .. num_timesteps.
        generator: torch.Generator for the initial noise and DDPM's per-step noise (reproducible sampling).
        device: where the latents live.
        progress: show a tqdm bar over the steps.
        schedule: the training diffusion's keyword arguments (GaussianDiffusion's num_timesteps, beta_start,
            beta_end, prediction_type, min_snr_gamma; the config's ``diffusion`` dict); None = the defaults.
        known: optional (B, C, T', H', W') clean latents, held fixed where ``known_mask`` is True.
        known_mask: optional bool tensor broadcastable to ``shape``, e.g. (B, 1, T', 1, 1); True = known.
    Returns:
        (B, C, T', H', W') float32 latents x0 in the DiT's (scaled) latent space; equal to ``known`` where known.
    """
    schedule = dict(schedule or {})
    schedule.pop('min_snr_gamma', None)                                                 # training only
    scheduler = make_scheduler(scheduler_name, schedule.pop('num_timesteps', 1000), **schedule)
    num_train_timesteps = scheduler.config.num_train_timesteps
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f'num_steps must lie in [1, {num_train_timesteps}], got {num_steps}')
    scheduler.set_timesteps(num_steps, device=device)
    batch_size, latent_channels = shape[0], shape[1]
    if (known is None) != (known_mask is None):
        raise ValueError('give both known latents and known_mask, or neither')
    if known is not None:
        if tuple(known.shape) != tuple(shape):
            raise ValueError(f'known must have the shape of the latents {tuple(shape)}, got {tuple(known.shape)}')
        if known_mask.dtype != torch.bool or not broadcasts_to(known_mask.shape, shape):
            raise ValueError(f'known_mask must be a bool tensor broadcastable to {tuple(shape)}, got '
                             f'{tuple(known_mask.shape)} {known_mask.dtype}')
        known, known_mask = known.to(device, torch.float32), known_mask.to(device)

    def hold_known(x):
        return x if known is None else torch.where(known_mask, known, x)

    x = randn_tensor(tuple(shape), generator=generator, device=torch.device(device), dtype=torch.float32)
    x = hold_known(x * scheduler.init_noise_sigma)
    for t in tqdm(scheduler.timesteps, desc=f'{scheduler_name} sampling', disable=not progress):
        output = model_fn(scheduler.scale_model_input(x, t), t.expand(batch_size))      # (B, 2C, ...)
        if tuple(output.shape) != (batch_size, 2 * latent_channels, *shape[2:]):
            raise ValueError(f'model_fn must return eps || v of shape {(batch_size, 2 * latent_channels, *shape[2:])},'
                             f' got {tuple(output.shape)}')
        if scheduler_name != 'ddpm':
            output = output[:, :latent_channels]                                         # eps only
        x = hold_known(scheduler.step(output, t, x, generator=generator).prev_sample)
    return x


def sample_rollout(window_model_fn, shape, num_windows, overlap_steps, scheduler_name, num_steps, context=None,
                   **sampling_kwargs):
    """Sample ``num_windows`` consecutive latent windows; window w + 1 knows its first ``overlap_steps`` latent
    time steps: they are the last ``overlap_steps`` steps of window w (the windows overlap by that much).

    Args:
        window_model_fn: callable (window index, known (B, C, T', H', W') or None, known_mask (B, T') bool or
            None) -> model_fn(x, t) for that window (its trajectory and known latents bound).
        shape: (B, C, T', H', W') of one window.
        num_windows: >= 1.
        overlap_steps: latent time steps shared by consecutive windows, 1 .. T' - 1 (unused for one window).
        context: optional (B, C, k, H', W') latents known at the start of the first window (k < T'); None = the
            first window starts from nothing.
        sampling_kwargs: generator, device, progress, schedule of ``sample_latents``.
    Returns:
        list of num_windows (B, C, T', H', W') float32 latents in the DiT's space.
    """
    batch_size, _, latent_frames = shape[:3]
    if num_windows < 1:
        raise ValueError(f'num_windows must be at least 1, got {num_windows}')
    if num_windows > 1 and not 1 <= overlap_steps < latent_frames:
        raise ValueError(f'overlap_steps must lie in [1, {latent_frames - 1}] (latent T\' = {latent_frames}), '
                         f'got {overlap_steps}')
    if context is not None and (context.shape[:2] != shape[:2] or context.shape[3:] != tuple(shape[3:])
                                or not 1 <= context.shape[2] < latent_frames):
        raise ValueError(f'context must have shape (B, C, k, H\', W\') = ({", ".join(map(str, shape[:2]))}, k, '
                         f'{", ".join(map(str, shape[3:]))}) with 1 <= k < {latent_frames}, got {tuple(context.shape)}')
    windows, prefix = [], context
    for window in range(num_windows):
        known = known_mask = None
        if prefix is not None:
            steps = prefix.shape[2]
            known = torch.cat([prefix, prefix.new_zeros(*shape[:2], latent_frames - steps, *shape[3:])], dim=2)
            known_mask = prefix_mask(torch.full((batch_size,), steps, device=prefix.device), latent_frames)
        x = sample_latents(window_model_fn(window, known, known_mask), shape, scheduler_name, num_steps,
                           known=known, known_mask=None if known_mask is None else known_mask[:, None, :, None, None],
                           **sampling_kwargs)
        windows.append(x)
        prefix = x[:, :, latent_frames - overlap_steps:]                                 # (B, C, k, H', W')
    return windows
