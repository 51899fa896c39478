"""The forecast protocol of a known-prefix DiT (config ``known_prefix.enabled``; the windows, trajectories and
rollouts themselves are model/rollout.py's).

This module's command line:

    python -m evaluation.forecast --ckpt DIT.pt [--split val] [--context-frames K] [--num-clips N] \\
        [--rollout-windows W] [--sampler ddim --num-sampling-steps 50 --cfg-scale S] [--out forecast.json]
    python -m evaluation.forecast --seams ROLLOUT.npz [--decoded] [--out seams.json]   # a sample.py rollout's seams
    python -m evaluation.forecast --ckpt DIT.pt --write-clips clips.npz [--num-clips N]   # context files for sample.py
    python -m evaluation.forecast --baselines-only --py-config DATASET.py --context-frames K [--stride S]   # no model
    ... [--fill-head FILL.pt]   # with --ckpt or --baselines-only: also the copy filled by a learnt head

Clips of T + (W - 1)(T - K) frames (W = 1: the model's clip length) are read in 'sliding' mode from the split of
the dataset the tokenizer's config names (--py-config overrides it). The first K frames are encoded alone (no peek
at the future) and the rest is sampled under the clip's true trajectory, then decoded. IoU and mIoU
(evaluation/metrics.py, per horizon over all clips; mIoU also over the static and over the movable classes alone,
and every class's IoU) are reported at +1 s, +2 s, +3 s after the last context frame,
i.e. frames K - 1 + KEYFRAME_HZ * s (horizons past the clip are skipped with a note), for: the forecast; copying
the last context frame; the last context frame moved into each frame's view by the clip's known ego motion
(dataset/ego_warp.py); that warped copy with the cells that came into view (which the last context frame did not
see) taken from the forecast; the warped copy whose agents carry on at the velocity the context frames show
(evaluation/constant_velocity.py), and that with the columns that came into view filled by extrusion, or, with
--fill-head, by a head trained for it (evaluation/fill_head.py); the ground truth re-encoded by the tokenizer, window
by window as the rollout is built (the ceiling that compression sets). With W >= 2 the static-voxel consistency
(evaluation/ego_motion.py) of frame pairs across seams is compared with that of the pairs inside windows, for the
rollout and for the ground truth.
--baselines-only scores the copies (and --fill-head's) alone, with no DiT, on clips of K + KEYFRAME_HZ * 3 frames
of the split of a dataset config (any K >= 1). --seams compares the static consistency across seams with that
inside windows for every sample of a rollout written by sample.py (--num-frames past the clip); with --decoded, of
the rollout as decoded, before sample.py --voxel-warp moved its static voxels along its trajectory.
"""
import argparse
import os

import numpy as np
import torch
from mmengine.config import Config
from tqdm import tqdm

from dataset.constants import CLASS_NAMES, KEYFRAME_HZ, MOVABLE_CLASSES, STATIC_CLASSES
from dataset.ego_warp import warp_frames
from dataset.loader import build_dataset
from evaluation.constant_velocity import constant_velocity_copy
from evaluation.ego_motion import recover_poses, static_consistency_counts
from evaluation.fill_head import extrude_into_view, fill, load_fill_head
from evaluation.metrics import OccupancyMetrics, mean_or_none
from model.pipeline import load_pipeline
from model.rollout import (assemble, clip_window_conditions, context_steps, default_context_frames, rollout,
                           window_starts)
from model.sampling import SCHEDULERS
from utils.checkpoint import atomic_write
from utils.distributed import default_device
from utils.run_log import json_text

HORIZONS_S = (1, 2, 3)           # seconds after the last context frame
# the methods that need no model
BASELINES = ('copy_last_context_frame', 'warped_last_context_frame', 'constant_velocity_copy',
             'constant_velocity_copy_extruded')
METHODS = ('forecast', 'warped_copy_filled_by_forecast', *BASELINES, 'reencoded_ground_truth')
FILL_HEAD_METHOD = 'constant_velocity_copy_filled_by_head'     # with --fill-head


