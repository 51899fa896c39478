"""Pose conventions and the trajectory quantities derived from them, against hand-computed answers."""
import numpy as np
import pytest

from dataset.poses import (conditions_of, driving_command, ego_to_global, frames_from_path, future_deltas,
                           lidar_to_global, planar_poses, traj_xy)
from dataset.constants import KEYFRAME_HZ
from dataset.trajectories import MAX_TURN_RATE, PRESETS, preset_path
from model.rollout import preset_window_conditions


def test_lidar_frame_is_x_right_y_forward():
    frames = frames_from_path([0.0, 2.0], [0.0, 0.0], [0.0, 0.0])         # 2 m straight ahead (ego +x)
    deltas, mask = future_deltas(lidar_to_global(frames), steps=3)
    assert np.allclose(deltas[0], [[0, 2], [0, 0], [0, 0]], atol=1e-6)    # forward is LiDAR +y
    assert mask[0].tolist() == [1, 0, 0] and mask[1].tolist() == [0, 0, 0]


def test_traj_xy_rotates_into_the_first_frame():
    # facing +y in the world, driving 1 m per frame: the path is straight ahead in ego coordinates
    frames = frames_from_path([5.0, 5.0, 5.0], [1.0, 2.0, 3.0], [np.pi / 2] * 3)
    assert np.allclose(traj_xy(ego_to_global(frames)), [[0, 0], [1, 0], [2, 0]], atol=1e-6)


def test_planar_poses_are_relative_to_the_first_frame():
    # facing +y in the world, then turned left by 90 degrees after 1 m: in ego terms 1 m ahead, heading +y
    frames = frames_from_path([5.0, 5.0, 4.0], [1.0, 2.0, 2.0], [np.pi / 2, np.pi, np.pi])
    matrices = ego_to_global(frames)
    poses = planar_poses(matrices)
    assert np.allclose(poses, [[0, 0, 0], [1, 0, np.pi / 2], [1, 1, np.pi / 2]], atol=1e-6)
    assert np.allclose(poses[:, :2], traj_xy(matrices))


@pytest.mark.parametrize('lateral, expected', [(3.0, [1, 0, 0]), (-3.0, [0, 1, 0]), (1.0, [0, 0, 1])])
def test_driving_command_thresholds(lateral, expected):
    deltas = np.zeros((1, 6, 2), np.float32)
    deltas[0, :, 0] = lateral / 6                                          # LiDAR x is the ego's right
    assert driving_command(deltas, np.ones((1, 6), np.float32))[0].tolist() == expected


def preset_condition(name, num_frames, condition='traj_xy'):
    """The condition sample.py gives a preset clip (one window, in the dataset's units)."""
    return preset_window_conditions(name, num_frames=num_frames, starts=[0], condition=condition)[0]


def test_presets_move_the_way_their_names_say():
    for name in PRESETS:
        x, y, yaw = preset_path(name, 32)
        traj = preset_condition(name, 32)
        assert traj.shape == (32, 2) and traj.dtype == np.float32
        assert np.allclose(traj, np.stack([x, y], 1), atol=1e-5)           # the path starts at the origin heading +x
    assert np.allclose(preset_condition('stop', 32), 0)
    straight, left, right = (preset_condition(n, 32) for n in ('straight', 'left', 'right'))
    assert np.allclose(straight[:, 1], 0) and np.allclose(np.diff(straight[:, 0]), 3.0)   # 6 m/s at 2 Hz
    assert left[-1, 1] > 20 and right[-1, 1] < -20 and np.allclose(left[:, 0], right[:, 0])
    assert np.isclose(preset_path('left', 32)[2][-1], np.pi / 2)           # a 90-degree turn
    # short clips turn no faster than MAX_TURN_RATE, finishing the turn past the clip's end if need be
    for frames in (4, 8, 12, 16):
        yaw = preset_path('left', frames, extra_frames=8)[2]
        assert np.diff(yaw).max() <= MAX_TURN_RATE / KEYFRAME_HZ + 1e-9 and np.isclose(yaw[-1], np.pi / 2)
    assert np.isclose(preset_path('left', 8)[2][-1], np.pi / 2)                # 7 steps of 12.9 deg
    assert np.allclose(preset_path('left', 12)[2][:3], 0) and np.isclose(preset_path('left', 12)[2][-1], np.pi / 2)
    commands = preset_condition('left', 32, 'command')
    assert commands[:, 1].any() and not commands[:, 0].any()               # [right, left]: left only


def test_conditions_of_matches_the_dataset_definitions():
    frames = frames_from_path(*preset_path('right', 16, extra_frames=6))
    conditions = conditions_of(frames)
    deltas, _ = future_deltas(lidar_to_global(frames))
    assert np.allclose(conditions['delta_xy'], deltas[:, 0])
    assert np.allclose(conditions['traj_xy'], traj_xy(ego_to_global(frames)))
