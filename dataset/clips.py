"""The 4D clip dataset: T consecutive Occ3D keyframes of one nuScenes scene plus the ego condition.

Reads the real layout unchanged (Occ3D-nuScenes, as upstream's `train_1.py` reads it):
    <gts_root>/<scene_name>/<sample_token>/labels.npz
    <info_pkl> = {'infos': {scene_name: [frame dict, ...]}}   frames in time order

Two ways to enumerate clips:
    'random'  : upstream's: `times` items per scene, each starting at a random frame. The start is a
                function of (seed, epoch, index), so a run is reproducible; call `set_epoch` to redraw.
    'sliding' : every start frame of every scene, every `stride` frames (evaluation and step02).

With ``load_ego_pose`` an item also holds 'ego_pose' (T, 3) float32: the ego (x, y, yaw) of every frame in the
first frame's ego coordinates (dataset/poses.py planar_poses), what moves one frame into another's view.

Conditions (per frame of the clip, all float32 (T, 2)):
    'traj_xy'  : ego (x, y) of every frame in the first frame's ego coordinates, metres (the paper's).
    'command'  : the [right, left] bits of the `pose_mode` one-hot (what upstream's step02 saved).
    'delta_xy' : `gt_ego_fut_trajs[0]`, the displacement to the next keyframe in LiDAR coordinates (upstream's
                 `rel_poses`).
"""
import logging
import os
import pickle

import numpy as np
import torch
from torch.utils.data import Dataset

from dataset.constants import NUM_CLASSES
from dataset.occ3d import labels_path, load_labels
from dataset.poses import ego_to_global, planar_poses, traj_xy

CONDITIONS = ('traj_xy', 'command', 'delta_xy')
POSE_KEYS = ('ego2global_translation', 'ego2global_rotation')
# The info keys each condition needs (besides 'token', which every frame needs)
CONDITION_KEYS = {
    'traj_xy': POSE_KEYS,
    'command': ('pose_mode',),
    'delta_xy': ('gt_ego_fut_trajs',),
}
logger = logging.getLogger(__name__)


def load_infos(info_pkl):
    """The `infos` dict (scene name -> frame list) of one info pickle, with a clear error when it is not one."""
    if not os.path.isfile(info_pkl):
        raise FileNotFoundError(f'missing info pickle: {info_pkl} (build it with `python -m dataset.build_infos`)')
    with open(info_pkl, 'rb') as f:
        data = pickle.load(f)
    if not isinstance(data, dict) or 'infos' not in data:
        raise KeyError(f"{info_pkl}: expected a dict with key 'infos' (scene name -> frame list)")
    if not isinstance(data['infos'], dict):
        raise KeyError(f"{info_pkl}: 'infos' must map scene names to frame lists, got {type(data['infos']).__name__}")
    return data['infos']


