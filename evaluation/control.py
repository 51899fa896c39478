"""Trajectory control: does the ego of generated occupancy go the way its trajectory says?

    python -m evaluation.control --samples straight.npz left.npz right.npz --out control.json
    python -m evaluation.control --samples a.npz b.npz --names left right --left-deg 60 --min-pass-fraction 0.8
    python -m evaluation.control --samples straight.npz left.npz right.npz --decoded   # before sample.py --voxel-warp
    python -m evaluation.control --world data/synthetic_counterfactual --split val --out control_gt.json
    python -m evaluation.control --world data/synthetic_counterfactual --write-clips out/counterfactual_clips

--samples: sample files of sample.py (.npz with `occupancy` (N, T, 200, 200, 16) uint8 and `traj` (N, T, 2) in the
'traj_xy' convention), one per commanded manoeuvre; sample n of every file is scored against sample n of the others.
The manoeuvre of a file is --names, or its file name ('left.npz', 'left-ddim50-cfg2-seed0.npz': 'left'). --decoded
scores the files' `decoded_occupancy` instead: the clips as the tokenizer decoded them, before sample.py --voxel-warp
moved their static voxels along `traj`. Per sample:
  heading_deg        the ego's heading change over the clip, recovered from the occupancy alone
                     (evaluation/ego_motion.py recover_poses): the last frame's yaw in frame 0's coordinates, + = left;
                     max_abs_yaw_deg the largest |yaw| on the way;
  traj_heading_deg   the direction of the last step of the sample's own `traj` (what was asked; None when it stands);
  ade_m, fde_m       adherence of the recovered path to the sample's own `traj` (frames 1..T-1, and the last frame),
                     counterfactual_ade_m / _fde_m the same against the `traj` of sample n of every other file: the
                     ceiling that control must beat; closest_to_own: the own `traj` is nearer than every other;
  passes             the heading meets the manoeuvre's threshold: left >= --left-deg, right <= --right-deg, straight
                     within +-straight-deg (other names: None).
criterion_met: every file of a known manoeuvre has at least --min-pass-fraction of its samples passing.

--world DIR: the ground truth, the floor of the metric. Every sliding window (--num-frames, --stride) of a split of a
world in the Occ3D layout (DIR/nuscenes/gts + DIR/nuscenes_infos_<split>_temporal_v3_scene.pkl; the synthetic
world, or data/ for the real one) is registered like a sample; its true heading change and path come from the info
pickle's poses. Windows are grouped by the manoeuvre their true heading meets ('between' if none) and, for the
counterfactual world (python -m dataset.synthetic --counterfactual), by the manoeuvre in their scene's name, whose
sibling scenes' windows at the same start give the counterfactual ADE. --write-clips DIR writes the first window
of every counterfactual scene as DIR/<manoeuvre>.npz in the samples format (occupancy, traj, condition, scene_name,
start): --samples scores them exactly as it scores samples, and sample.py takes them as --context.
Writes JSON (--out) and prints a Markdown table.
"""
import argparse
import dataclasses
import functools
import logging
import os
import sys

import numpy as np
from tqdm import tqdm

from dataset.clips import OccClipDataset, load_infos
from dataset.poses import ego_to_global
from dataset.synthetic_routes import MANOEUVRES
from evaluation.ego_motion import recover_poses
from evaluation.evaluate import adherence, adherence_applicable, deranged, npz_clips, npz_trajectories
from utils.checkpoint import atomic_write
from utils.run_log import json_text

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Thresholds:
    """Heading change (degrees, + = left) a clip of each manoeuvre must reach."""
    left_deg: float = 45.0          # left: at least this
    right_deg: float = -45.0        # right: at most this
    straight_deg: float = 15.0      # straight: within +- this

    def passes(self, manoeuvre, heading_deg):
        """Whether ``heading_deg`` meets the criterion of ``manoeuvre``; None for a name that has none."""
        if manoeuvre == 'left':
            return bool(heading_deg >= self.left_deg)
        if manoeuvre == 'right':
            return bool(heading_deg <= self.right_deg)
        if manoeuvre == 'straight':
            return bool(abs(heading_deg) <= self.straight_deg)
        return None

    def classify(self, heading_deg):
        """The manoeuvre whose criterion ``heading_deg`` meets, or 'between'."""
        return next((m for m in MANOEUVRES if self.passes(m, heading_deg)), 'between')


def manoeuvre_of(path):
    """The manoeuvre a samples file is named after: its file name, or the part before the first '-'."""
    stem = os.path.splitext(os.path.basename(path))[0]
    return stem if stem in MANOEUVRES else stem.split('-')[0]


