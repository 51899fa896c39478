"""Ego-motion recovery by registration of static classes (evaluation/ego_motion.py): known paths through a static world
are recovered to within one voxel, and static consistency is 1 exactly where the motion is exactly known."""
import os

import numpy as np
import pytest

from dataset.constants import CLASS_ID, FREE_CLASS, GRID_SHAPE, POINT_CLOUD_RANGE, VOXEL_SIZE, voxel_centres
from evaluation.ego_motion import (STATIC_CLASSES, bev_images, recover_poses, static_consistency_counts)
from tests.conftest import REAL_FRAME_DIR, REAL_FRAME_TOKEN

WORLD_CELL = 0.2          # metres per world raster cell (half a voxel, like the synthetic town)
WORLD_HALF_SIZE = 80.0


def make_world(seed=0):
    """A static world raster: ground class (W, W) and an object class + height in slabs (W, W) per cell: two
    crossing roads with sidewalks on terrain, random buildings, trees and barriers."""
    rng = np.random.default_rng(seed)
    cells = int(2 * WORLD_HALF_SIZE / WORLD_CELL)
    coords = (np.arange(cells) + 0.5) * WORLD_CELL - WORLD_HALF_SIZE
    x, y = np.meshgrid(coords, coords, indexing='ij')
    ground = np.full((cells, cells), CLASS_ID['terrain'], np.uint8)
    road = (np.abs(y - 3.0) < 6.0) | (np.abs(x - 25.0) < 5.0)
    ground[(np.abs(y - 3.0) < 9.0) | (np.abs(x - 25.0) < 8.0)] = CLASS_ID['sidewalk']
    ground[road] = CLASS_ID['driveable_surface']
    objects = np.full((cells, cells), FREE_CLASS, np.uint8)
    heights = np.zeros((cells, cells), np.int64)
    for _ in range(60):
        cx, cy = rng.uniform(-WORLD_HALF_SIZE, WORLD_HALF_SIZE, 2)
        half = rng.uniform(2.0, 8.0, 2)
        cls = rng.choice([CLASS_ID['manmade'], CLASS_ID['vegetation'], CLASS_ID['barrier']])
        block = (np.abs(x - cx) < half[0]) & (np.abs(y - cy) < half[1]) & ~road
        objects[block], heights[block] = cls, rng.integers(2, GRID_SHAPE[2])
    return ground, objects, heights


def render(world, x, y, yaw, car=None):
    """The (X, Y, Z) uint8 frame of an ego at world pose (x, y, yaw); ``car`` = world (x, y) of a 4 x 2 m car."""
    ground, objects, heights = world
    gx, gy = np.meshgrid(voxel_centres(0), voxel_centres(1), indexing='ij')
    wx, wy = x + np.cos(yaw) * gx - np.sin(yaw) * gy, y + np.sin(yaw) * gx + np.cos(yaw) * gy
    i = np.clip(((wx + WORLD_HALF_SIZE) / WORLD_CELL).astype(int), 0, len(ground) - 1)
    j = np.clip(((wy + WORLD_HALF_SIZE) / WORLD_CELL).astype(int), 0, len(ground) - 1)
    frame = np.full(GRID_SHAPE, FREE_CLASS, np.uint8)
    frame[:, :, 0] = ground[i, j]
    slab = np.arange(GRID_SHAPE[2])
    inside = (slab >= 1) & (slab < heights[i, j][..., None])
    frame[inside] = np.broadcast_to(objects[i, j][..., None], frame.shape)[inside]
    if car is not None:
        box = (np.abs(wx - car[0]) < 2.0) & (np.abs(wy - car[1]) < 1.0)
        frame[box, 1:5] = CLASS_ID['car']
    return frame


def path_poses(num_frames, speed, yaw_rate, start=(0.0, 0.0, 0.0)):
    """World poses (T, 3) of an ego driving ``speed`` metres per frame, turning ``yaw_rate`` radians per frame."""
    poses = [np.array(start, np.float64)]
    for _ in range(num_frames - 1):
        x, y, yaw = poses[-1]
        poses.append(np.array([x + speed * np.cos(yaw), y + speed * np.sin(yaw), yaw + yaw_rate]))
    return np.stack(poses)


def in_first_frame(poses):
    """World poses (T, 3) -> (T, 3) poses in the first pose's frame (the 'traj_xy' convention plus yaw)."""
    x0, y0, yaw0 = poses[0]
    dx, dy = poses[:, 0] - x0, poses[:, 1] - y0
    return np.stack([np.cos(yaw0) * dx + np.sin(yaw0) * dy, -np.sin(yaw0) * dx + np.cos(yaw0) * dy,
                     poses[:, 2] - yaw0], 1)


def moving_clip(world, poses, with_car=True):
    """Frames (T, X, Y, Z) along world ``poses``, with a car driving across the scene (which must be ignored)."""
    return np.stack([render(world, *pose, car=(20.0 - 3.0 * t, -4.0) if with_car else None)
                     for t, pose in enumerate(poses)])


@pytest.fixture(scope='module')
def world():
    return make_world()