# ----------------------------------------------------------------------------------------------------------------
# Horizons and the baselines
# ----------------------------------------------------------------------------------------------------------------

def horizon_frames(context_frames, clip_frames):
    """The frame of every horizon of HORIZONS_S within clips of ``clip_frames`` frames after ``context_frames`` known
    ones ({'+1s': frame, ...}) and a note on each horizon past the clip; an error when none is left."""
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
    return horizons, skipped


def baselines(clips, poses, context_frames, frames, fill_head=None):
    """The model-free predictions of ``frames`` (H frame indices) of clips (B, T, X, Y, Z) uint8 with their ego poses
    (B, T, 3) (the dataset's 'ego_pose'): the last context frame copied; moved into each frame's view by the ego
    motion; and so moved with its agents carried on at the velocity the context shows
    (evaluation/constant_velocity.py); and that with the columns that came into view filled by extrusion
    (evaluation/fill_head.py). With a ``fill_head``, also FILL_HEAD_METHOD: the extruded copy refined by the head
    in those columns. Returns {name: (B, H, X, Y, Z) uint8} and where the moved frame saw, (B, H, X, Y) bool."""
    last = clips[:, context_frames - 1]                                                 # (B, X, Y, Z)
    warped, seen = warp_frames(last, poses[:, context_frames - 1], poses[:, frames], return_seen=True)
    moving = constant_velocity_copy(clips, poses, context_frames, frames)
    copies = {'copy_last_context_frame': last[:, None].expand(-1, len(frames), -1, -1, -1),
              'warped_last_context_frame': warped, 'constant_velocity_copy': moving,
              'constant_velocity_copy_extruded': extrude_into_view(moving, seen)}
    if fill_head is not None:
        seconds = [(frame - (context_frames - 1)) / KEYFRAME_HZ for frame in frames]
        copies[FILL_HEAD_METHOD] = fill(fill_head, copies['constant_velocity_copy_extruded'], seen, seconds)
    return copies, seen


def scored_methods(names, fill_head):
    """``names`` with FILL_HEAD_METHOD after the extruded copy when there is a fill head: the rows in table order."""
    if fill_head is None:
        return names
    after = names.index('constant_velocity_copy_extruded') + 1
    return (*names[:after], FILL_HEAD_METHOD, *names[after:])


def warped_copy_filled(warped, seen, forecast):
    """The warped copy (B, H, X, Y, Z) where the last context frame saw (``seen`` (B, H, X, Y) bool), the forecast
    (B, H, X, Y, Z) in the columns that came into view: what the model adds to the copy."""
    return torch.where(seen[..., None], warped, forecast)


def per_horizon(metrics, horizons):
    """{method: {horizon: {'iou', 'miou', 'miou_static', 'miou_movable', 'class_iou'}}} of OccupancyMetrics over
    the horizon frames, in horizon order: mIoU over all semantic classes, over STATIC_CLASSES (the world a warp can
    move) and over MOVABLE_CLASSES (the agents), each by the metric's rule for absent classes, and every class's
    IoU (class name -> value, None where it does not count)."""
    result = {}
    for name, metric in metrics.items():
        values = metric.compute()
        result[name] = {}
        for i, key in enumerate(horizons):
            class_iou = {c: per_frame[i] for c, per_frame in values['class_iou_per_frame'].items()}
            result[name][key] = {
                'iou': values['iou_per_frame'][i], 'miou': values['miou_per_frame'][i],
                'miou_static': mean_or_none([class_iou[CLASS_NAMES[c]] for c in STATIC_CLASSES]),
                'miou_movable': mean_or_none([class_iou[CLASS_NAMES[c]] for c in MOVABLE_CLASSES]),
                'class_iou': class_iou}
    return result


# ----------------------------------------------------------------------------------------------------------------
# Seams and the re-encoding ceiling
# ----------------------------------------------------------------------------------------------------------------

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


def add_counts(total, counts):
    """Add seam_consistency's {'seam', 'within'}: (matches, compared) into the running [matches, compared] of
    ``total``."""
    for key, (matches, compared) in counts.items():
        total[key][0] += matches
        total[key][1] += compared


