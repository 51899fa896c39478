"""Move occupancy frames into the view of other ego poses by the known planar ego motion: the warped copy that
evaluation/forecast.py reports as a baseline, a way to show a forecaster the past in a future frame's coordinates,
and (follow_ego_motion) generated clips whose static voxels move exactly as their trajectory says (sample.py
--voxel-warp).

Every frame is in its own ego coordinates (x forward, y left; dataset/constants.py). A voxel of the target view
takes the class of the source voxel that contains its centre, in the same height slab (nearest neighbour; z, roll
and pitch are ignored, as in evaluation/ego_motion.py). A target voxel whose centre lies outside the source grid
has not been seen and is free (FREE_CLASS): it is ground, a wall or a car that came into view, which a copy cannot
know. Everything is moved rigidly, movable classes (MOVABLE_CLASSES: vehicles, cyclists, pedestrians, 'others')
included: parked vehicles then stay where they are, and moving ones stay where they were last seen. Dropping
movable classes instead (``keep_movable=False``) costs 2.5-3.5 IoU and 16-20 mIoU on the synthetic val clips
(docs/evaluation.md).
"""
import torch

from dataset.constants import FREE_CLASS, GRID_SHAPE, MOVABLE_CLASSES, POINT_CLOUD_RANGE, VOXEL_SIZE, voxel_centres

MIN_ANCHOR_VIEW = 0.5    # follow_ego_motion moves its anchor on once it sees less than this fraction of a frame


def warp_frames(frames, source_poses, target_poses, keep_movable=True, return_seen=False):
    """The frames as seen from other poses of the ego.

    Args:
        frames: (B, X, Y, Z) integer class ids, frame b seen from source_poses[b].
        source_poses: (B, 3) ego (x, y, yaw) of each frame, metres and radians.
        target_poses: (B, N, 3) the N poses to view frame b from, in the same coordinates as source_poses[b]
            (e.g. a clip's 'ego_pose', dataset/clips.py).
        keep_movable: move movable classes with the rest (True) or make them free (False).
        return_seen: also return where the source saw: (B, N, X, Y) bool, False where a column came into view.
    Returns (B, N, X, Y, Z), the dtype and device of ``frames`` (and the seen mask with ``return_seen``).
    """
    if not isinstance(frames, torch.Tensor) or frames.dim() != 4 or tuple(frames.shape[1:]) != GRID_SHAPE:
        raise ValueError(f'frames must be a tensor (B, {", ".join(map(str, GRID_SHAPE))}), got '
                         f'{tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__}')
    if frames.is_floating_point():
        raise ValueError(f'frames must hold integer class ids, got dtype {frames.dtype}')
    device, batch = frames.device, len(frames)
    # float64: a whole-voxel motion must map voxel centres onto voxel centres exactly
    source = torch.as_tensor(source_poses, dtype=torch.float64, device=device)
    target = torch.as_tensor(target_poses, dtype=torch.float64, device=device)
    if source.shape != (batch, 3) or target.dim() != 3 or target.shape[0] != batch or target.shape[2] != 3:
        raise ValueError(f'source_poses must be (B={batch}, 3) and target_poses (B={batch}, N, 3) (x, y, yaw), got '
                         f'{tuple(source.shape)} and {tuple(target.shape)}')
    if not keep_movable:
        movable = torch.isin(frames, torch.tensor(MOVABLE_CLASSES, device=device))
        frames = frames.masked_fill(movable, FREE_CLASS)

    # A target voxel centre p (target ego coordinates) is at q = R(yaw_t - yaw_s) p + R(-yaw_s) (xy_t - xy_s) in the
    # source's ego coordinates.
    source_yaw = source[:, None, 2]                                                    # (B, 1)
    turn = target[..., 2] - source_yaw                                                 # (B, N)
    shift = target[..., :2] - source[:, None, :2]                                      # (B, N, 2)
    offset_x = torch.cos(source_yaw) * shift[..., 0] + torch.sin(source_yaw) * shift[..., 1]
    offset_y = -torch.sin(source_yaw) * shift[..., 0] + torch.cos(source_yaw) * shift[..., 1]
    centre_x = torch.as_tensor(voxel_centres(0), dtype=torch.float64, device=device)[:, None]     # (X, 1)
    centre_y = torch.as_tensor(voxel_centres(1), dtype=torch.float64, device=device)[None, :]     # (1, Y)
    cos, sin = torch.cos(turn)[..., None, None], torch.sin(turn)[..., None, None]                 # (B, N, 1, 1)
    q_x = cos * centre_x - sin * centre_y + offset_x[..., None, None]                  # (B, N, X, Y)
    q_y = sin * centre_x + cos * centre_y + offset_y[..., None, None]
    row = torch.floor((q_x - POINT_CLOUD_RANGE[0]) / VOXEL_SIZE).long()
    col = torch.floor((q_y - POINT_CLOUD_RANGE[1]) / VOXEL_SIZE).long()
    seen = (row >= 0) & (row < GRID_SHAPE[0]) & (col >= 0) & (col < GRID_SHAPE[1])   # (B, N, X, Y)

    # gather whole columns: every slab of the target column comes from the same source column
    column = row.clamp(0, GRID_SHAPE[0] - 1) * GRID_SHAPE[1] + col.clamp(0, GRID_SHAPE[1] - 1)   # (B, N, X, Y)
    columns = frames.reshape(batch, GRID_SHAPE[0] * GRID_SHAPE[1], GRID_SHAPE[2])      # (B, X * Y, Z)
    clip = torch.arange(batch, device=device)[:, None, None, None]
    moved = columns[clip, column]                                                      # (B, N, X, Y, Z)
    moved = moved.masked_fill(~seen[..., None], FREE_CLASS)
    return (moved, seen) if return_seen else moved


