"""Build the OccWorld info pickles (`nuscenes_infos_{split}_temporal_v3_scene.pkl`) from a nuScenes dataroot.

Upstream's download links for these pickles are dead, and no public script makes them (upstream's README), so this
module rebuilds them with nuscenes-devkit, in the format dataset/clips.py reads:

    {'infos': {scene_name: [frame dict, ...]}, 'metadata': {'version': version}}

with one frame dict per keyframe sample of the scene, in time order (following sample['next']). The ego future
(`gt_ego_fut_trajs`, `gt_ego_fut_masks`) and the driving command (`pose_mode`) come from dataset/poses.py, the
same functions the synthetic world uses. Splits are nuscenes-devkit's `create_splits_scenes()`:
v1.0-trainval -> train, val; v1.0-mini -> mini_train, mini_val; v1.0-test -> test.

Usage:
    python -m dataset.build_infos --dataroot data/nuscenes --version v1.0-trainval --out data/
    python -m dataset.build_infos --dataroot data/nuscenes --version v1.0-trainval --out data/ \
        --check-gts data/nuscenes/gts        # fail, listing missing files, unless every frame has its labels.npz
"""
import argparse
import logging
import os
import pickle

import numpy as np

from dataset.occ3d import labels_path
from dataset.poses import driving_command, future_deltas, lidar_to_global
from utils.checkpoint import atomic_write

SPLITS_OF_VERSION = {
    'v1.0-trainval': ('train', 'val'),
    'v1.0-mini': ('mini_train', 'mini_val'),
    'v1.0-test': ('test',),
}
LIDAR_CHANNEL = 'LIDAR_TOP'
CAMERA_CHANNELS = ('CAM_FRONT', 'CAM_FRONT_RIGHT', 'CAM_FRONT_LEFT', 'CAM_BACK', 'CAM_BACK_LEFT', 'CAM_BACK_RIGHT')
MISSING_SHOWN = 10          # missing files or scenes named in a message; the rest are counted
logger = logging.getLogger(__name__)


def info_pkl_name(split):
    """File name of the info pickle of ``split``, as OccWorld names it."""
    return f'nuscenes_infos_{split}_temporal_v3_scene.pkl'


def _listing(items):
    shown = ', '.join(items[:MISSING_SHOWN])
    return shown + (f' ... ({len(items) - MISSING_SHOWN} more)' if len(items) > MISSING_SHOWN else '')


def camera_infos(nusc, sample):
    """Camera name -> {'data_path', 'sensor2ego_translation', 'sensor2ego_rotation', 'cam_intrinsic' (3, 3)}
    for the CAM_* channels this keyframe has."""
    cams = {}
    for channel in CAMERA_CHANNELS:
        if channel not in sample['data']:
            continue
        camera_data = nusc.get('sample_data', sample['data'][channel])
        calibration = nusc.get('calibrated_sensor', camera_data['calibrated_sensor_token'])
        cams[channel] = {
            'data_path': nusc.get_sample_data_path(camera_data['token']),
            'sensor2ego_translation': calibration['translation'],
            'sensor2ego_rotation': calibration['rotation'],
            'cam_intrinsic': np.array(calibration['camera_intrinsic']),
        }
    return cams


def frame_info(nusc, sample, scene, frame_idx):
    """The frame dict of one keyframe ``sample`` (without the ego-future keys, which need the whole scene)."""
    if LIDAR_CHANNEL not in sample['data']:
        raise ValueError(f"sample {sample['token']} (frame {frame_idx} of {scene['name']}) has no {LIDAR_CHANNEL} "
                         f"keyframe in sample_data.json; the poses are those of {LIDAR_CHANNEL}")
    lidar_data = nusc.get('sample_data', sample['data'][LIDAR_CHANNEL])
    lidar_calibration = nusc.get('calibrated_sensor', lidar_data['calibrated_sensor_token'])
    ego_pose = nusc.get('ego_pose', lidar_data['ego_pose_token'])
    return {
        'token': sample['token'],
        'scene_token': scene['token'],
        'scene_name': scene['name'],
        'frame_idx': frame_idx,
        'timestamp': sample['timestamp'],
        'ego2global_translation': ego_pose['translation'],
        'ego2global_rotation': ego_pose['rotation'],
        'lidar2ego_translation': lidar_calibration['translation'],
        'lidar2ego_rotation': lidar_calibration['rotation'],
        'lidar_path': nusc.get_sample_data_path(lidar_data['token']),
        'cams': camera_infos(nusc, sample),
    }