def consistency_ratios(counts):
    """{'seam', 'within'}: matches / compared of (running) counts, None where no voxel was compared."""
    return {key: matches / compared if compared else None for key, (matches, compared) in counts.items()}


@torch.no_grad()
def reencode(tokenizer, clips):
    """argmax decode(encode(clip)) of clips (N, T, X, Y, Z) uint8, clip by clip: (N, T, X, Y, Z) uint8 on the CPU."""
    device = next(tokenizer.parameters()).device
    return torch.stack([tokenizer.decode(tokenizer.encode(clip[None].to(device).long())[0])[0].argmax(-1)
                        .to(torch.uint8).cpu() for clip in clips])


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------

def write_clips(args):
    """Write the first --num-clips clips of the split (model clip length) as a sample.py --context file."""
    pipeline = load_pipeline(args.ckpt, data_path=args.data_path, no_ema=args.no_ema)
    cfg, meta, condition = pipeline.dataset_config(args.py_config), pipeline.meta, pipeline.train_args['condition']
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
    device = default_device()
    pipeline = load_pipeline(args.ckpt, data_path=args.data_path, no_ema=args.no_ema, device=device)
    if not pipeline.dit.known_prefix:
        raise ValueError(f'{args.ckpt} was trained without known_prefix.enabled: it cannot be told past frames')
    cfg, meta, train_args, tokenizer = (pipeline.dataset_config(args.py_config), pipeline.meta, pipeline.train_args,
                                        pipeline.tokenizer)
    latent_shape = meta['latent_shape']
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
                            load_ego_pose=True, **overrides)
    count = min(len(dataset), args.num_clips or len(dataset))
    horizons, skipped = horizon_frames(context_frames, clip_frames)
    frame_index = list(horizons.values())
    fill_head = load_fill_head(args.fill_head, context_frames) if args.fill_head else None
    metrics = {name: OccupancyMetrics(len(frame_index)) for name in scored_methods(METHODS, fill_head)}
    seams = seam_frames(starts, context_frames)
    seam_counts = {'forecast': {'seam': [0, 0], 'within': [0, 0]}, 'ground_truth': {'seam': [0, 0], 'within': [0, 0]}}
    scale = meta['conditions']['scale'][condition]
    generator = torch.Generator(device).manual_seed(args.seed)

    for first in tqdm(range(0, count, args.batch_size), desc='forecast'):
        batch = range(first, min(first + args.batch_size, count))
        items = [dataset[i] for i in batch]
        gt = torch.stack([item['occupancy'] for item in items])                            # (B, T_clip, X, Y, Z)
        poses = torch.stack([item['ego_pose'] for item in items])                          # (B, T_clip, 3)
        windows = np.stack([clip_window_conditions(dataset, i, starts=starts, num_frames=num_frames,
                                                    condition=condition)[1] for i in batch])
        traj_windows = [torch.from_numpy(windows[:, w] / scale).float().to(device) for w in range(len(starts))]
        _, forecast = rollout(model=pipeline.dit, tokenizer=tokenizer, codec=pipeline.codec,
                              traj_windows=traj_windows, shape=(len(batch), *latent_shape),
                              context_frames=context_frames,
                              context=gt[:, :context_frames], sampler=args.sampler, num_steps=args.num_sampling_steps,
                              cfg_scale=args.cfg_scale, generator=generator, schedule=train_args['diffusion'],
                              progress=False)
        reencoded = assemble([reencode(tokenizer, gt[:, s:s + num_frames]) for s in starts], context_frames, axis=1)
        copies, seen = baselines(gt, poses, context_frames, frame_index, fill_head)
        predicted = forecast[:, frame_index]                                              # (B, H, X, Y, Z)
        predictions = {'forecast': predicted,
                       'warped_copy_filled_by_forecast': warped_copy_filled(copies['warped_last_context_frame'],
                                                                            seen, predicted),
                       'reencoded_ground_truth': reencoded[:, frame_index], **copies}
        for name, prediction in predictions.items():
            metrics[name].update(prediction, gt[:, frame_index])
        if len(starts) > 1:
            for name, clips in (('forecast', forecast), ('ground_truth', gt)):
                for clip in clips.numpy():
                    add_counts(seam_counts[name], seam_consistency(clip, seams))

    result = {'ckpt': os.path.abspath(args.ckpt), 'split': args.split, 'num_clips': count,
              'clip_frames': clip_frames, 'model_clip_frames': num_frames, 'context_frames': context_frames,
              'rollout_windows': len(starts), 'window_starts': starts, 'sampler': args.sampler,
              'num_sampling_steps': args.num_sampling_steps, 'cfg_scale': args.cfg_scale, 'seed': args.seed,
              'horizons': horizons, 'skipped_horizons': skipped, 'metrics': per_horizon(metrics, horizons)}
    if len(starts) > 1:
        result['seam_frames'] = seams
        result['static_consistency'] = {name: consistency_ratios(counts) for name, counts in seam_counts.items()}
    return result


