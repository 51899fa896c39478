"""Forecasting and long rollouts with one known-prefix DiT (config ``known_prefix.enabled``), and their evaluation.

The tokenizer compresses time by f = T / T' (8 at the faithful setting: latent step 0 holds frames 0-7), so what
the DiT can be told is known comes in whole latent steps: K context frames are K / f latent steps, 1 .. T' - 1.

Rollout past the model's clip length T: windows of T frames start every T - K frames. Window w + 1 knows its
first K / f latent steps, the last ones of window w (model/sampling.py ``sample_rollout``), and is conditioned on
the trajectory continued past the clip, re-expressed in the window's first frame as the dataset's clips are. The
frames of a rollout are all of window 0, then frames K .. T - 1 of each later window: the overlap frames are the
ones already decoded from the window before. A seam is the frame pair (t - 1, t) where t is the first new frame
of a later window.

Evaluation protocol (this module's command line):

    python -m evaluation.forecast --ckpt DIT.pt [--split val] [--context-frames K] [--num-clips N] \\
        [--rollout-windows W] [--sampler ddim --num-sampling-steps 50 --cfg-scale S] [--out forecast.json]
    python -m evaluation.forecast --ckpt DIT.pt --write-clips clips.npz [--num-clips N]   # context files for sample.py

Clips of T + (W - 1)(T - K) frames (W = 1: the model's clip length) are read in 'sliding' mode from the split of
the dataset the tokenizer's config names (--py-config overrides it). The first K frames are encoded alone (no peek
at the future) and the rest is sampled under the clip's true trajectory, then decoded. IoU and mIoU
(evaluation/metrics.py, per horizon over all clips) are reported at +1 s, +2 s, +3 s after the last context frame,
i.e. frames K - 1 + KEYFRAME_HZ * s (horizons past the clip are skipped with a note), for: the forecast; copying
the last context frame; the ground truth re-encoded by the tokenizer, window by window as the rollout is built
(the ceiling that compression sets). With W >= 2 the static-voxel consistency (evaluation/ego_motion.py) of frame
pairs across seams is compared with that of the pairs inside windows, for the rollout and for the ground truth.
"""
import argparse
import json
import os

import numpy as np
import torch
from mmengine.config import Config
from tqdm import tqdm

from dataset.constants import GRID_SHAPE, KEYFRAME_HZ
from dataset.loader import build_dataset
from dataset.poses import FUTURE_STEPS, conditions_of, frames_from_path, traj_xy
from dataset.tokens import LatentCodec, load_meta
from dataset.trajectories import preset_path
from evaluation.ego_motion import recover_poses, static_consistency_counts
from evaluation.metrics import OccupancyMetrics
from model.dit import build_dit
from model.sampling import SCHEDULERS, sample_rollout
from model.tokenizer import load_tokenizer
from utils.checkpoint import atomic_write, load_checkpoint

HORIZONS_S = (1, 2, 3)           # seconds after the last context frame
METHODS = ('forecast', 'copy_last_context_frame', 'reencoded_ground_truth')


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


def seam_frames(starts, context_frames):
    """Frames t whose pair (t - 1, t) crosses a seam: the first new frame of every window after the first."""
    return [start + context_frames for start in starts[1:]]


def seam_consistency(clip, seams):
    """Static-voxel consistency counts of consecutive frames of ``clip`` (T, X, Y, Z) uint8 under the ego motion
    recovered from it, split into pairs across seams (t in ``seams``) and pairs inside windows.
    Returns {'seam': (matches, compared), 'within': (matches, compared)}."""
    poses = recover_poses(clip)                                                              # (T, 3)
    counts = {'seam': (0, 0), 'within': (0, 0)}
    for t in range(1, len(clip)):
        matches, compared = static_consistency_counts(clip[t - 1:t + 1], poses[t - 1:t + 1])
        key = 'seam' if t in seams else 'within'
        counts[key] = (counts[key][0] + matches, counts[key][1] + compared)
    return counts


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


