"""Moving occupancy frames by the known ego motion (dataset/ego_warp.py): the warped copy of a static synthetic town
equals what the ego sees from the new pose wherever the old frame saw it, and the dataset's 'ego_pose' drives it."""
import os

import numpy as np
import pytest
import torch

from dataset.clips import OccClipDataset
from dataset.constants import (CLASS_ID, FREE_CLASS, GRID_SHAPE, MOVABLE_CLASSES, STATIC_CLASSES, VOXEL_SIZE)
from dataset.ego_warp import follow_ego_motion, warp_frames
from dataset.poses import ego_to_global, frames_from_path, planar_poses
from dataset.synthetic import render_frame, scene_town
from dataset.synthetic_routes import plan_scene

ARC_RADIUS_M, ARC_STEP_RAD = 10.0, np.radians(12.0)
# Paths in the first pose's ego coordinates, (T, 3) x, y, yaw. The first two move by whole voxels and quarter turns,
# which map voxel centres onto voxel centres, so the warped copy is exact; the arc is not.
PATHS = {
    'straight': np.array([(0.0, 0.0, 0.0), (5 * VOXEL_SIZE, 0.0, 0.0), (10 * VOXEL_SIZE, 0.0, 0.0),
                          (15 * VOXEL_SIZE, 0.0, 0.0)]),
    'quarter_turns': np.array([(0.0, 0.0, 0.0), (15 * VOXEL_SIZE, 15 * VOXEL_SIZE, np.pi / 2),
                               (0.0, 30 * VOXEL_SIZE, np.pi)]),
    'arc': np.stack([ARC_RADIUS_M * np.sin(ARC_STEP_RAD * np.arange(5)),
                     ARC_RADIUS_M * (1 - np.cos(ARC_STEP_RAD * np.arange(5))), ARC_STEP_RAD * np.arange(5)], 1),
}


@pytest.fixture(scope='module')
def town_and_start():
    """The town of synthetic scene 0 and a start pose on its first keyframe, turned 0.3 rad against the town's
    raster so that no motion is whole-cell in the world."""
    plan = plan_scene(0, 0, 8)
    return scene_town(plan), (plan.x[0], plan.y[0], plan.yaw[0] + 0.3)


def in_world(start, path):
    """World x, y, yaw (T,) each of ``path`` (T, 3) given in the ego coordinates of the world pose ``start``."""
    x0, y0, yaw0 = start
    x, y, yaw = path.T
    return x0 + np.cos(yaw0) * x - np.sin(yaw0) * y, y0 + np.sin(yaw0) * x + np.cos(yaw0) * y, yaw0 + yaw


def seen_from(source_pose, target_poses):
    """(N, X, Y, Z) bool: the target voxels whose centre lies inside the source grid (a full frame warped)."""
    full = torch.zeros((1, *GRID_SHAPE), dtype=torch.uint8)
    return warp_frames(full, source_pose[None], target_poses[None])[0] != FREE_CLASS


@pytest.mark.parametrize('path_name', PATHS)
def test_warped_copy_of_a_static_town_is_the_moved_ground_truth(town_and_start, path_name):
    town, start = town_and_start
    x, y, yaw = in_world(start, PATHS[path_name])
    # one instant (time 0) for every pose: the agents stand still, so the whole scene is static
    frames = torch.from_numpy(np.stack([render_frame(town, *pose, 0.0) for pose in zip(x, y, yaw)]))   # (T, X, Y, Z)
    poses = torch.from_numpy(planar_poses(ego_to_global(frames_from_path(x, y, yaw))))                # (T, 3)
    np.testing.assert_allclose(poses.numpy(), PATHS[path_name], atol=1e-9)
    # every frame warped into every frame's view: (source, target, X, Y, Z)
    warped = warp_frames(frames, poses, poses[None].expand(len(poses), -1, -1))
    for source in range(len(frames)):
        seen = seen_from(poses[source], poses)                                          # (T, X, Y, Z)
        assert torch.equal(warped[source, source], frames[source]) and seen[source].all()
        assert torch.all(warped[source][~seen] == FREE_CLASS)                      # what comes into view is free
        for target in set(range(len(frames))) - {source}:
            assert 0.75 < seen[target].float().mean() < 1.0                        # part of the view is new
            agree = warped[source, target] == frames[target]
            if path_name != 'arc':
                assert agree[seen[target]].all(), (source, target, int((~agree[seen[target]]).sum()))
            else:
                # nearest-neighbour resampling of a turned grid: some voxels along edges take a neighbour's class
                occupied = seen[target] & ((frames[target] != FREE_CLASS) | (warped[source, target] != FREE_CLASS))
                assert agree[seen[target]].float().mean() > 0.98 and agree[occupied].float().mean() > 0.9