def follow_ego_motion(clip, poses, min_anchor_view=MIN_ANCHOR_VIEW):
    """A clip whose static voxels follow its ego poses exactly: the static world of a generated clip made
    consistent with the trajectory it was asked to follow, the rest left to the generator.

    Frame 0 is kept. Every later frame t takes the static voxels of the anchor frame moved into its view
    (warp_frames with movable classes made free) wherever the anchor saw the column; elsewhere those of the composed
    frame t - 1, wherever that saw the column (what came into view after the anchor stays where it first appeared);
    its own voxels in the columns that nothing before saw, and wherever it holds a movable class (vehicles, people
    and 'others' come from the clip, so they may move). The anchor is frame 0, then the composed frame t - 1 once the
    anchor saw less than ``min_anchor_view`` of frame t's columns. Most voxels are resampled once per anchor rather
    than once per frame, so nearest-neighbour rounding (half a voxel at 3 m per frame) cannot add up over a long clip.

    Args:
        clip: (T, X, Y, Z) integer class ids, frame t seen from poses[t].
        poses: (T, 3) ego (x, y, yaw) of every frame in one frame's coordinates, metres and radians.
    Returns (T, X, Y, Z), the dtype and device of ``clip``.
    """
    if not isinstance(clip, torch.Tensor) or clip.dim() != 4 or tuple(clip.shape[1:]) != GRID_SHAPE:
        raise ValueError(f'clip must be a tensor (T, {", ".join(map(str, GRID_SHAPE))}), got '
                         f'{tuple(clip.shape) if isinstance(clip, torch.Tensor) else type(clip).__name__}')
    poses = torch.as_tensor(poses, dtype=torch.float64, device=clip.device)
    if poses.shape != (len(clip), 3):
        raise ValueError(f'poses must be (T={len(clip)}, 3) (x, y, yaw per frame), got {tuple(poses.shape)}')
    movable = torch.tensor(MOVABLE_CLASSES, device=clip.device)
    composed, anchor = [clip[0]], 0

    def in_view_of(source, t):               # frame source's static voxels in frame t's view: (X, Y, Z), (X, Y, 1)
        moved, seen = warp_frames(composed[source][None], poses[source][None], poses[t][None, None],
                                  keep_movable=False, return_seen=True)
        return moved[0, 0], seen[0, 0, ..., None]

    for t in range(1, len(clip)):
        moved, seen = in_view_of(anchor, t)
        if seen.float().mean() < min_anchor_view and anchor < t - 1:
            anchor = t - 1
            moved, seen = in_view_of(anchor, t)
        frame = clip[t]
        if anchor < t - 1:
            before, seen_before = in_view_of(t - 1, t)
            frame = torch.where(seen_before, before, frame)
        frame = torch.where(seen, moved, frame)                                              # (X, Y, Z)
        composed.append(torch.where(torch.isin(clip[t], movable), clip[t], frame))
    return torch.stack(composed)