def _stats(values):
    """{'mean', 'min', 'median', 'max'} of a list of numbers (None when empty)."""
    if len(values) == 0:
        return None
    values = np.asarray(values, np.float64)
    return {'mean': float(values.mean()), 'min': float(values.min()), 'median': float(np.median(values)),
            'max': float(values.max())}


def _heading_deg(poses):
    """Heading change (degrees) of every clip of recovered or true poses (N, T, 3): the last frame's yaw."""
    return np.degrees(poses[:, -1, 2])


def _traj_heading_deg(traj):
    """Direction (degrees) of the last step of every traj (N, T, 2); NaN where that step is shorter than 1 cm."""
    step = traj[:, -1] - traj[:, -2]                                                # (N, 2)
    return np.where(np.linalg.norm(step, axis=1) >= 0.01, np.degrees(np.arctan2(step[:, 1], step[:, 0])), np.nan)


# ----------------------------------------------------------------------------------------------------------------
# Samples
# ----------------------------------------------------------------------------------------------------------------

def _read_samples(path, key):
    """Recovered poses (N, T, 3) of the clips ``key`` of a samples file and its conditioning traj (N, T, 2)."""
    shape, clips = npz_clips(path, key)
    applicable, why_not = adherence_applicable(path)
    if not applicable:
        raise ValueError(f'{path}: {why_not}; trajectory control needs samples conditioned on traj_xy positions')
    traj = npz_trajectories(path, shape, required=True)
    poses = np.stack([recover_poses(clip) for clip in tqdm(clips, total=shape[0], desc=f'registering {path}')])
    return poses, traj


def score_samples(paths, names, thresholds, min_pass_fraction, key='occupancy'):
    """The control metrics of the module docstring for the clips ``key`` of samples files ``paths`` of manoeuvres
    ``names``."""
    sets = [_read_samples(path, key) for path in paths]
    shapes = {path: traj.shape[:2] for path, (_, traj) in zip(paths, sets)}
    if len(set(shapes.values())) > 1:
        raise ValueError(f'every samples file needs the same number of samples and frames (sample n of each is '
                         f'scored against sample n of the others), got {shapes}')
    files = []
    for i, (path, name, (poses, traj)) in enumerate(zip(paths, names, sets)):
        ade, fde = adherence(poses[..., :2], traj)                                   # (N,) each
        others = [adherence(poses[..., :2], other_traj) for j, (_, other_traj) in enumerate(sets) if j != i]
        heading, traj_heading = _heading_deg(poses), _traj_heading_deg(traj)
        max_abs_yaw = np.degrees(np.abs(poses[..., 2]).max(1))
        passes = [thresholds.passes(name, h) for h in heading]
        # the samples' own trajectories should do what the file is named after (a mix-up of files or --names)
        asked = [thresholds.passes(name, h) for h in traj_heading if not np.isnan(h)]
        if False in asked:
            logger.warning('%s: %d of %d trajectories do not go %s by their last step (traj_heading_deg)', path,
                           asked.count(False), len(traj_heading), name)
        samples = [{'heading_deg': float(heading[n]), 'max_abs_yaw_deg': float(max_abs_yaw[n]),
                    'traj_heading_deg': None if np.isnan(traj_heading[n]) else float(traj_heading[n]),
                    'ade_m': float(ade[n]), 'fde_m': float(fde[n]),
                    'counterfactual_ade_m': [float(a[n]) for a, _ in others],
                    'counterfactual_fde_m': [float(f[n]) for _, f in others],
                    'closest_to_own': bool(all(ade[n] < a[n] for a, _ in others)), 'passes': passes[n]}
                   for n in range(len(heading))]
        files.append({'path': os.path.abspath(path), 'manoeuvre': name, 'num_samples': len(heading),
                      'num_frames': traj.shape[1], 'heading_deg': _stats(heading),
                      'max_abs_yaw_deg': _stats(max_abs_yaw),
                      'passes': None if passes[0] is None else sum(passes),
                      'pass_fraction': None if passes[0] is None else sum(passes) / len(passes),
                      'ade_m': float(ade.mean()), 'fde_m': float(fde.mean()),
                      'counterfactual_ade_m': float(np.mean([a for a, _ in others])) if others else None,
                      'counterfactual_fde_m': float(np.mean([f for _, f in others])) if others else None,
                      'closest_to_own': sum(s['closest_to_own'] for s in samples) if others else None,
                      'samples': samples})
    scored = [f for f in files if f['pass_fraction'] is not None]
    return {'thresholds': dataclasses.asdict(thresholds), 'min_pass_fraction': min_pass_fraction, 'clips': key,
            'files': files,
            'criterion_met': bool(scored) and all(f['pass_fraction'] >= min_pass_fraction for f in scored)}


