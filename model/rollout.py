"""Forecasting and long rollouts with one known-prefix DiT (config ``known_prefix.enabled``): the window layout, the
trajectory of every window, and sampling and decoding a rollout (used by sample.py and evaluation/forecast.py).

The tokenizer compresses time by f = T / T' (8 at the faithful setting: latent step 0 holds frames 0-7), so what
the DiT can be told is known comes in whole latent steps: K context frames are K / f latent steps, 1 .. T' - 1.

Rollout past the model's clip length T: windows of T frames start every T - K frames. Window w + 1 knows its
first K / f latent steps, the last ones of window w (model/sampling.py ``sample_rollout``), and is conditioned on
the trajectory continued past the clip, re-expressed in the window's first frame as the dataset's clips are. The
frames of a rollout are all of window 0, then frames K .. T - 1 of each later window: the overlap frames are the
ones already decoded from the window before. A seam is the frame pair (t - 1, t) where t is the first new frame
of a later window.
"""
import dataclasses
import os

import numpy as np
import torch

from dataset.constants import GRID_SHAPE
from dataset.poses import FUTURE_STEPS, conditions_of, frames_from_path, traj_xy
from dataset.trajectories import preset_path
from model.sampling import sample_rollout
from utils.precision import autocast_forward


# ----------------------------------------------------------------------------------------------------------------
# Window layout
# ----------------------------------------------------------------------------------------------------------------

def context_steps(context_frames, num_frames, latent_frames, flag='--context-frames'):
    """Latent steps k = K / f that ``context_frames`` K fill in clips of ``num_frames`` frames and ``latent_frames``
    latent steps; a clear error (naming ``flag``) when K is no whole number of latent steps in 1 .. T' - 1."""
    if latent_frames < 2:
        raise ValueError(f'the model has a single latent time step (T\' = 1 for {num_frames} frames): it cannot be '
                         'told part of a clip, so forecasting and rollouts are impossible; use clips of at least '
                         f'{2 * num_frames} frames')
    factor = num_frames // latent_frames
    if context_frames % factor or not 1 <= context_frames // factor < latent_frames:
        raise ValueError(f'{flag} {context_frames}: must be a multiple of the tokenizer\'s temporal factor {factor} '
                         f'between {factor} and {num_frames - factor} (1 .. T\' - 1 = {latent_frames - 1} latent '
                         'steps)')
    return context_frames // factor


def default_context_frames(num_frames, latent_frames):
    """Half the clip, rounded down to whole latent steps, at least one step."""
    return num_frames // latent_frames * max(1, latent_frames // 2)