def evaluate_baselines(args):
    """--baselines-only: the BASELINES alone on clips of K + KEYFRAME_HZ * max(HORIZONS_S) frames of the split of
    the dataset config --py-config, with no model; a JSON-ready dict laid out like ``evaluate``'s."""
    if not args.py_config or args.context_frames is None:
        raise ValueError('--baselines-only needs --py-config (the dataset config) and --context-frames')
    if args.context_frames < 1:
        raise ValueError(f'--context-frames must be at least 1, got {args.context_frames}')
    context_frames = args.context_frames
    clip_frames = context_frames + KEYFRAME_HZ * max(HORIZONS_S)
    overrides = {'stride': args.stride} if args.stride else {}
    dataset = build_dataset(Config.fromfile(args.py_config), args.split, mode='sliding', num_frames=clip_frames,
                            load_ego_pose=True, **overrides)
    count = min(len(dataset), args.num_clips or len(dataset))
    horizons, skipped = horizon_frames(context_frames, clip_frames)
    frame_index = list(horizons.values())
    fill_head = load_fill_head(args.fill_head, context_frames) if args.fill_head else None
    metrics = {name: OccupancyMetrics(len(frame_index)) for name in scored_methods(BASELINES, fill_head)}
    for first in tqdm(range(0, count, args.batch_size), desc='baselines'):
        items = [dataset[i] for i in range(first, min(first + args.batch_size, count))]
        gt = torch.stack([item['occupancy'] for item in items])                            # (B, T_clip, X, Y, Z)
        poses = torch.stack([item['ego_pose'] for item in items])                          # (B, T_clip, 3)
        for name, prediction in baselines(gt, poses, context_frames, frame_index, fill_head)[0].items():
            metrics[name].update(prediction, gt[:, frame_index])
    return {'py_config': os.path.abspath(args.py_config), 'split': args.split, 'num_clips': count,
            'stride': dataset.stride, 'clip_frames': clip_frames, 'context_frames': context_frames,
            'horizons': horizons, 'skipped_horizons': skipped, 'metrics': per_horizon(metrics, horizons)}


def rollout_seams(path, key='occupancy'):
    """--seams: static-voxel consistency across the seams and inside the windows of every sample of a sample.py
    rollout file (its clips ``key``, window_starts and context_frames), in total and per sample; a JSON-ready
    dict."""
    with np.load(path) as saved:
        missing = [name for name in (key, 'window_starts', 'context_frames') if name not in saved.files]
        if missing:
            raise ValueError(f'{path} lacks {", ".join(missing)}: --seams takes a rollout written by sample.py'
                             + (' --voxel-warp' if key != 'occupancy' else ''))
        occupancy, starts = saved[key], saved['window_starts'].tolist()
        context_frames = int(saved['context_frames'])
    if len(starts) < 2:
        raise ValueError(f'{path} holds one window (window_starts {starts}): it has no seam; sample it with '
                         '--num-frames past the model\'s clip length')
    seams = seam_frames(starts, context_frames)
    total, per_sample = {'seam': [0, 0], 'within': [0, 0]}, []
    for clip in tqdm(occupancy, desc='seams'):
        counts = seam_consistency(clip, seams)
        per_sample.append(consistency_ratios(counts))
        add_counts(total, counts)
    return {'rollout': os.path.abspath(path), 'clips': key, 'samples': len(occupancy), 'frames': occupancy.shape[1],
            'window_starts': starts, 'seam_frames': seams, 'static_consistency': consistency_ratios(total),
            'per_sample': per_sample}


