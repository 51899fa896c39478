"""The constant-velocity copy: a model-free forecast that moves the last context frame into each future frame's view
by the known ego motion, as the warped copy does (dataset/ego_warp.py), and moves every agent on at the velocity
that the earlier context frames show. Parked agents stay put and agents seen in one frame only stay where they
were last seen, as in the warped copy.

An agent is a connected BEV component (8-neighbourhood) of one movable class (MOVABLE_CLASSES) in the last context
frame. Its velocity is one whole-voxel displacement d per frame, in the last frame's coordinates. The earlier
context frames, up to MAX_HISTORY of them, are moved into the last frame's view. A displacement fits an earlier
frame, k frames back, by the fraction of the agent's cells c whose place c - k d holds the agent's class. The frame
is widened by one voxel, for the resampling of a turned grid. Only places that frame saw count, and a frame counts
only where it saw at least MIN_OBSERVED of them. A displacement's fit is the least over the frames that count.
- Standing still is tried first: the agent stands still when no earlier frame observed it in place, or when the fit
  of standing still reaches FIT. Parked rows repeat: a row of cars 2.8 m apart fits a displacement of 2.8 m per
  frame as well as it fits standing still.
- Otherwise the agent takes the displacement within MAX_SPEED of the best fit (the smallest among equals) over
  those counted in at least two frames (one when only one earlier frame exists), if that fit reaches FIT; it
  stands still when it does not.

Each agent is then moved by n d voxels at the frame n frames after the last context frame. Its voxels are read at
their own place in the last context frame, so an agent that leaves that frame's grid stays in a view that still
holds it.
"""
import numpy as np
import torch
from scipy import ndimage

from dataset.constants import FREE_CLASS, GRID_SHAPE, KEYFRAME_HZ, MOVABLE_CLASSES, VOXEL_SIZE
from dataset.ego_warp import warp_frames

FIT = 0.8            # fraction of an agent's cells that an earlier frame must hold for a displacement to fit
MIN_OBSERVED = 0.5   # an earlier frame counts for a displacement if it saw at least this fraction of those places
MAX_SPEED = 20.0     # m/s, the fastest agent looked for: 25 voxels per keyframe at 2 Hz
MAX_HISTORY = 3      # earlier context frames used


def displacements(max_speed=MAX_SPEED):
    """Every whole-voxel displacement per keyframe up to ``max_speed`` m/s along each axis, (D, 2) int, smallest
    (L1) first, so (0, 0) is row 0 and the first best match is the smallest."""
    reach = int(np.ceil(max_speed / KEYFRAME_HZ / VOXEL_SIZE))
    steps = np.arange(-reach, reach + 1)
    grid = np.stack(np.meshgrid(steps, steps, indexing='ij'), -1).reshape(-1, 2)
    return grid[np.argsort(np.abs(grid).sum(1), kind='stable')]


def agent_velocity(cells, earlier_class, earlier_seen, offsets):
    """The displacement per keyframe (2,) int of one agent (module docstring).

    Args:
        cells: (n, 2) BEV cells of the agent in the last context frame.
        earlier_class: K' (X + 2P, Y + 2P) bool, padded by P on every side: where the earlier frame k = 1..K' (in
            the last frame's view, widened by one voxel) holds the agent's class.
        earlier_seen: K' (X + 2P, Y + 2P) bool, padded alike: where that frame saw.
        offsets: (D, 2) displacements(), with P >= K' * their largest step.
    """
    pad = (earlier_class[0].shape[0] - GRID_SHAPE[0]) // 2
    fits, counted = [], []
    for k, (holds, seen) in enumerate(zip(earlier_class, earlier_seen), 1):
        places = cells[None] - k * offsets[:, None] + pad                             # (D, n, 2)
        observed = seen[places[..., 0], places[..., 1]]                               # (D, n)
        hits = (holds[places[..., 0], places[..., 1]] & observed).sum(1)
        fits.append(hits / np.maximum(observed.sum(1), 1))
        counted.append(observed.mean(1) >= MIN_OBSERVED)
    fits, counted = np.stack(fits), np.stack(counted)                                 # (K', D)
    fit = np.where(counted, fits, np.inf).min(0)                                      # inf where no frame counts
    still = fit[0]
    if np.isinf(still) or still >= FIT:
        return offsets[0]
    enough = counted.sum(0) >= min(2, len(earlier_class))
    fit = np.where(enough, fit, -1.0)
    fit[0] = -1.0
    best = int(np.argmax(fit))                                                        # the first of the best
    return offsets[best] if fit[best] >= FIT else offsets[0]