def tokenizer_dataset_config(tokenizer_checkpoint, override=None):
    """The dataset config: the file ``override``, or the config text train_1.py stored in its checkpoint."""
    if override:
        return Config.fromfile(override)
    if 'config' not in tokenizer_checkpoint:
        raise KeyError("the tokenizer checkpoint has no 'config' text naming its dataset: pass --py-config")
    return Config.fromstring(tokenizer_checkpoint['config'], '.py')


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
    space through the codebook indices as step02 and train_2 see them: (N, C, K / f, H', W')."""
    device = codec.vectors.device
    indices = [tokenizer.encode(clip[None].to(device).long())[1] for clip in occupancy]       # (1, k, H', W') each
    return codec.to_model(torch.cat(indices))


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


@torch.no_grad()
def reencode(tokenizer, clips):
    """argmax decode(encode(clip)) of clips (N, T, X, Y, Z) uint8, clip by clip: (N, T, X, Y, Z) uint8 on the CPU."""
    device = next(tokenizer.parameters()).device
    return torch.stack([tokenizer.decode(tokenizer.encode(clip[None].to(device).long())[0])[0].argmax(-1)
                        .to(torch.uint8).cpu() for clip in clips])


def load_context(path, context_frames, num_samples):
    """The context file of sample.py --context: its first ``context_frames`` frames, one clip per sample
    ((N, K, X, Y, Z) uint8 tensor), and its `traj` (N, T_file, 2) float32 and `condition`, or None without them.
    The file holds `occupancy` (N or 1, T_file, X, Y, Z) uint8 (a clip of --write-clips or a sample)."""
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
    return context.expand(num_samples, *context.shape[1:]), traj, condition


def rollout(model, tokenizer, codec, traj_windows, shape, context_frames, context=None, sampler='ddim',
            num_steps=50, cfg_scale=1.0, generator=None, schedule=None, snap=False, progress=True):
    """Sample and decode a rollout of len(traj_windows) windows (one window: a plain or forecast clip).

    Args:
        traj_windows: per window (N, T, 2) conditions in the DiT's units on its device, or None (unconditional).
        shape: (N, C, T', H', W') of one window; context_frames: K (the overlap of consecutive windows).
        context: optional (N, K, X, Y, Z) uint8 frames known at the start.
    Returns latents (N, C, T'_all, H', W') (tokenizer space) and occupancy (N, T_all, X, Y, Z) uint8.
    """
    num_frames = tokenizer.downsample[0] * shape[2]
    forecasting = len(traj_windows) > 1 or context is not None
    overlap = context_steps(context_frames, num_frames, shape[2]) if forecasting else 0
    known = None if context is None else encode_context(tokenizer, codec, context)

    def window_model_fn(window, known_latents, known_mask):
        return guided_model_fn(model, traj_windows[window], cfg_scale, known_latents, known_mask)

    windows = sample_rollout(window_model_fn, shape, len(traj_windows), overlap, sampler, num_steps, context=known,
                             generator=generator, device=codec.vectors.device, progress=progress, schedule=schedule)
    return decode_windows(tokenizer, codec, windows, overlap, context_frames, snap)


def load_dit(ckpt, no_ema=False, device='cpu'):
    """(DiT in eval mode, checkpoint) of a train_2.py checkpoint, EMA weights unless ``no_ema``."""
    checkpoint = load_checkpoint(ckpt, ('model', 'ema', 'model_args', 'args', 'data_path'))
    model = build_dit(**checkpoint['model_args'])
    model.load_state_dict(checkpoint['model' if no_ema else 'ema'])
    return model.to(device).eval(), checkpoint


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------

def _setup(args, device):
    """What both commands need: (DiT, its checkpoint, tokenizer, codec, meta.json, dataset config)."""
    model, checkpoint = load_dit(args.ckpt, args.no_ema, device)
    token_dir = args.data_path or checkpoint['data_path']
    meta = load_meta(token_dir)
    tokenizer_path = os.path.normpath(os.path.join(token_dir, meta['tokenizer']['checkpoint']))
    tokenizer, tokenizer_checkpoint = load_tokenizer(tokenizer_path, device)
    codec = LatentCodec(token_dir, checkpoint['args']['latent_scaling'], device)
    cfg = tokenizer_dataset_config(tokenizer_checkpoint, args.py_config)
    return model, checkpoint, tokenizer, codec, meta, cfg


def write_clips(args):
    """Write the first --num-clips clips of the split (model clip length) as a sample.py --context file."""
    _, checkpoint, _, _, meta, cfg = _setup(args, 'cpu')
    condition = checkpoint['args']['condition']
    overrides = {'stride': args.stride} if args.stride else {}
    dataset = build_dataset(cfg, args.split, mode='sliding', num_frames=meta['num_frames'], conditions=(condition,),
                            **overrides)
    items = [dataset[i] for i in range(min(len(dataset), args.num_clips or len(dataset)))]
    arrays = dict(occupancy=np.stack([item['occupancy'].numpy() for item in items]),
                  traj=np.stack([item[condition].numpy() for item in items]), condition=condition,
                  scene_name=np.array([item['scene_name'] for item in items]),
                  start=np.array([item['start'] for item in items]))
    atomic_write(args.write_clips, lambda f: np.savez_compressed(f, **arrays))
    return {'wrote': os.path.abspath(args.write_clips), 'clips': len(items), 'frames': meta['num_frames']}


def evaluate(args):
    """The forecast metrics of the module docstring: a JSON-ready dict."""
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    model, checkpoint, tokenizer, codec, meta, cfg = _setup(args, device)
    if not model.known_prefix:
        raise ValueError(f'{args.ckpt} was trained without known_prefix.enabled: it cannot be told past frames')
    train_args, latent_shape = checkpoint['args'], meta['latent_shape']
    num_frames, condition = meta['num_frames'], train_args['condition']
    context_frames = args.context_frames or default_context_frames(num_frames, latent_shape[1])
    context_steps(context_frames, num_frames, latent_shape[1])
    if args.rollout_windows < 1:
        raise ValueError(f'--rollout-windows must be at least 1, got {args.rollout_windows}')
    starts = window_starts(num_frames + (args.rollout_windows - 1) * (num_frames - context_frames), num_frames,
                           context_frames)
    clip_frames = starts[-1] + num_frames
    overrides = {'stride': args.stride} if args.stride else {}
    dataset = build_dataset(cfg, args.split, mode='sliding', num_frames=clip_frames, conditions=(condition,),
                            **overrides)
    count = min(len(dataset), args.num_clips or len(dataset))
    horizons, skipped = {}, []
    for seconds in HORIZONS_S:
        frame = context_frames - 1 + KEYFRAME_HZ * seconds
        if frame < clip_frames:
            horizons[f'+{seconds}s'] = frame
        else:
            skipped.append(f'+{seconds}s: frame {frame} is past the {clip_frames} frames of a clip')
    if not horizons:
        raise ValueError(f'no horizon of {HORIZONS_S} s lies within clips of {clip_frames} frames after '
                         f'{context_frames} context frames: use fewer --context-frames or more --rollout-windows')
    frame_index = list(horizons.values())
    metrics = {name: OccupancyMetrics(len(frame_index)) for name in METHODS}
    seams = seam_frames(starts, context_frames)
    seam_counts = {'forecast': {'seam': [0, 0], 'within': [0, 0]}, 'ground_truth': {'seam': [0, 0], 'within': [0, 0]}}
    scale = meta['conditions']['scale'][condition]
    generator = torch.Generator(device).manual_seed(args.seed)

    for first in tqdm(range(0, count, args.batch_size), desc='forecast'):
        batch = range(first, min(first + args.batch_size, count))
        gt = torch.stack([dataset[i]['occupancy'] for i in batch])                         # (B, T_clip, X, Y, Z)
        windows = np.stack([clip_window_conditions(dataset, i, starts, num_frames, condition)[1] for i in batch])
        traj_windows = [torch.from_numpy(windows[:, w] / scale).float().to(device) for w in range(len(starts))]
        _, forecast = rollout(model, tokenizer, codec, traj_windows, (len(batch), *latent_shape), context_frames,
                              gt[:, :context_frames], args.sampler, args.num_sampling_steps, args.cfg_scale,
                              generator, train_args['diffusion'], progress=False)
        reencoded = assemble([reencode(tokenizer, gt[:, s:s + num_frames]) for s in starts], context_frames, axis=1)
        predictions = {'forecast': forecast, 'reencoded_ground_truth': reencoded,
                       'copy_last_context_frame': gt[:, context_frames - 1:context_frames].expand_as(gt)}
        for name, prediction in predictions.items():
            metrics[name].update(prediction[:, frame_index], gt[:, frame_index])
        if len(starts) > 1:
            for name, clips in (('forecast', forecast), ('ground_truth', gt)):
                for clip in clips.numpy():
                    for key, (matches, compared) in seam_consistency(clip, seams).items():
                        seam_counts[name][key][0] += matches
                        seam_counts[name][key][1] += compared

    result = {'ckpt': os.path.abspath(args.ckpt), 'split': args.split, 'num_clips': count,
              'clip_frames': clip_frames, 'model_clip_frames': num_frames, 'context_frames': context_frames,
              'rollout_windows': len(starts), 'window_starts': starts, 'sampler': args.sampler,
              'num_sampling_steps': args.num_sampling_steps, 'cfg_scale': args.cfg_scale, 'seed': args.seed,
              'horizons': horizons, 'skipped_horizons': skipped, 'metrics': {}}
    for name, metric in metrics.items():
        values = metric.compute()
        result['metrics'][name] = {key: {'iou': values['iou_per_frame'][i], 'miou': values['miou_per_frame'][i]}
                                   for i, key in enumerate(horizons)}
    if len(starts) > 1:
        result['seam_frames'] = seams
        result['static_consistency'] = {name: {key: matches / compared if compared else None
                                               for key, (matches, compared) in counts.items()}
                                        for name, counts in seam_counts.items()}
    return result


def table(result):
    """A small text table of IoU / mIoU per method and horizon."""
    def cell(value):
        return f'{value:8.2f}' if value is not None else '     n/a'

    lines = [f'{"method":<26}' + ''.join(f'{h + " IoU":>9}{h + " mIoU":>10}' for h in result['horizons'])]
    for name, values in result['metrics'].items():
        lines.append(f'{name:<26}' + ''.join(f' {cell(v["iou"])} {cell(v["miou"])} ' for v in values.values()))
    for name, values in result.get('static_consistency', {}).items():
        lines.append(f'static consistency {name}: across seams {values["seam"]}, inside windows {values["within"]}')
    return '\n'.join(lines + [f'skipped {note}' for note in result['skipped_horizons']])


def main(argv=None):
    parser = argparse.ArgumentParser(description='Forecast IoU / mIoU of a known-prefix DiT (module docstring).')
    parser.add_argument('--ckpt', required=True, help='train_2.py checkpoint trained with known_prefix.enabled')
    parser.add_argument('--split', default='val', choices=('train', 'val'))
    parser.add_argument('--context-frames', type=int, help='known frames K, a multiple of the tokenizer\'s temporal '
                        'factor (default: half the clip in whole latent steps)')
    parser.add_argument('--num-clips', type=int, help='at most this many clips (default: all)')
    parser.add_argument('--rollout-windows', type=int, default=1, help='windows per clip; >= 2 measures the seams')
    parser.add_argument('--stride', type=int, help='sliding-window stride (default: the dataset config\'s)')
    parser.add_argument('--sampler', choices=SCHEDULERS, default='ddim')
    parser.add_argument('--num-sampling-steps', type=int, default=50)
    parser.add_argument('--cfg-scale', type=float, default=1.0)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--batch-size', type=int, default=4, help='clips sampled together')
    parser.add_argument('--py-config', help='dataset config (default: the one stored in the tokenizer checkpoint)')
    parser.add_argument('--data-path', help='token dir (default: the one recorded in the checkpoint)')
    parser.add_argument('--no-ema', action='store_true', help='use the raw instead of the EMA weights')
    parser.add_argument('--write-clips', help='instead: write clips of the split to this .npz (sample.py --context)')
    parser.add_argument('--out', help='also write the JSON here')
    args = parser.parse_args(argv)
    result = write_clips(args) if args.write_clips else evaluate(args)
    text = json.dumps(result, indent=2)
    if args.out:
        atomic_write(args.out, lambda f: f.write((text + '\n').encode()))
    print(text)
    if not args.write_clips:
        print(table(result))
    return result


if __name__ == '__main__':
    main()