def scene_frames(nusc, scene):
    """Frame dicts of every keyframe of ``scene`` (a scene.json record), in time order, with the ego future:
    'gt_ego_fut_trajs' (6, 2) float32, 'gt_ego_fut_masks' (6,) float32 and 'pose_mode' (3,) float32."""
    frames, sample_token = [], scene['first_sample_token']
    while sample_token:
        sample = nusc.get('sample', sample_token)
        frames.append(frame_info(nusc, sample, scene, len(frames)))
        sample_token = sample['next']
    if len(frames) != scene['nbr_samples']:
        raise ValueError(f"{scene['name']}: following sample['next'] from first_sample_token gives {len(frames)} "
                         f"keyframes, but scene.json says nbr_samples = {scene['nbr_samples']}")
    deltas, masks = future_deltas(lidar_to_global(frames))          # (N, 6, 2), (N, 6)
    commands = driving_command(deltas, masks)                        # (N, 3)
    for frame, delta, mask, command in zip(frames, deltas, masks, commands):
        frame.update(gt_ego_fut_trajs=delta, gt_ego_fut_masks=mask, pose_mode=command)
    return frames


def build_infos(dataroot, version):
    """Load the nuScenes tables of ``version`` under ``dataroot`` and build every split's info dict.

    Returns {split: {'infos': {scene_name: [frame dict, ...]}, 'metadata': {'version': version}}}. Scenes of a
    split that the tables lack are logged as a warning; a split none of whose scenes is there is an error.
    """
    from nuscenes.nuscenes import NuScenes
    from nuscenes.utils.splits import create_splits_scenes

    if version not in SPLITS_OF_VERSION:
        raise ValueError(f'version must be one of {sorted(SPLITS_OF_VERSION)}, got {version!r}')
    table_dir = os.path.join(dataroot, version)
    if not os.path.isdir(table_dir):
        raise FileNotFoundError(f'no nuScenes tables for --version {version}: {table_dir} is not a directory '
                                f'(expected {table_dir}/scene.json, sample.json, ...)')
    nusc = NuScenes(version=version, dataroot=dataroot, verbose=False)
    scenes_by_name = {scene['name']: scene for scene in nusc.scene}
    split_scene_names = create_splits_scenes()

    split_infos = {}
    for split in SPLITS_OF_VERSION[version]:
        names = split_scene_names[split]
        present = [name for name in names if name in scenes_by_name]
        absent = [name for name in names if name not in scenes_by_name]
        if not present:
            raise ValueError(f'{table_dir}/scene.json holds none of the {len(names)} scenes of split {split!r}')
        if absent:
            logger.warning('%s: %d of the %d scenes of split %r are not in scene.json and are left out: %s',
                           table_dir, len(absent), len(names), split, _listing(absent))
        infos = {name: scene_frames(nusc, scenes_by_name[name]) for name in present}
        split_infos[split] = {'infos': infos, 'metadata': {'version': version}}
        logger.info('%s: %d scenes, %d keyframes', split, len(infos), sum(len(f) for f in infos.values()))
    return split_infos


def missing_gts(infos, gts_root):
    """Paths of the Occ3D labels files (gts_root/<scene_name>/<token>/labels.npz) that do not exist, for every
    frame of ``infos`` ({scene_name: [frame dict, ...]})."""
    return [path for scene_name, frames in infos.items() for frame in frames
            if not os.path.isfile(path := labels_path(gts_root, scene_name, frame['token']))]


def check_gts(split_infos, gts_root):
    """Raise FileNotFoundError, naming the first missing paths, unless every frame of every split has its
    labels.npz under ``gts_root``."""
    missing = [path for split in split_infos.values() for path in missing_gts(split['infos'], gts_root)]
    if missing:
        total = sum(len(frames) for split in split_infos.values() for frames in split['infos'].values())
        shown = '\n  '.join(missing[:MISSING_SHOWN])
        more = f'\n  ... and {len(missing) - MISSING_SHOWN} more' if len(missing) > MISSING_SHOWN else ''
        raise FileNotFoundError(f'{len(missing)} of {total} Occ3D labels files are missing under {gts_root}:\n  '
                                f'{shown}{more}')


def write_infos(split_infos, out_dir):
    """Write each split's info dict to out_dir/nuscenes_infos_<split>_temporal_v3_scene.pkl (atomically).
    Returns the paths written."""
    paths = []
    for split, info in split_infos.items():
        path = os.path.join(out_dir, info_pkl_name(split))
        atomic_write(path, lambda f, info=info: pickle.dump(info, f, protocol=pickle.HIGHEST_PROTOCOL))
        paths.append(path)
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description='Build the OccWorld info pickles from a nuScenes dataroot.')
    parser.add_argument('--dataroot', required=True, help='nuScenes root holding <version>/scene.json etc.')
    parser.add_argument('--version', default='v1.0-trainval', choices=sorted(SPLITS_OF_VERSION))
    parser.add_argument('--out', required=True, help='directory for the info pickles')
    parser.add_argument('--check-gts', default=None, metavar='DIR',
                        help='fail unless DIR/<scene_name>/<token>/labels.npz exists for every frame')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')

    split_infos = build_infos(args.dataroot, args.version)
    if args.check_gts is not None:
        # Checked before writing, so a failed check leaves no pickle behind.
        check_gts(split_infos, args.check_gts)
        logger.info('every frame has its labels.npz under %s', args.check_gts)
    for path in write_infos(split_infos, args.out):
        logger.info('wrote %s', path)


if __name__ == '__main__':
    main()
