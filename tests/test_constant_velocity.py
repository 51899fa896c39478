"""The constant-velocity copy (evaluation/constant_velocity.py): agents that move at constant velocity through a
static world are forecast exactly wherever the last context frame saw, a parked row that repeats stays parked, and
agents the earlier frames cannot vouch for stand still, as in the warped copy."""
import numpy as np
import pytest
import torch

from dataset.constants import CLASS_ID, FREE_CLASS, GRID_SHAPE, VOXEL_SIZE, voxel_centres
from dataset.ego_warp import warp_frames
from evaluation.constant_velocity import constant_velocity_copy, displacements

WORLD = 600              # world raster cells per side, centred on the world origin
CONTEXT, FUTURE = 4, [5, 7, 9]
CAR = (11, 5, 3)         # footprint along the world axes (cells) and height (slabs) of a car driving along x


def world_at(step, moving):
    """The world raster (WORLD, WORLD, Z) at keyframe ``step``: road everywhere, a building, a parked row of cars
    2.8 m apart (5 cells wide, gaps of 2: moving by 2.8 m per keyframe along the row would fit the earlier frames as
    well as standing still) and the ``moving`` agents, each (class, u0, v0, du, dv, size): a box of
    ``size`` (cells along u, v, slabs) whose corner is at (u0 + step du, v0 + step dv)."""
    world = np.full((WORLD, WORLD, GRID_SHAPE[2]), FREE_CLASS, np.uint8)
    world[..., 0] = CLASS_ID['driveable_surface']
    world[360:380, 250:290, 1:8] = CLASS_ID['manmade']
    for u in range(240, 430, 7):                  # on to past the last context frame's front edge
        world[u:u + 5, 330:341, 1:4] = CLASS_ID['car']
    for cls, u0, v0, du, dv, (su, sv, sz) in moving:
        u, v = u0 + step * du, v0 + step * dv
        world[u:u + su, v:v + sv, 1:1 + sz] = CLASS_ID[cls]
    return world


def view(world, x, y, yaw):
    """The ego frame (X, Y, Z) at world pose x, y (metres), yaw: each voxel centre's world cell (exact for whole-voxel
    positions and quarter turns)."""
    px, py = voxel_centres(0)[:, None], voxel_centres(1)[None, :]
    wx, wy = x + np.cos(yaw) * px - np.sin(yaw) * py, y + np.sin(yaw) * px + np.cos(yaw) * py
    u = np.floor(wx / VOXEL_SIZE + WORLD / 2).astype(int)
    v = np.floor(wy / VOXEL_SIZE + WORLD / 2).astype(int)
    return world[u, v]


def clip_along(moving, yaw, frames=10, ego_step=5):
    """A clip (1, T, X, Y, Z) uint8 and its poses (1, T, 3) of an ego driving ``ego_step`` voxels per keyframe along
    its heading ``yaw`` (a quarter turn or none) through world_at(t, moving)."""
    xs = [np.round(np.cos(yaw)) * ego_step * t * VOXEL_SIZE for t in range(frames)]
    ys = [np.round(np.sin(yaw)) * ego_step * t * VOXEL_SIZE for t in range(frames)]
    clip = np.stack([view(world_at(t, moving), x, y, yaw) for t, (x, y) in enumerate(zip(xs, ys))])
    poses = np.stack([xs, ys, np.full(frames, yaw)], 1)
    return torch.from_numpy(clip)[None], torch.from_numpy(poses)[None]


# a car overtaking along the road (world +x, 6 voxels = 2.4 m per keyframe) and a pedestrian crossing (world -y)
MOVERS = [('car', 300, 305, 6, 0, CAR), ('pedestrian', 330, 290, 0, -2, (2, 2, 4))]


@pytest.mark.parametrize('yaw', [0.0, np.pi / 2])
def test_agents_at_constant_velocity_are_forecast_exactly_where_the_last_frame_saw(yaw):
    clip, poses = clip_along(MOVERS, yaw)
    prediction = constant_velocity_copy(clip, poses, CONTEXT, FUTURE)                     # (1, H, X, Y, Z)
    warped, seen = warp_frames(clip[:, CONTEXT - 1], poses[:, CONTEXT - 1], poses[:, FUTURE], return_seen=True)
    truth = clip[:, FUTURE]
    assert torch.equal(prediction[seen], truth[seen])
    assert torch.all(prediction[~seen] == FREE_CLASS)                                    # nothing new is made up
    # the warped copy leaves both agents where they were last seen; the parked row it gets right too
    for cls in ('car', 'pedestrian'):
        assert ((warped == CLASS_ID[cls]) != (truth == CLASS_ID[cls])).any()
    assert (truth == CLASS_ID['car']).sum() > 5 * CAR[0] * CAR[1] * CAR[2]               # the parked row is in view


def test_one_context_frame_or_no_movers_is_the_warped_copy():
    clip, poses = clip_along(MOVERS, 0.0)
    warped = warp_frames(clip[:, 0], poses[:, 0], poses[:, [1, 3]])
    assert torch.equal(constant_velocity_copy(clip, poses, 1, [1, 3]), warped)
    still, poses = clip_along([], 0.0)
    assert torch.equal(constant_velocity_copy(still, poses, CONTEXT, FUTURE),
                       warp_frames(still[:, CONTEXT - 1], poses[:, CONTEXT - 1], poses[:, FUTURE]))
    _, seen = constant_velocity_copy(clip, poses, CONTEXT, FUTURE, return_seen=True)     # the warp's own seen mask
    assert torch.equal(seen, warp_frames(clip[:, CONTEXT - 1], poses[:, CONTEXT - 1], poses[:, FUTURE],
                                         return_seen=True)[1])


def test_an_agent_the_earlier_frames_did_not_show_stands_still():
    clip, poses = clip_along(MOVERS, 0.0)
    clip[0, CONTEXT - 1, 150:161, 20:25, 1:4] = CLASS_ID['car']         # on the road, in the last context frame only
    prediction = constant_velocity_copy(clip, poses, CONTEXT, FUTURE)
    warped = warp_frames(clip[:, CONTEXT - 1], poses[:, CONTEXT - 1], poses[:, FUTURE])
    newcomer = torch.zeros_like(warped, dtype=torch.bool)
    for h, frame in enumerate(FUTURE):                          # the ego drives 5 voxels a keyframe along x
        back = 5 * (frame - (CONTEXT - 1))
        newcomer[0, h, 150 - back:161 - back, 20:25, 1:4] = True
    assert torch.all(warped[newcomer] == CLASS_ID['car']) and torch.all(prediction[newcomer] == CLASS_ID['car'])


def test_displacements_are_tried_smallest_first_and_bad_context_is_refused():
    steps = displacements(4.0)                                                            # 4 m/s: 5 voxels a keyframe
    assert tuple(steps[0]) == (0, 0) and len(steps) == 11 ** 2
    assert np.all(np.diff(np.abs(steps).sum(1)) >= 0)
    clip, poses = clip_along([], 0.0, frames=3)
    with pytest.raises(ValueError, match='context_frames'):
        constant_velocity_copy(clip, poses, 0, [1])
    with pytest.raises(ValueError, match='context_frames'):
        constant_velocity_copy(clip, poses, 2, [1])