def agents_by_velocity(clip, poses, context_frames):
    """The agents of the last context frame of ``clip`` (T, X, Y, Z) uint8 tensor with ``poses`` (T, 3), grouped
    by their displacement per keyframe: {(dx, dy): (X, Y, Z) bool numpy mask of their voxels}."""
    last_index = context_frames - 1
    last = clip[last_index].cpu().numpy()
    history = list(range(last_index - 1, max(last_index - 1 - MAX_HISTORY, -1), -1))  # k = 1, 2, ... frames back
    offsets = displacements()
    pad = int(np.abs(offsets).max()) * max(len(history), 1)
    earlier, earlier_seen = [], []
    if history:
        moved, seen = warp_frames(clip[history], poses[history], poses[last_index].expand(len(history), 1, 3),
                                  return_seen=True)
        earlier = moved[:, 0].cpu().numpy()                                               # (K', X, Y, Z)
        earlier_seen = [np.pad(s, pad) for s in seen[:, 0].cpu().numpy()]
    groups = {}
    for cls in MOVABLE_CLASSES:
        voxels = last == cls                                                              # (X, Y, Z)
        labels, count = ndimage.label(voxels.any(-1), structure=np.ones((3, 3)))
        if not count:
            continue
        holds = [np.pad(ndimage.binary_dilation((frame == cls).any(-1), np.ones((3, 3))), pad) for frame in earlier]
        for agent in range(1, count + 1):
            footprint = labels == agent                                                   # (X, Y)
            velocity = (agent_velocity(np.argwhere(footprint), holds, earlier_seen, offsets) if history
                        else offsets[0])
            key = tuple(int(v) for v in velocity)
            groups[key] = groups.get(key, np.zeros(GRID_SHAPE, bool)) | (footprint[..., None] & voxels)
    return groups


def constant_velocity_copy(clips, poses, context_frames, frames, return_seen=False):
    """The constant-velocity copy (module docstring) of ``frames`` (H frame indices after the context) of clips
    (B, T, X, Y, Z) uint8 with their ego poses (B, T, 3) (the dataset's 'ego_pose'). Returns (B, H, X, Y, Z), the
    dtype and device of ``clips`` (and, with ``return_seen``, where the last context frame saw, (B, H, X, Y) bool, as
    warp_frames gives it). With one context frame every agent stands still: the warped copy."""
    if not 1 <= context_frames <= clips.shape[1] or min(frames) < context_frames:
        raise ValueError(f'need 1 <= context_frames <= {clips.shape[1]} frames of the clips and future frames after '
                         f'them, got context_frames={context_frames}, frames={list(frames)}')
    poses = torch.as_tensor(poses, dtype=torch.float64)
    last_index, frames = context_frames - 1, list(frames)
    ahead = torch.tensor(frames, dtype=torch.float64) - last_index                       # (H,)
    result, seen = [], []
    for clip, pose in zip(clips, poses):
        source = pose[last_index]
        prediction, clip_seen = warp_frames(clip[last_index][None], source[None], pose[frames][None],
                                            keep_movable=False, return_seen=True)
        prediction = prediction[0]
        seen.append(clip_seen[0])
        groups = agents_by_velocity(clip, pose, context_frames)
        if groups:
            last = clip[last_index].cpu().numpy()
            canvases = torch.from_numpy(np.stack([np.where(mask, last, FREE_CLASS)
                                                  for mask in groups.values()])).to(clips)  # (G, X, Y, Z)
            # an agent moved by delta (last-frame metres) is seen from frame t as the unmoved one from a pose
            # moved by -delta, the yaw kept: the source of target voxel q becomes q - delta
            delta = torch.tensor(list(groups), dtype=torch.float64)[:, None] * ahead[:, None] * VOXEL_SIZE
            cos, sin = torch.cos(source[2]), torch.sin(source[2])                      # delta: (G, H, 2) metres
            world = torch.stack([cos * delta[..., 0] - sin * delta[..., 1],
                                 sin * delta[..., 0] + cos * delta[..., 1]], -1)
            targets = pose[frames][None].repeat(len(groups), 1, 1)                           # (G, H, 3)
            targets[..., :2] -= world
            moved = warp_frames(canvases, source[None].expand(len(groups), 3), targets)     # (G, H, X, Y, Z)
            for agents in moved:
                prediction = torch.where(agents != FREE_CLASS, agents, prediction)
        result.append(prediction)
    return (torch.stack(result), torch.stack(seen)) if return_seen else torch.stack(result)
