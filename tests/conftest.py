"""Shared fixtures: a tiny dataset written in the real Occ3D + info-pickle layout."""
import os
import pickle

import numpy as np
import pytest
from pyquaternion import Quaternion

from dataset.constants import FREE_CLASS, GRID_SHAPE
from dataset.poses import driving_command, future_deltas, lidar_to_global

REAL_FRAME_DIR = os.path.join(os.path.dirname(__file__), 'data', 'occ3d_sample')
REAL_FRAME_TOKEN = '29796060110c4163b07f06eff4af0753'
LIDAR2EGO_ROTATION = list(Quaternion(axis=[0, 0, 1], angle=-np.pi / 2).elements)   # nuScenes LIDAR_TOP


def make_frames(scene_name, num_frames, speed=1.0, yaw_rate=0.0):
    """Frame dicts of an ego driving at ``speed`` m/frame with ``yaw_rate`` rad/frame from the origin."""
    frames, x, y, yaw = [], 0.0, 0.0, 0.0
    for i in range(num_frames):
        frames.append({
            'token': f'{scene_name}_{i:04d}', 'scene_name': scene_name,
            'frame_idx': i, 'timestamp': 500000 * i,
            'ego2global_translation': [x, y, 0.0],
            'ego2global_rotation': list(Quaternion(axis=[0, 0, 1], angle=yaw).elements),
            'lidar2ego_translation': [0.94, 0.0, 1.84], 'lidar2ego_rotation': LIDAR2EGO_ROTATION, 'cams': {}})
        x, y, yaw = x + speed * np.cos(yaw), y + speed * np.sin(yaw), yaw + yaw_rate
    deltas, masks = future_deltas(lidar_to_global(frames))
    commands = driving_command(deltas, masks)
    for frame, delta, mask, command in zip(frames, deltas, masks, commands):
        frame.update(gt_ego_fut_trajs=delta, gt_ego_fut_masks=mask, pose_mode=command)
    return frames


def write_dataset(root, scenes, seed=0):
    """Write ``scenes`` ({name: frame list}) as gts/<scene>/<token>/labels.npz + one info pkl; frame i of a scene
    holds class (i % 17) in voxel (0, 0, 0) on a background of random ground classes."""
    rng = np.random.default_rng(seed)
    for scene_name, frames in scenes.items():
        for i, frame in enumerate(frames):
            semantics = np.full(GRID_SHAPE, FREE_CLASS, np.uint8)
            semantics[:, :, 2] = rng.integers(11, 15, GRID_SHAPE[:2])
            semantics[0, 0, 0] = i % FREE_CLASS
            directory = os.path.join(root, 'gts', scene_name, frame['token'])
            os.makedirs(directory, exist_ok=True)
            np.savez_compressed(os.path.join(directory, 'labels.npz'), semantics=semantics,
                                mask_lidar=np.ones(GRID_SHAPE, np.uint8),
                                mask_camera=(semantics != FREE_CLASS).astype(np.uint8))
    info_pkl = os.path.join(root, 'infos.pkl')
    with open(info_pkl, 'wb') as f:
        pickle.dump({'infos': scenes, 'metadata': {'version': 'test'}}, f)
    return info_pkl


@pytest.fixture(scope='session')
def tiny_dataset(tmp_path_factory):
    """Two usable scenes (7 and 5 frames; the first turns left) and one of 2 frames, for clips of 4 frames."""
    root = str(tmp_path_factory.mktemp('tiny_occ'))
    scenes = {'scene-a': make_frames('scene-a', 7, speed=2.0, yaw_rate=0.2),
              'scene-b': make_frames('scene-b', 5, speed=1.0),
              'scene-c': make_frames('scene-c', 2)}
    info_pkl = write_dataset(root, scenes)
    return {'info_pkl': info_pkl, 'gts_root': os.path.join(root, 'gts'), 'scenes': scenes}