def samples_table(result):
    """The samples result as a Markdown table, one row per file."""
    lines = ['| file | manoeuvre | samples | heading (deg) mean [min, max] | passes | ADE / FDE own (m) | '
             'ADE / FDE other files (m) | own closest |', '|---|---|---:|---|---:|---|---|---:|']
    for f in result['files']:
        heading = f['heading_deg']
        passes = '—' if f['passes'] is None else f'{f["passes"]}/{f["num_samples"]}'
        other = ('—' if f['counterfactual_ade_m'] is None
                 else f'{f["counterfactual_ade_m"]:.2f} / {f["counterfactual_fde_m"]:.2f}')
        closest = '—' if f['closest_to_own'] is None else f'{f["closest_to_own"]}/{f["num_samples"]}'
        lines.append(f'| {os.path.basename(f["path"])} | {f["manoeuvre"]} | {f["num_samples"]} | '
                     f'{heading["mean"]:+.1f} [{heading["min"]:+.1f}, {heading["max"]:+.1f}] | {passes} | '
                     f'{f["ade_m"]:.2f} / {f["fde_m"]:.2f} | {other} | {closest} |')
    lines.append(f'\ncriterion met (every manoeuvre file passes in >= {result["min_pass_fraction"]:.0%} of its '
                 f'samples): {result["criterion_met"]}')
    return '\n'.join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Ground truth
# ----------------------------------------------------------------------------------------------------------------

def _split_windows(world, split, num_frames, stride):
    """The sliding windows of a split and its info frames: (OccClipDataset, {scene name: frame list})."""
    info_pkl = os.path.join(world, f'nuscenes_infos_{split}_temporal_v3_scene.pkl')
    dataset = OccClipDataset(info_pkl, os.path.join(world, 'nuscenes', 'gts'), num_frames=num_frames, mode='sliding',
                             stride=stride, conditions=('traj_xy',))
    return dataset, load_infos(info_pkl)


def _true_heading_deg(frames):
    """Heading change (degrees, + = left) from the first to the last of the info ``frames``, from their ego poses
    (unwrapped frame by frame, so that a window may turn by more than 180 degrees)."""
    relative = np.linalg.inv(ego_to_global(frames[:1])[0]) @ ego_to_global(frames)            # (T, 4, 4)
    return float(np.degrees(np.unwrap(np.arctan2(relative[:, 1, 0], relative[:, 0, 0]))[-1]))


def _scene_manoeuvre(scene_name):
    """(start name, manoeuvre) of a counterfactual scene 'scene-NNNN-<manoeuvre>'; (None, None) for others."""
    start, _, manoeuvre = scene_name.rpartition('-')
    return (start, manoeuvre) if manoeuvre in MANOEUVRES else (None, None)


def _window_summary(chosen, true_heading, heading, ade, thresholds):
    """Statistics of the windows ``chosen`` (W,) bool, from their true and recovered headings and ADE (W,) each."""
    classes = [thresholds.classify(h) for h in true_heading[chosen]]
    passed = [thresholds.passes(c, h) for c, h in zip(classes, heading[chosen]) if c != 'between']
    return {'windows': int(chosen.sum()), 'true_heading_deg': _stats(true_heading[chosen]),
            'recovered_heading_deg': _stats(heading[chosen]),
            'heading_error_deg': _stats(np.abs(heading - true_heading)[chosen]),
            'true_classes': {c: classes.count(c) for c in MANOEUVRES + ('between',)},
            'recovered_passes_true_class': sum(passed), 'ade_m': _stats(ade[chosen])}