def test_standing_still_keeps_the_frame_and_movable_classes_can_be_dropped(town_and_start):
    town, start = town_and_start
    frame = torch.from_numpy(render_frame(town, *start, 0.0))[None]                 # (1, X, Y, Z)
    frame[0, 120:125, 90:95, 1:4] = CLASS_ID['car']                                  # a car in front of the ego
    still = torch.zeros(1, 2, 3)
    assert torch.equal(warp_frames(frame, still[:, 0], still)[0, 1], frame[0])
    dropped = warp_frames(frame, still[:, 0], still, keep_movable=False)[0, 0]
    movable = torch.isin(frame[0], torch.tensor(MOVABLE_CLASSES))
    assert movable.any() and torch.all(dropped[movable] == FREE_CLASS)
    assert torch.equal(dropped[~movable], frame[0][~movable])


def test_a_dataset_clip_is_warped_by_its_ego_pose(world):
    dataset = OccClipDataset(os.path.join(world, 'nuscenes_infos_val_temporal_v3_scene.pkl'),
                             os.path.join(world, 'nuscenes', 'gts'), num_frames=4, mode='sliding', stride=4,
                             load_ego_pose=True)
    item = dataset[0]
    poses, clip = item['ego_pose'], item['occupancy']                                # (T, 3), (T, X, Y, Z)
    assert poses.shape == (4, 3) and poses.dtype == torch.float32 and torch.all(poses[0] == 0)
    np.testing.assert_allclose(poses[:, :2].numpy(), item['traj_xy'].numpy(), atol=1e-6)
    assert poses[-1, :2].norm() > 2 * VOXEL_SIZE                                     # the ego moves
    warped = warp_frames(clip[:1], poses[:1], poses[None])[0]
    seen = seen_from(poses[0], poses)
    for t in range(1, len(clip)):
        # static voxels of the frame that the warped copy saw (agents drive on, so they are left out)
        static = seen[t] & torch.isin(clip[t], torch.tensor(STATIC_CLASSES))
        warped_agree = (warped[t] == clip[t])[static].float().mean()
        copied_agree = (clip[0] == clip[t])[static].float().mean()
        assert warped_agree > 0.9 and warped_agree > copied_agree + 0.1, (t, warped_agree, copied_agree)


def test_seen_mask_marks_the_columns_that_came_into_view():
    """15 voxels forward: the last 15 rows of the new view were ahead of the old grid, everything else was seen;
    the mask is what warping a frame with no free voxel leaves non-free."""
    frames = torch.randint(0, FREE_CLASS, (1, *GRID_SHAPE), dtype=torch.uint8)
    poses = torch.from_numpy(PATHS['straight'][None])                                  # (1, 4, 3)
    warped, seen = warp_frames(frames, poses[:, 0], poses, return_seen=True)
    assert seen.shape == (1, 4, *GRID_SHAPE[:2]) and seen.dtype == torch.bool
    assert seen[0, 3, :-15].all() and not seen[0, 3, -15:].any()
    assert torch.equal(seen, (warped != FREE_CLASS).all(-1))
    assert torch.equal(warped, warp_frames(frames, poses[:, 0], poses))