def real_frame():
    return np.load(os.path.join(REAL_FRAME_DIR, REAL_FRAME_TOKEN, 'labels.npz'))['semantics']


def view_from(frame, dx, dy, dyaw):
    """``frame`` as seen by an ego moved by (dx, dy, dyaw) in its coordinates; what the frame lacks is free."""
    gx, gy = np.meshgrid(voxel_centres(0), voxel_centres(1), indexing='ij')
    px, py = np.cos(dyaw) * gx - np.sin(dyaw) * gy + dx, np.sin(dyaw) * gx + np.cos(dyaw) * gy + dy
    i = np.floor((px - POINT_CLOUD_RANGE[0]) / VOXEL_SIZE).astype(int)
    j = np.floor((py - POINT_CLOUD_RANGE[1]) / VOXEL_SIZE).astype(int)
    seen = (i >= 0) & (i < GRID_SHAPE[0]) & (j >= 0) & (j < GRID_SHAPE[1])
    moved = np.full(GRID_SHAPE, FREE_CLASS, np.uint8)
    moved[seen] = frame[i[seen], j[seen]]
    return moved


@pytest.mark.parametrize('speed, yaw_rate', [(4.0, 0.0), (3.0, 0.15), (5.0, -0.1)])
def test_known_path_is_recovered_within_one_voxel(world, speed, yaw_rate):
    poses = path_poses(6, speed, yaw_rate, start=(-10.0, 2.0, 0.3))
    recovered = recover_poses(moving_clip(world, poses))
    expected = in_first_frame(poses)
    assert recovered.shape == (6, 3) and recovered.dtype == np.float32
    assert np.abs(recovered[0]).max() == 0
    assert np.linalg.norm(recovered[:, :2] - expected[:, :2], axis=1).max() < VOXEL_SIZE
    assert np.abs(recovered[:, 2] - expected[:, 2]).max() < np.radians(1.0)


def test_standing_still_is_no_motion(world):
    clip = np.repeat(render(world, 0.0, 0.0, 0.0)[None], 3, axis=0)
    assert np.abs(recover_poses(clip)).max() < 1e-3


def test_real_frame_moved_by_a_known_offset_is_registered():
    frame = real_frame()
    for motion in [(2.6, -0.9, 0.0), (-3.1, 1.7, 0.2)]:
        recovered = recover_poses(np.stack([frame, view_from(frame, *motion)]))[1]      # frame 1 in frame 0's terms
        assert np.abs(recovered[:2] - motion[:2]).max() < VOXEL_SIZE / 2
        assert abs(recovered[2] - motion[2]) < np.radians(0.5)


def test_recovered_path_follows_the_traj_convention(world):
    clip = moving_clip(world, path_poses(3, 4.0, 0.0), with_car=False)
    # the ego drives forward (+x of frame 0); reversed in time, the clip drives backwards
    assert recover_poses(clip)[-1, 0] > 7 and recover_poses(clip[::-1])[-1, 0] < -7


def test_bev_images_hold_static_classes_only():
    clip = np.full((1, *GRID_SHAPE), FREE_CLASS, np.uint8)
    clip[0, 10, 20, 3] = CLASS_ID['manmade']
    clip[0, 30, 40, 1] = CLASS_ID['car']
    images = bev_images(clip)
    assert images.sum() == 1 and images[0, :, 10, 20].sum() == 1


def test_static_consistency_is_one_under_the_true_motion(world):
    frame = render(world, 0.0, 0.0, 0.0)
    still = np.repeat(frame[None], 3, axis=0)
    matches, compared = static_consistency_counts(still, np.zeros((3, 3)))
    assert compared == 2 * np.isin(frame, STATIC_CLASSES).sum() and matches == compared
    # whole-voxel moves: every static voxel that stays in view lands on its class exactly
    shifted = np.stack([view_from(frame, 0.0, 0.0, 0.0), view_from(frame, 5 * VOXEL_SIZE, -3 * VOXEL_SIZE, 0.0)])
    matches, compared = static_consistency_counts(shifted, [[0, 0, 0], [5 * VOXEL_SIZE, -3 * VOXEL_SIZE, 0]])
    assert compared > 0 and matches == compared
    # a smooth path under its recovered motion: almost every static voxel
    clip = moving_clip(world, path_poses(4, 3.0, 0.1), with_car=False)
    matches, compared = static_consistency_counts(clip, recover_poses(clip))
    assert matches / compared > 0.9


def test_static_consistency_is_low_for_unrelated_frames():
    rng = np.random.default_rng(0)
    clip = rng.choice(np.array(STATIC_CLASSES, np.uint8), size=(2, *GRID_SHAPE))
    matches, compared = static_consistency_counts(clip, np.zeros((2, 3)))
    assert matches / compared < 0.3


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match='clip must have shape'):
        recover_poses(np.zeros((2, 100, 100, 16), np.uint8))
    with pytest.raises(ValueError, match='uint8'):
        recover_poses(np.zeros((2, *GRID_SHAPE), np.int64))
    with pytest.raises(ValueError, match='poses must have shape'):
        static_consistency_counts(np.zeros((2, *GRID_SHAPE), np.uint8), np.zeros((3, 3)))