def score_world(world, split, num_frames, stride, thresholds):
    """Ground-truth control metrics of every sliding window of a world's split (module docstring)."""
    dataset, infos = _split_windows(world, split, num_frames, stride)
    if len(dataset) < 2:
        raise ValueError(f'{world} {split}: {len(dataset)} window(s) of {num_frames} frames; need at least 2')
    scenes, starts, true_heading, recovered, traj = [], [], [], [], []
    for index in tqdm(range(len(dataset)), desc=f'registering {split} windows'):
        item = dataset[index]
        scenes.append(item['scene_name'])
        starts.append(item['start'])
        true_heading.append(_true_heading_deg(infos[item['scene_name']][item['start']:item['start'] + num_frames]))
        recovered.append(recover_poses(item['occupancy'].numpy()))                                # (T, 3)
        traj.append(item['traj_xy'].numpy())                                                      # (T, 2)
    true_heading, recovered, traj = np.array(true_heading), np.stack(recovered), np.stack(traj)
    heading = _heading_deg(recovered)
    ade, fde = adherence(recovered[..., :2], traj)
    shuffled_ade, shuffled_fde = adherence(recovered[..., :2], deranged(traj))
    # counterfactual: every window against the windows of its start's sibling scenes at the same frame
    keys = [(_scene_manoeuvre(scene)[0], start) for scene, start in zip(scenes, starts)]
    pairs = [(i, j) for i, key in enumerate(keys) if key[0] is not None
             for j, other in enumerate(keys) if other == key and j != i]
    counterfactual = {'counterfactual_ade_m': None, 'counterfactual_fde_m': None}
    if pairs:
        rows, others = map(list, zip(*pairs))
        counterfactual_ade, counterfactual_fde = adherence(recovered[rows, :, :2], traj[others])
        counterfactual = {'counterfactual_ade_m': float(counterfactual_ade.mean()),
                          'counterfactual_fde_m': float(counterfactual_fde.mean())}

    classes = np.array([thresholds.classify(h) for h in true_heading])
    manoeuvres = np.array([str(_scene_manoeuvre(scene)[1]) for scene in scenes])
    first_windows = np.array(starts) == 0
    summary = functools.partial(_window_summary, true_heading=true_heading, heading=heading, ade=ade,
                                thresholds=thresholds)
    return {'world': os.path.abspath(world), 'split': split, 'num_frames': num_frames, 'stride': stride,
            'thresholds': dataclasses.asdict(thresholds), 'windows': len(scenes),
            'adherence': {'ade_m': float(ade.mean()), 'fde_m': float(fde.mean()),
                          'shuffled_ade_m': float(shuffled_ade.mean()), 'shuffled_fde_m': float(shuffled_fde.mean()),
                          **counterfactual},
            'by_true_heading': {c: summary(classes == c) for c in MANOEUVRES + ('between',) if (classes == c).any()},
            'by_scene_manoeuvre': {m: {'all_windows': summary(manoeuvres == m),
                                       'first_windows': summary((manoeuvres == m) & first_windows)}
                                   for m in MANOEUVRES if (manoeuvres == m).any()},
            'per_window': [{'scene': scene, 'start': start, 'true_heading_deg': float(t),
                            'recovered_heading_deg': float(h), 'ade_m': float(a)}
                           for scene, start, t, h, a in zip(scenes, starts, true_heading, heading, ade)]}


def world_table(result):
    """The ground-truth result as a Markdown table: windows grouped by true heading, then by scene manoeuvre."""
    lines = ['| windows | count | true heading (deg) mean [min, max] | recovered heading error (deg) mean / max | '
             'recovered passes the true class | ADE (m) |', '|---|---:|---|---|---:|---:|']
    groups = [(f'true {c}', s) for c, s in result['by_true_heading'].items()]
    for manoeuvre, parts in result['by_scene_manoeuvre'].items():
        groups += [(f'{manoeuvre} scenes, {part.replace("_", " ")}', s) for part, s in parts.items()]
    for label, s in groups:
        if not s['windows']:
            continue
        true, error = s['true_heading_deg'], s['heading_error_deg']
        scored = s['windows'] - s['true_classes']['between']
        lines.append(f'| {label} | {s["windows"]} | {true["mean"]:+.1f} [{true["min"]:+.1f}, {true["max"]:+.1f}] | '
                     f'{error["mean"]:.2f} / {error["max"]:.2f} | {s["recovered_passes_true_class"]}/{scored} | '
                     f'{s["ade_m"]["mean"]:.3f} |')
    adherence_result = result['adherence']
    counterfactual = adherence_result['counterfactual_ade_m']
    lines.append(f'\nADE own / shuffled / counterfactual: {adherence_result["ade_m"]:.3f} / '
                 f'{adherence_result["shuffled_ade_m"]:.2f} / '
                 f'{"—" if counterfactual is None else f"{counterfactual:.2f}"} m')
    return '\n'.join(lines)