def table(result):
    """A small text table of IoU / mIoU per method and horizon, then the mIoU of the static and the movable
    classes."""
    def cell(value):
        return f'{value:8.2f}' if value is not None else '     n/a'

    width = max(32, *(len(name) + 1 for name in result['metrics']))
    lines = [f'{"method":<{width}}' + ''.join(f'{h + " IoU":>9}{h + " mIoU":>10}' for h in result['horizons'])]
    for name, values in result['metrics'].items():
        lines.append(f'{name:<{width}}' + ''.join(f' {cell(v["iou"])} {cell(v["miou"])} ' for v in values.values()))
    lines.append(f'{"mIoU of the static / movable":<{width}}'
                 + ''.join(f'{h + " st":>9}{h + " mov":>10}' for h in result['horizons']))
    for name, values in result['metrics'].items():
        lines.append(f'{name:<{width}}'
                     + ''.join(f' {cell(v["miou_static"])} {cell(v["miou_movable"])} ' for v in values.values()))
    for name, values in result.get('static_consistency', {}).items():
        lines.append(f'static consistency {name}: across seams {values["seam"]}, inside windows {values["within"]}')
    return '\n'.join(lines + [f'skipped {note}' for note in result['skipped_horizons']])


def main(argv=None):
    parser = argparse.ArgumentParser(description='Forecast IoU / mIoU of a known-prefix DiT (module docstring).')
    parser.add_argument('--ckpt', help='train_2.py checkpoint trained with known_prefix.enabled')
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
    parser.add_argument('--baselines-only', action='store_true', help='instead: score the copies of the last '
                        'context frame with no model (needs --py-config and --context-frames; no --ckpt)')
    parser.add_argument('--seams', metavar='ROLLOUT', help='instead: the static consistency across seams and inside '
                        'windows of a rollout file of sample.py (no --ckpt)')
    parser.add_argument('--decoded', action='store_true', help='with --seams: the rollout as decoded '
                        '(decoded_occupancy of sample.py --voxel-warp)')
    parser.add_argument('--fill-head', help='also score the constant-velocity copy filled by this fill head '
                        '(python -m evaluation.fill_head), as ' + FILL_HEAD_METHOD)
    parser.add_argument('--out', help='also write the JSON here')
    args = parser.parse_args(argv)
    if not args.ckpt and not args.baselines_only and not args.seams:
        parser.error('--ckpt is required (or --baselines-only with --py-config and --context-frames, or --seams)')
    if args.seams and (args.ckpt or args.baselines_only or args.write_clips):
        parser.error('--seams reads a rollout file alone: it takes neither --ckpt, --baselines-only nor --write-clips')
    if args.decoded and not args.seams:
        parser.error('--decoded reads a rollout file: it needs --seams')
    if args.baselines_only and (args.ckpt or args.write_clips):
        parser.error('--baselines-only uses no model: it takes neither --ckpt nor --write-clips')
    if args.fill_head and (args.seams or args.write_clips):
        parser.error('--fill-head scores forecasts: it takes neither --seams nor --write-clips')
    if args.write_clips:
        result = write_clips(args)
    elif args.seams:
        result = rollout_seams(args.seams, 'decoded_occupancy' if args.decoded else 'occupancy')
    else:
        result = evaluate_baselines(args) if args.baselines_only else evaluate(args)
    text = json_text(result, indent=2)
    if args.out:
        atomic_write(args.out, lambda f: f.write((text + '\n').encode()))
    print(text)
    if not args.write_clips and not args.seams:
        print(table(result))
    return result


if __name__ == '__main__':
    main()
