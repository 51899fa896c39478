"""Ego and LiDAR poses of a scene, and the trajectory quantities derived from them.

Conventions (nuScenes): ``ego2global_*`` and ``lidar2ego_*`` are a translation (3,) in metres and a
rotation quaternion (w, x, y, z). The ego frame is x forward, y left, z up; LIDAR_TOP is x right,
y forward, z up. Every function here works on a whole scene at once, frames in time order.
"""
import numpy as np
from pyquaternion import Quaternion

FUTURE_STEPS = 6          # gt_ego_fut_trajs covers the next 6 keyframes (3 s), as in VAD's converter
COMMAND_OFFSET_M = 2.0    # lateral offset 3 s ahead that makes a turn command (VAD's convention)


def pose_matrix(translation, rotation):
    """4 x 4 homogeneous transform from a translation (3,) and a quaternion (w, x, y, z)."""
    matrix = np.eye(4)
    matrix[:3, :3] = Quaternion(rotation).rotation_matrix
    matrix[:3, 3] = translation
    return matrix


def ego_to_global(frames):
    """(N, 4, 4) ego-to-global transforms of a list of frame dicts."""
    return np.stack([pose_matrix(f['ego2global_translation'], f['ego2global_rotation']) for f in frames])


def lidar_to_global(frames):
    """(N, 4, 4) LiDAR-to-global transforms of a list of frame dicts."""
    lidar2ego = np.stack([pose_matrix(f['lidar2ego_translation'], f['lidar2ego_rotation']) for f in frames])
    return ego_to_global(frames) @ lidar2ego


def positions_in_frame(poses, reference):
    """Origins of ``poses`` (N, 4, 4) expressed in the frame of the single pose ``reference`` (4, 4): (N, 3)."""
    return (np.linalg.inv(reference) @ poses[:, :, 3].T).T[:, :3]


def traj_xy(ego2global):
    """Ego (x, y) of every frame in the first frame's ego coordinates, metres: (N, 2)."""
    return positions_in_frame(ego2global, ego2global[0])[:, :2]


def planar_poses(ego2global):
    """Ego (x, y, yaw) of every frame in the first frame's ego coordinates: (N, 3), metres and radians (yaw counter-
    clockwise, in (-pi, pi]). z, roll and pitch are dropped: each occupancy frame is in its own ego frame, so only the
    planar motion moves it. ``planar_poses(m)[:, :2]`` is ``traj_xy(m)``; for frame dicts pass ``ego_to_global``."""
    relative = np.linalg.inv(ego2global[0]) @ ego2global                           # (N, 4, 4)
    yaw = np.arctan2(relative[:, 1, 0], relative[:, 0, 0])                         # heading of the ego's x axis
    return np.concatenate([relative[:, :2, 3], yaw[:, None]], axis=1)


def future_deltas(lidar2global, steps=FUTURE_STEPS):
    """VAD's ``gt_ego_fut_trajs``: per-step (x, y) displacements of the LiDAR origin over the next
    ``steps`` keyframes, in each frame's own LiDAR coordinates.

    Returns deltas (N, steps, 2) float32 and a validity mask (N, steps) float32; steps past the end of
    the scene are zero and masked out.
    """
    num_frames = len(lidar2global)
    deltas = np.zeros((num_frames, steps, 2), np.float32)
    mask = np.zeros((num_frames, steps), np.float32)
    for i in range(num_frames):
        future = lidar2global[i + 1:i + 1 + steps]
        if len(future) == 0:
            continue
        path = positions_in_frame(future, lidar2global[i])[:, :2]              # (k, 2) cumulative
        deltas[i, :len(path)] = np.diff(np.concatenate([np.zeros((1, 2)), path]), axis=0)
        mask[i, :len(path)] = 1
    return deltas, mask


def driving_command(deltas, mask):
    """VAD's ``gt_ego_fut_cmd``, stored by the OccWorld pkls as ``pose_mode``: a one-hot (N, 3) over
    (right, left, straight) from the lateral LiDAR-frame offset reached over the valid future steps."""
    lateral = (deltas[..., 0] * mask).sum(axis=1)                                 # (N,) metres, + = right
    command = np.zeros((len(deltas), 3), np.float32)
    command[lateral >= COMMAND_OFFSET_M, 0] = 1
    command[lateral <= -COMMAND_OFFSET_M, 1] = 1
    command[np.abs(lateral) < COMMAND_OFFSET_M, 2] = 1
    return command


# nuScenes LIDAR_TOP mounting (calibrated_sensor of the trainval split, rounded): 0.94 m ahead of the rear axle,
# 1.84 m up, rotated -90 deg about z so that LiDAR x points to the ego's right and LiDAR y forward.
LIDAR2EGO_TRANSLATION = (0.943713, 0.0, 1.84023)
LIDAR2EGO_ROTATION = tuple(Quaternion(axis=(0.0, 0.0, 1.0), angle=-np.pi / 2).elements)


def frames_from_path(x, y, yaw):
    """Minimal frame dicts (ego and LiDAR poses only) of an ego at planar poses x, y, yaw (N,) in world metres."""
    return [{'ego2global_translation': [float(xi), float(yi), 0.0],
             'ego2global_rotation': list(Quaternion(axis=(0.0, 0.0, 1.0), angle=float(a)).elements),
             'lidar2ego_translation': list(LIDAR2EGO_TRANSLATION), 'lidar2ego_rotation': list(LIDAR2EGO_ROTATION)}
            for xi, yi, a in zip(x, y, yaw)]


def conditions_of(frames):
    """Every condition variant of the dataset (dataset/clips.py) for a list of frames: dict name -> (N, 2)."""
    deltas, mask = future_deltas(lidar_to_global(frames))
    return {'traj_xy': traj_xy(ego_to_global(frames)).astype(np.float32),
            'command': driving_command(deltas, mask)[:, :2],
            'delta_xy': deltas[:, 0]}