def test_bad_input_is_refused():
    frames = torch.zeros((2, *GRID_SHAPE), dtype=torch.uint8)
    with pytest.raises(ValueError, match=r'frames must be a tensor \(B, 200, 200, 16\), got \(2, 100, 200, 16\)'):
        warp_frames(frames[:, :100], torch.zeros(2, 3), torch.zeros(2, 1, 3))
    with pytest.raises(ValueError, match='frames must be a tensor .* got ndarray'):
        warp_frames(frames.numpy(), torch.zeros(2, 3), torch.zeros(2, 1, 3))
    with pytest.raises(ValueError, match='integer class ids'):
        warp_frames(frames.float(), torch.zeros(2, 3), torch.zeros(2, 1, 3))
    with pytest.raises(ValueError, match=r'source_poses must be \(B=2, 3\) and target_poses \(B=2, N, 3\)'):
        warp_frames(frames, torch.zeros(2, 3), torch.zeros(2, 3))


def test_follow_ego_motion_moves_the_first_frame_along_the_path_and_keeps_the_rest(town_and_start):
    """A 'generated' clip of frame 0 of the town followed by noise: the composed frames show the town as seen from
    each pose wherever frame 0 saw it, the noise where the view is new (then moved on with the ego), and the noise's
    movable voxels."""
    town, start = town_and_start
    speed = 7.5 * VOXEL_SIZE                  # 3 m per frame: half a voxel off the grid every frame
    path = np.stack([speed * np.arange(16), np.zeros(16), np.zeros(16)], 1)
    x, y, yaw = in_world(start, path)
    truth = torch.from_numpy(np.stack([render_frame(town, *pose, 0.0) for pose in zip(x, y, yaw)]))   # (T, X, Y, Z)
    noise = torch.randint(0, len(STATIC_CLASSES), truth.shape, generator=torch.Generator().manual_seed(0))
    generated = torch.cat([truth[:1], torch.tensor(STATIC_CLASSES)[noise[1:]].to(torch.uint8)])
    car = (slice(100, 110), slice(95, 105), slice(1, 4))
    generated[5][car] = CLASS_ID['car']

    composed = follow_ego_motion(generated, torch.from_numpy(path))
    assert composed.shape == truth.shape and composed.dtype == torch.uint8
    assert torch.equal(composed[0], truth[0])
    assert torch.all(composed[5][car] == CLASS_ID['car'])                        # the clip's movable voxels stay
    for t in (1, 8, 15):
        seen = seen_from(torch.from_numpy(path[0]), torch.from_numpy(path[t:t + 1]))[0, ..., 0]   # (X, Y)
        new = ~seen_from(torch.from_numpy(path[t - 1]), torch.from_numpy(path[t:t + 1]))[0, ..., 0]
        assert torch.equal(composed[t][new], generated[t][new])                 # new columns: the clip's own
        if t == 8:                        # columns that came into view after frame 0 (the anchor until frame 14):
            later = ~seen & ~new          # those of the composed frame before, moved on
            moved = warp_frames(composed[t - 1][None], torch.from_numpy(path[t - 1:t]),
                                torch.from_numpy(path[None, t:t + 1]), keep_movable=False)[0, 0]
            assert later.any() and torch.equal(composed[t][later], moved[later])
        static = seen[..., None] & ~torch.isin(truth[t], torch.tensor(MOVABLE_CLASSES))   # the town's agents drop out
        agree = (composed[t] == truth[t])[static].float().mean()
        assert agree > 0.99, (t, agree)

    # per-frame anchors (a resampling every frame) let the half-voxel rounding add up to a visible drift
    chained = follow_ego_motion(generated, torch.from_numpy(path), min_anchor_view=1.0)
    seen = seen_from(torch.from_numpy(path[0]), torch.from_numpy(path[15:]))[0, ..., 0]
    static = seen[..., None] & ~torch.isin(truth[15], torch.tensor(MOVABLE_CLASSES))
    # (measured: 0.91 chained against 0.997 anchored)
    assert (chained[15] == truth[15])[static].float().mean() < (composed[15] == truth[15])[static].float().mean() - 0.05


def test_follow_ego_motion_refuses_bad_input():
    clip = torch.zeros((3, *GRID_SHAPE), dtype=torch.uint8)
    with pytest.raises(ValueError, match=r'clip must be a tensor \(T, 200, 200, 16\), got \(3, 200, 16\)'):
        follow_ego_motion(clip[:, 0], torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r'poses must be \(T=3, 3\)'):
        follow_ego_motion(clip, torch.zeros(2, 3))