def window_starts(total_frames, num_frames, context_frames):
    """First frames of the windows that cover ``total_frames`` frames (one window when it fits in one clip)."""
    if total_frames <= num_frames:
        return [0]
    step = num_frames - context_frames
    return [w * step for w in range(1 + -(-(total_frames - num_frames) // step))]


def assemble(windows, overlap, axis):
    """Window 0 whole, then each later window without its first ``overlap`` entries along ``axis`` (frames of an
    occupancy (N, T, ...) with axis 1, latent steps of latents (N, C, T', ...) with axis 2), concatenated."""
    parts = [windows[0]] + [w.narrow(axis, overlap, w.shape[axis] - overlap) for w in windows[1:]]
    return torch.cat(parts, dim=axis)



# ----------------------------------------------------------------------------------------------------------------
# Trajectories of every window
# ----------------------------------------------------------------------------------------------------------------

def preset_window_conditions(name, num_frames, starts, condition):
    """A preset continued past the clip (dataset/trajectories.py: straight on after the manoeuvre of the first
    clip): (whole run (starts[-1] + T, 2), windows (W, T, 2)), float32 in the dataset's units of ``condition``."""
    covered = starts[-1] + num_frames
    frames = frames_from_path(*preset_path(name, num_frames, extra_frames=covered - num_frames + FUTURE_STEPS))
    windows = [conditions_of(frames[s:s + num_frames + FUTURE_STEPS])[condition][:num_frames] for s in starts]
    return conditions_of(frames)[condition][:covered], np.stack(windows).astype(np.float32)


def clip_window_conditions(dataset, index, starts, num_frames, condition):
    """The ground truth of clip ``index`` of an OccClipDataset (clips of starts[-1] + T frames, built with
    ``condition``), cut as its own __getitem__ cuts it: (whole clip (T_clip, 2), windows (W, T, 2)) float32."""
    scene, first = dataset.window(index)
    source = dataset.scenes[scene][2][condition]

    def cut(start, length):
        window = source[start:start + length]
        return np.asarray(traj_xy(window) if condition == 'traj_xy' else window, np.float32)

    return cut(first, dataset.num_frames), np.stack([cut(first + s, num_frames) for s in starts])


# ----------------------------------------------------------------------------------------------------------------
# Sampling and decoding
# ----------------------------------------------------------------------------------------------------------------

def guided_model_fn(model, traj, cfg_scale, known=None, known_mask=None):
    """model_fn(x, t) for the samplers: the DiT with its trajectory (B, T, 2) or None and its known latents bound,
    through classifier-free guidance when cfg_scale != 1 and there is a trajectory."""
    def model_fn(x, t):
        if traj is not None and cfg_scale != 1.0:
            return model.forward_with_cfg(x, t, traj, cfg_scale, known=known, known_mask=known_mask)
        return model(x, t, traj, known=known, known_mask=known_mask)
    return model_fn


@torch.no_grad()
def encode_context(tokenizer, codec, occupancy):
    """Known latents of context frames (N, K, X, Y, Z) uint8, encoded on their own, clip by clip, in the DiT's
    space through the tokens (codebook indices, or continuous latents) as step02 and train_2 see them:
    (N, C, K / f, H', W')."""
    device = codec.mean.device
    tokens = []
    for clip in occupancy:
        z_q, indices, _ = tokenizer.encode(clip[None].to(device).long())     # (1, C, k, H', W'), (1, k, H', W')
        tokens.append(indices if codec.discrete else z_q)
    return codec.to_model(torch.cat(tokens))


@torch.no_grad()
def decode_windows(tokenizer, codec, windows, overlap_steps, context_frames, snap=False):
    """Decode latent windows (each (N, C, T', H', W'), DiT space) one clip at a time (the logits of a faithful clip
    take 1.5 GB) and assemble them. Returns latents (N, C, T'_all, H', W') in the tokenizer's space and the
    occupancy (N, T_all, X, Y, Z) uint8, both on the CPU."""
    latents, frames = [codec.from_model(x) for x in windows], []
    for z in latents:
        logits = [tokenizer.decode_indices(codec.nearest_indices(one)) if snap else tokenizer.decode(one)
                  for one in z.split(1)]                                                    # (1, T, X, Y, Z, classes)
        frames.append(torch.cat([logit.argmax(-1).to(torch.uint8).cpu() for logit in logits]))   # (N, T, X, Y, Z)
    return (assemble([z.cpu() for z in latents], overlap_steps, axis=2),
            assemble(frames, context_frames, axis=1))


def rollout(model, tokenizer, codec, traj_windows, shape, context_frames, context=None, sampler='ddim',
            num_steps=50, cfg_scale=1.0, generator=None, schedule=None, snap=False, progress=True, bf16=False):
    """Sample and decode a rollout of len(traj_windows) windows (one window: a plain or forecast clip).

    Args:
        traj_windows: per window (N, T, 2) conditions in the DiT's units on its device, or None (unconditional).
        shape: (N, C, T', H', W') of one window; context_frames: K (the overlap of consecutive windows).
        context: optional (N, K, X, Y, Z) uint8 frames known at the start.
        bf16: the DiT's forward passes (guidance included) in bf16 autocast; the sampler's arithmetic and the
            tokenizer stay fp32.
    Returns latents (N, C, T'_all, H', W') (tokenizer space) and occupancy (N, T_all, X, Y, Z) uint8.
    """
    num_frames = tokenizer.downsample[0] * shape[2]
    forecasting = len(traj_windows) > 1 or context is not None
    overlap = context_steps(context_frames, num_frames, shape[2]) if forecasting else 0
    known = None if context is None else encode_context(tokenizer, codec, context)

    def window_model_fn(window, known_latents, known_mask):
        return autocast_forward(guided_model_fn(model, traj_windows[window], cfg_scale, known_latents, known_mask),
                                codec.mean.device, bf16)

    windows = sample_rollout(window_model_fn, shape, len(traj_windows), overlap, sampler, num_steps, context=known,
                             generator=generator, device=codec.mean.device, progress=progress, schedule=schedule)
    return decode_windows(tokenizer, codec, windows, overlap, context_frames, snap)


# ----------------------------------------------------------------------------------------------------------------
# The context file of sample.py --context
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Context:
    """The known start of sample.py --context: frames (N, K, X, Y, Z) uint8, one clip per sample; the file's
    trajectory traj (N, T_file, 2) float32 and its condition name, or None when the file holds none."""
    frames: torch.Tensor
    traj: np.ndarray | None
    condition: str | None


def load_context(path, context_frames, num_samples):
    """The Context of sample.py --context ``path``: its first ``context_frames`` frames, one clip per sample, and
    its `traj` and `condition` when it holds them. The file holds `occupancy` (N or 1, T_file, X, Y, Z) uint8 (a
    clip of python -m evaluation.forecast --write-clips, or a sample)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'--context {path}: no such file')
    with np.load(path) as npz:
        if 'occupancy' not in npz.files:
            raise KeyError(f'--context {path}: no \'occupancy\' array (found {npz.files}); expected '
                           f'(N or 1, T, {", ".join(map(str, GRID_SHAPE))}) uint8')
        occupancy = npz['occupancy']
        traj = npz['traj'].astype(np.float32) if 'traj' in npz.files else None
        condition = str(npz['condition']) if 'condition' in npz.files else None
    if occupancy.ndim != 5 or occupancy.shape[2:] != GRID_SHAPE or occupancy.dtype != np.uint8:
        raise ValueError(f'--context {path}: occupancy is {occupancy.shape} {occupancy.dtype}, expected '
                         f'(N or 1, T, {", ".join(map(str, GRID_SHAPE))}) uint8')
    if occupancy.shape[1] < context_frames:
        raise ValueError(f'--context-frames {context_frames}: {path} holds only {occupancy.shape[1]} frames')
    if occupancy.shape[0] not in (1, num_samples):
        raise ValueError(f'--context {path} holds {occupancy.shape[0]} clips: expected 1 (shared) or --num-samples '
                         f'{num_samples} (one per sample)')
    context = torch.from_numpy(np.ascontiguousarray(occupancy[:, :context_frames]))
    if traj is not None:
        traj = np.broadcast_to(traj, (num_samples, *traj.shape[1:])) if len(traj) == 1 else traj
    return Context(frames=context.expand(num_samples, *context.shape[1:]), traj=traj, condition=condition)