class OccClipDataset(Dataset):
    """Clips of ``num_frames`` consecutive keyframes.

    Item: dict with
        'occupancy'   (T, 200, 200, 16) uint8 tensor, classes 0..17 (convert with `.long()` on the device)
        'mask_camera' (T, 200, 200, 16) uint8 tensor, only with ``load_camera_mask``
        'ego_pose'    (T, 3) float32 tensor, (x, y, yaw) in the first frame's ego coordinates, only with
                      ``load_ego_pose``
        one (T, 2) float32 tensor per name in ``conditions``, and 'condition' = the first of them
        'scene_name' str, 'start' int (first frame index within the scene)
    """

    def __init__(self, info_pkl, gts_root, num_frames=32, mode='random', times=5, stride=1, seed=0,
                 conditions=('traj_xy',), load_camera_mask=False, load_ego_pose=False):
        if mode not in ('random', 'sliding'):
            raise ValueError(f"mode must be 'random' or 'sliding', got {mode!r}")
        unknown = [c for c in conditions if c not in CONDITIONS]
        if unknown or not conditions:
            raise ValueError(f'conditions must be a non-empty subset of {CONDITIONS}, got {conditions}')
        self.gts_root, self.num_frames, self.mode = gts_root, num_frames, mode
        self.times, self.stride, self.seed, self.epoch = times, stride, seed, 0
        self.conditions, self.load_camera_mask = tuple(conditions), load_camera_mask
        self.load_ego_pose = load_ego_pose

        needed = ('token',) + sum((CONDITION_KEYS[c] for c in conditions), ()) + (POSE_KEYS if load_ego_pose else ())
        self.scenes = []                 # (scene name, tokens, {condition or 'ego_pose': per-scene source array})
        too_short = []
        for scene_name, frames in load_infos(info_pkl).items():
            for index, frame in enumerate(frames):
                missing = [k for k in needed if k not in frame]
                if missing:
                    raise KeyError(f'{info_pkl}: frame {index} of {scene_name} lacks key(s) {missing} (needed '
                                   f'for conditions {self.conditions}{" and load_ego_pose" if load_ego_pose else ""})')
            if len(frames) < num_frames:
                too_short.append(scene_name)
                continue
            self.scenes.append((scene_name, [f['token'] for f in frames],
                                self._scene_sources(frames, scene_name, info_pkl)))
        if too_short:
            logger.warning('%s: skipped %d scene(s) shorter than %d frames: %s', info_pkl, len(too_short),
                           num_frames, ', '.join(too_short[:10]) + (' ...' if len(too_short) > 10 else ''))
        if not self.scenes:
            raise ValueError(f'{info_pkl}: no scene has at least {num_frames} frames')
        if mode == 'sliding':
            self.windows = [(s, start) for s, (_, tokens, _) in enumerate(self.scenes)
                            for start in range(0, len(tokens) - num_frames + 1, stride)]

    def _scene_sources(self, frames, scene_name, info_pkl):
        """Per-scene arrays the conditions (and 'ego_pose') are cut from; a NaN or infinite pose or trajectory is an
        error naming the scene and the frame (it would otherwise turn every later loss into NaN)."""
        sources = {}
        if 'traj_xy' in self.conditions:
            sources['traj_xy'] = ego_to_global(frames)                                      # (N, 4, 4)
        if self.load_ego_pose:
            sources['ego_pose'] = ego_to_global(frames)                                     # (N, 4, 4)
        if 'command' in self.conditions:
            sources['command'] = np.stack([np.asarray(f['pose_mode'], np.float32)[:2] for f in frames])
        if 'delta_xy' in self.conditions:
            sources['delta_xy'] = np.stack([np.asarray(f['gt_ego_fut_trajs'], np.float32)[0] for f in frames])
        for name, source in sources.items():
            bad = ~np.isfinite(source.reshape(len(frames), -1)).all(axis=1)                 # (N,)
            if bad.any():
                what = f'the {name!r} condition' if name in CONDITION_KEYS else f'the {name!r} item'
                raise ValueError(f'{info_pkl}: scene {scene_name} frame {int(bad.argmax())} has a NaN or infinite '
                                 f'value in what {what} is built from ({CONDITION_KEYS.get(name, POSE_KEYS)})')
        return sources

    def class_voxel_counts(self, max_frames=2000):
        """(NUM_CLASSES,) int64 voxel count of every class over the frames of this split's scenes: all of them, or
        every k-th frame (k the smallest that keeps at most ``max_frames``) on a large split."""
        frames = [(scene_name, token) for scene_name, tokens, _ in self.scenes for token in tokens]
        counts = np.zeros(NUM_CLASSES, np.int64)
        for scene_name, token in frames[::-(-len(frames) // max_frames)]:
            semantics = load_labels(labels_path(self.gts_root, scene_name, token))['semantics']
            counts += np.bincount(semantics.ravel(), minlength=NUM_CLASSES)
        return counts

    def set_epoch(self, epoch):
        """Redraw the random start frames (mode 'random'); a no-op for 'sliding'."""
        self.epoch = epoch

    def __len__(self):
        return len(self.scenes) * self.times if self.mode == 'random' else len(self.windows)

    def window(self, index):
        """(scene index, start frame) of item ``index``."""
        if self.mode == 'sliding':
            return self.windows[index]
        scene = index % len(self.scenes)
        num_starts = len(self.scenes[scene][1]) - self.num_frames + 1
        start = np.random.default_rng([self.seed, self.epoch, index]).integers(num_starts)
        return scene, int(start)

    def __getitem__(self, index):
        scene, start = self.window(index)
        scene_name, tokens, sources = self.scenes[scene]
        keys = ('semantics', 'mask_camera') if self.load_camera_mask else ('semantics',)
        frames = [load_labels(labels_path(self.gts_root, scene_name, token), keys)
                  for token in tokens[start:start + self.num_frames]]
        item = {'occupancy': torch.from_numpy(np.stack([f['semantics'] for f in frames])),     # (T, X, Y, Z)
                'scene_name': scene_name, 'start': start}
        if self.load_camera_mask:
            item['mask_camera'] = torch.from_numpy(np.stack([f['mask_camera'] for f in frames]))
        if self.load_ego_pose:
            window = sources['ego_pose'][start:start + self.num_frames]
            item['ego_pose'] = torch.from_numpy(planar_poses(window).astype(np.float32))       # (T, 3)
        for name in self.conditions:
            window = sources[name][start:start + self.num_frames]
            value = traj_xy(window) if name == 'traj_xy' else window
            item[name] = torch.from_numpy(np.asarray(value, np.float32))                        # (T, 2)
        item['condition'] = item[self.conditions[0]]
        return item