def write_clips(world, split, num_frames, out_dir):
    """Write the first window of every counterfactual scene of a split as <out_dir>/<manoeuvre>.npz, sample n of
    every file from the same start. Returns {manoeuvre: path}."""
    # a stride past the end of every scene: one window per scene, its first
    dataset, _ = _split_windows(world, split, num_frames, stride=sys.maxsize)
    first = {}                                                       # (start name, manoeuvre) -> item
    for index in range(len(dataset)):
        item = dataset[index]
        start, manoeuvre = _scene_manoeuvre(item['scene_name'])
        if start is not None:
            first[(start, manoeuvre)] = item
    starts = sorted({s for s, _ in first if all((s, m) in first for m in MANOEUVRES)})
    if not starts:
        raise ValueError(f'{world} {split}: no start with a scene for each of {MANOEUVRES} of at least {num_frames} '
                         f'frames (write the world with python -m dataset.synthetic --counterfactual)')
    written = {}
    for manoeuvre in MANOEUVRES:
        items = [first[(start, manoeuvre)] for start in starts]
        arrays = dict(occupancy=np.stack([item['occupancy'].numpy() for item in items]),         # (N, T, X, Y, Z)
                      traj=np.stack([item['traj_xy'].numpy() for item in items]), condition='traj_xy',
                      scene_name=np.array([item['scene_name'] for item in items]), start=np.zeros(len(items), int))
        written[manoeuvre] = os.path.join(out_dir, f'{manoeuvre}.npz')
        atomic_write(written[manoeuvre], lambda f: np.savez_compressed(f, **arrays))
    return {'wrote': {m: os.path.abspath(p) for m, p in written.items()}, 'clips': len(starts),
            'frames': num_frames}


def main(argv=None):
    parser = argparse.ArgumentParser(description='Trajectory control of sampled occupancy (module docstring).')
    parser.add_argument('--samples', nargs='+', help='samples .npz files of sample.py, one per manoeuvre')
    parser.add_argument('--names', nargs='+', help='the manoeuvre of each samples file (default: from its name)')
    parser.add_argument('--world', help='ground truth: a world directory in the Occ3D layout')
    parser.add_argument('--split', default='val', choices=('train', 'val'))
    parser.add_argument('--num-frames', type=int, default=8, help='--world window length')
    parser.add_argument('--stride', type=int, default=4, help='--world sliding-window stride')
    parser.add_argument('--write-clips', help='with --world: write the counterfactual first windows to this folder')
    parser.add_argument('--left-deg', type=float, default=Thresholds.left_deg)
    parser.add_argument('--right-deg', type=float, default=Thresholds.right_deg)
    parser.add_argument('--straight-deg', type=float, default=Thresholds.straight_deg)
    parser.add_argument('--min-pass-fraction', type=float, default=0.5,
                        help='criterion: every manoeuvre file passes in at least this fraction of its samples')
    parser.add_argument('--decoded', action='store_true', help='score the clips as decoded (decoded_occupancy of '
                        'sample.py --voxel-warp) instead of occupancy')
    parser.add_argument('--out', help='also write the JSON here')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    if bool(args.samples) == bool(args.world):
        parser.error('give either --samples FILE ... or --world DIR')
    if args.names and len(args.names) != len(args.samples or ()):
        parser.error(f'--names gives {len(args.names)} names for {len(args.samples or ())} samples files')
    if args.write_clips and not args.world:
        parser.error('--write-clips needs --world')
    if args.decoded and not args.samples:
        parser.error('--decoded scores samples files: it needs --samples')
    if not (args.straight_deg >= 0 and args.left_deg > args.straight_deg and args.right_deg < -args.straight_deg):
        parser.error('thresholds must satisfy --straight-deg >= 0, --left-deg > --straight-deg and '
                     '--right-deg < -(--straight-deg)')
    if not 0 <= args.min_pass_fraction <= 1:
        parser.error(f'--min-pass-fraction must be in [0, 1], got {args.min_pass_fraction}')
    thresholds = Thresholds(args.left_deg, args.right_deg, args.straight_deg)

    if args.write_clips:
        result, table = write_clips(args.world, args.split, args.num_frames, args.write_clips), None
    elif args.world:
        result = score_world(args.world, args.split, args.num_frames, args.stride, thresholds)
        table = world_table(result)
    else:
        names = args.names or [manoeuvre_of(path) for path in args.samples]
        unknown = [n for n in names if n not in MANOEUVRES]
        if unknown:
            logger.warning('no threshold for %s (known: %s): scored without passes', unknown, ', '.join(MANOEUVRES))
        result = score_samples(args.samples, names, thresholds, args.min_pass_fraction,
                               key='decoded_occupancy' if args.decoded else 'occupancy')
        table = samples_table(result)
    text = json_text(result, indent=2)
    if args.out:
        atomic_write(args.out, lambda f: f.write((text + '\n').encode()))
    print(table or text)
    return result


if __name__ == '__main__':
    main()
