"""Recover the ego motion of an occupancy clip from the occupancy alone (the trajectory-adherence metric).

Method. Each frame becomes a bird's-eye-view (BEV) image with one channel per group of static classes (1 where a
column holds the group anywhere along z, else 0). Static things keep their world position, so frame t's image is
frame t-1's image moved by the ego's planar motion (dx, dy, dyaw) between the two frames. For t = 1 .. T-1:
  1. coarse search at COARSE_POOL x the voxel size: frame t's image is rotated about the ego origin by every
     candidate yaw (COARSE_YAW_STEP_DEG apart, up to MAX_YAW_STEP_DEG) and cross-correlated with frame t-1's image
     through FFTs (zero-padded, so no wrap-around; partially whitened, so edges rather than large blobs decide);
     the best (yaw, translation) wins, translations limited to MAX_STEP_M;
  2. this motion, put after frame t-1's pose, is refined against a keyframe (frame 0 at first; frame t-1 once
     frame t is KEYFRAME_STEP_M or KEYFRAME_YAW_DEG away from the keyframe) by Gauss-Newton (Lucas-Kanade) on
     Gaussian-blurred images, coarse to fine over REFINE_LEVELS, minimising the squared image difference over what
     both frames see. Registering to a keyframe rather than to the previous frame makes the drift grow with the
     number of keyframes, not of frames (none at all while the ego stands still).
Images are zero-mean and tapered by a radial window (WINDOW_RADII_M) in the correlation, and weighted by it in
the refinement, so that the square edge of the grid, which moves with the ego, does not pull towards "no motion".

Assumptions: planar motion (z, roll and pitch ignored: the grid is in the ego frame); enough static structure
(road edges, kerbs, buildings, vegetation, barriers) within 40 m; at most MAX_STEP_M metres and MAX_YAW_STEP_DEG
degrees between consecutive frames (0.5 s apart). Moving things are left out through their classes (vehicles,
cyclists, pedestrians, 'others'). Nothing about any particular dataset is used but Occ3D's class layout
(dataset/constants.py). A frame with no static voxel, and the frame after it, are taken not to move.

Conventions: x forward, y left, yaw counter-clockwise, metres and radians. ``poses[t] = (x, y, yaw)`` of frame t in
frame 0's ego coordinates, so ``poses[:, :2]`` is the dataset's 'traj_xy' condition (dataset/poses.py traj_xy).
"""
import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F

from dataset.constants import (CLASS_ID, GRID_SHAPE, NUM_CLASSES, POINT_CLOUD_RANGE, STATIC_CLASS_GROUPS,
                               STATIC_CLASSES, VOXEL_SIZE, voxel_centres)

# BEV channels: STATIC_CLASS_GROUPS (dataset/constants.py); movable classes (vehicles, people, 'others') are left out.
MAX_STEP_M = 15.0                # largest translation between consecutive frames (30 m/s at 2 Hz)
MAX_YAW_STEP_DEG = 30.0          # largest yaw change between consecutive frames
COARSE_YAW_STEP_DEG = 2.0
COARSE_POOL = 4                  # the coarse search runs on 4 x 4 voxel cells (1.6 m)
COARSE_FFT_SIZE = 64             # >= grid / COARSE_POOL + the largest shift in cells: no wrap-around
WHITENING = 0.7                  # cross-power spectrum divided by its magnitude ** WHITENING (1 = phase correlation)
WINDOW_RADII_M = (30.0, 40.0)    # radial taper: 1 inside the first radius, cosine down to 0 at the second
REFINE_LEVELS = ((4, 1.0), (2, 1.0))   # (pooling, Gaussian sigma in pooled cells) of the Gauss-Newton passes
REFINE_ITERATIONS = 6              # per level; a converging refinement needs 3 to 4
CONVERGED_M, CONVERGED_RAD = 2e-3, 2e-5   # Gauss-Newton stops at steps below 2 mm and 0.001 degrees
KEYFRAME_STEP_M = 12.0
KEYFRAME_YAW_DEG = 20.0
HALF_EXTENT_M = POINT_CLOUD_RANGE[3]   # the grid spans [-40, 40] m in x and y, centred on the ego


def _check_clip(clip):
    """The clip as a uint8 numpy array (T, X, Y, Z); a clear error for anything else."""
    clip = np.asarray(clip)
    if clip.ndim != 4 or clip.shape[1:] != GRID_SHAPE:
        raise ValueError(f'clip must have shape (T, {", ".join(map(str, GRID_SHAPE))}), got {clip.shape}')
    if clip.dtype != np.uint8:
        raise ValueError(f'clip must be uint8 class ids 0..{NUM_CLASSES - 1}, got dtype {clip.dtype}')
    return clip


def bev_images(clip):
    """Static-class BEV images of a clip (T, X, Y, Z) uint8: (T, C, X, Y) float32 in {0, 1}, C = class groups."""
    clip = _check_clip(clip)
    group_bit = np.zeros(NUM_CLASSES, np.uint8)
    for group, names in enumerate(STATIC_CLASS_GROUPS):
        group_bit[[CLASS_ID[name] for name in names]] = 1 << group
    column_bits = np.bitwise_or.reduce(group_bit[clip], axis=-1)                   # (T, X, Y)
    present = (column_bits[:, None] >> np.arange(len(STATIC_CLASS_GROUPS), dtype=np.uint8)[:, None, None]) & 1
    return torch.from_numpy(present.astype(np.float32))                             # (T, C, X, Y)


def _metric_grid(size):
    """Metric (x, y) centres of a size x size BEV grid spanning the whole 80 m square: (size, size, 2)."""
    centres = (torch.arange(size, dtype=torch.float32) + 0.5) * (2 * HALF_EXTENT_M / size) - HALF_EXTENT_M
    return torch.stack(torch.meshgrid(centres, centres, indexing='ij'), -1)


def _taper(radius):
    """The radial window at metric radii (any shape): 1 inside WINDOW_RADII_M[0], cosine to 0 at [1]."""
    inner, outer = WINDOW_RADII_M
    return 0.5 * (1 + torch.cos(math.pi * ((radius - inner) / (outer - inner)).clamp(0, 1)))


def _sample(images, points):
    """Bilinear samples of ``images`` (N, C, S, S) at metric points (N, H, W, 2) (x, y), zero outside the grid:
    (N, C, H, W)."""
    # grid_sample's last grid axis is (column, row) = (y, x), normalised so that the grid's outer edges are -1, 1
    return F.grid_sample(images, points.flip(-1) / HALF_EXTENT_M, mode='bilinear', padding_mode='zeros',
                         align_corners=False)


def _rotation(yaw):
    """(..., 2, 2) rotation matrices of angles ``yaw`` (...) tensor."""
    cos, sin = torch.cos(yaw), torch.sin(yaw)
    return torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)


def _blur(images, sigma):
    """Separable Gaussian blur of (N, C, S, S) images, ``sigma`` in pixels."""
    radius = max(1, int(3 * sigma + 0.5))
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2)
    taps = taps / taps.sum()
    channels = images.shape[1]
    rows = taps.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    cols = taps.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    images = F.conv2d(F.pad(images, (0, 0, radius, radius), mode='replicate'), rows, groups=channels)
    return F.conv2d(F.pad(images, (radius, radius, 0, 0), mode='replicate'), cols, groups=channels)


class _Pyramid:
    """Per-frame images of a clip at every resolution the registration uses (computed once per clip)."""

    def __init__(self, images):
        self.coarse_size = images.shape[-1] // COARSE_POOL
        pooled = F.avg_pool2d(images, COARSE_POOL)                                   # (T, C, S, S)
        weight = _taper(_metric_grid(self.coarse_size).norm(dim=-1))                 # (S, S)
        mean = (pooled * weight).sum((-2, -1), keepdim=True) / weight.sum()
        self.coarse = (pooled - mean) * weight                                       # zero-mean, windowed
        self.levels = []
        for pool, sigma in REFINE_LEVELS:
            blurred = _blur(F.avg_pool2d(images, pool) if pool > 1 else images, sigma)   # (T, C, S, S)
            cell = 2 * HALF_EXTENT_M / blurred.shape[-1]
            grad_x = torch.gradient(blurred, dim=2)[0] / cell                        # d/dx, per metre
            grad_y = torch.gradient(blurred, dim=3)[0] / cell
            points = _metric_grid(blurred.shape[-1])                                 # (S, S, 2)
            self.levels.append(dict(image=blurred, with_gradients=torch.cat([blurred, grad_x, grad_y], 1),
                                    points=points, weight=_taper(points.norm(dim=-1))))
        self.has_static = images.flatten(1).amax(1) > 0                              # (T,) bool


def _coarse_motion(pyramid, a, b):
    """Coarse motion (dx, dy, dyaw) (3,) of frame b in frame a: exhaustive search over yaws, FFT correlation over
    translations (module docstring, step 1)."""
    size = pyramid.coarse_size
    cell = 2 * HALF_EXTENT_M / size
    yaws = torch.deg2rad(torch.arange(-MAX_YAW_STEP_DEG, MAX_YAW_STEP_DEG + 1e-6, COARSE_YAW_STEP_DEG))  # (K,)
    # frame b rotated by each yaw, J(u) = B(R(yaw)^T u), equals A(u + d) at the true yaw
    points = torch.einsum('kji,xyj->kxyi', _rotation(yaws), _metric_grid(size))    # (K, S, S, 2) = R^T u
    rotated = _sample(pyramid.coarse[b:b + 1].expand(len(yaws), -1, -1, -1), points)   # (K, C, S, S)
    fft_size = (COARSE_FFT_SIZE, COARSE_FFT_SIZE)
    spectrum_a = torch.fft.rfft2(pyramid.coarse[a:a + 1], s=fft_size)               # (1, C, P, P/2+1)
    spectrum_b = torch.fft.rfft2(rotated, s=fft_size)                                # (K, C, P, P/2+1)
    cross = (spectrum_a * spectrum_b.conj()).sum(1)                                  # (K, P, P/2+1)
    correlation = torch.fft.irfft2(cross / (cross.abs() ** WHITENING + 1e-6), s=fft_size)   # (K, P, P)
    # C(s) = sum_u A(u + s) J(u) peaks at s = d; negative shifts wrap to the end of the axis
    shifts = torch.arange(COARSE_FFT_SIZE)
    shifts = torch.where(shifts >= COARSE_FFT_SIZE // 2, shifts - COARSE_FFT_SIZE, shifts)     # (P,) signed
    allowed = shifts.abs() <= MAX_STEP_M / cell
    correlation = correlation.masked_fill(~(allowed[:, None] & allowed[None, :]), -torch.inf)
    k, row, col = np.unravel_index(int(correlation.flatten().argmax()), correlation.shape)
    return torch.tensor([shifts[row] * cell, shifts[col] * cell, yaws[k]], dtype=torch.float32)


def _refine_motion(pyramid, a, b, motion):
    """Gauss-Newton refinement of ``motion`` (dx, dy, dyaw) (3,) of frame b in frame a (module docstring, step 2).

    Minimises sum over frame-a points p of w(p) w(q) |A(p) - B(q)|^2 with q = R(dyaw)^T (p - d), on each level's
    blurred images; w is the radial window, so only what both frames see counts."""
    motion = motion.clone()
    for level in pyramid.levels:
        target, points = level['image'][a], level['points']                         # (C, S, S), (S, S, 2)
        for _ in range(REFINE_ITERATIONS):
            rotation = _rotation(motion[2])                                           # (2, 2)
            q = (points - motion[:2]) @ rotation                                      # (S, S, 2) = R^T (p - d)
            value, grad_x, grad_y = _sample(level['with_gradients'][b:b + 1], q[None])[0].chunk(3)   # (C, S, S)
            weight = level['weight'] * _taper(q.norm(dim=-1))                        # (S, S)
            # dq/dd = -R^T, and dq/dyaw = (q_y, -q_x): the chain rule through B's image gradient
            jacobian = torch.stack([-(grad_x * rotation[0, 0] + grad_y * rotation[0, 1]),
                                    -(grad_x * rotation[1, 0] + grad_y * rotation[1, 1]),
                                    grad_x * q[..., 1] - grad_y * q[..., 0]])         # (3, C, S, S)
            weighted = jacobian * weight
            hessian = torch.einsum('icxy,jcxy->ij', weighted, jacobian).double()
            gradient = torch.einsum('icxy,cxy->i', weighted, value - target).double()
            if hessian.diagonal().min() <= 0:                                         # nothing to align
                break
            step = -torch.linalg.solve(hessian, gradient).float()
            motion = motion + step
            if step[:2].abs().max() < CONVERGED_M and step[2].abs() < CONVERGED_RAD:
                break
    return motion


def _compose(pose, motion):
    """Pose (x, y, yaw) (3,) followed by ``motion`` (dx, dy, dyaw) given in that pose's frame: (3,)."""
    offset = _rotation(pose[2]) @ motion[:2]
    return torch.cat([pose[:2] + offset, pose[2:] + motion[2:]])


def _relative(pose_a, pose_b):
    """Motion (dx, dy, dyaw) (3,) of pose b seen from pose a, both (x, y, yaw) (3,) in one frame."""
    offset = _rotation(pose_a[2]).T @ (pose_b[:2] - pose_a[:2])
    return torch.cat([offset, pose_b[2:] - pose_a[2:]])


@contextlib.contextmanager
def _one_thread():
    """Run torch on one CPU thread: on images this small, handing work to a second thread costs more than it
    saves (a 32-frame clip took 5 times the CPU time with two threads on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def recover_poses(clip):
    """Ego poses of every frame of ``clip`` (T, X, Y, Z) uint8, from its static classes (module docstring).

    Returns (T, 3) float32: x, y (metres) and yaw (radians) of each frame in frame 0's ego coordinates."""
    images = bev_images(clip)
    with _one_thread():
        pyramid = _Pyramid(images)
        poses = [torch.zeros(3)]
        keyframe = 0
        for t in range(1, len(images)):
            if not (pyramid.has_static[t - 1] and pyramid.has_static[t]):
                poses.append(poses[-1])
                continue
            guess = _compose(poses[-1], _coarse_motion(pyramid, t - 1, t))
            from_keyframe = _relative(poses[keyframe], guess)
            far = (from_keyframe[:2].norm() > KEYFRAME_STEP_M
                   or from_keyframe[2].abs() > math.radians(KEYFRAME_YAW_DEG))
            if far or not pyramid.has_static[keyframe]:
                keyframe = t - 1
            motion = _refine_motion(pyramid, keyframe, t, _relative(poses[keyframe], guess))
            poses.append(_compose(poses[keyframe], motion))
    return torch.stack(poses).numpy().astype(np.float32)


def static_consistency_counts(clip, poses):
    """Temporal consistency of the static voxels of ``clip`` (T, X, Y, Z) uint8 under ego poses (T, 3) (x, y, yaw
    in frame 0's coordinates, e.g. from `recover_poses`).

    Every voxel of a static class in frame t is moved into frame t+1 by the relative motion of the two poses and
    compared with the voxel of frame t+1 that contains its centre (same height slab). Voxels that leave the grid
    are not counted. Returns (matches, compared) summed over the T-1 frame pairs; their ratio is the consistency.
    """
    clip = _check_clip(clip)
    poses = torch.as_tensor(np.asarray(poses, np.float32))
    if poses.shape != (len(clip), 3):
        raise ValueError(f'poses must have shape ({len(clip)}, 3) (x, y, yaw per frame), got {tuple(poses.shape)}')
    is_static = np.zeros(NUM_CLASSES, bool)
    is_static[list(STATIC_CLASSES)] = True
    centres_x, centres_y = voxel_centres(0), voxel_centres(1)
    matches = compared = 0
    for t in range(len(clip) - 1):
        i, j, k = np.nonzero(is_static[clip[t]])                                          # (V,) each
        dx, dy, dyaw = _relative(poses[t], poses[t + 1]).double().numpy()
        # q = R(dyaw)^T (p - d): the voxel centre p of frame t in frame t+1's coordinates
        px, py = centres_x[i] - dx, centres_y[j] - dy
        qx, qy = np.cos(dyaw) * px + np.sin(dyaw) * py, -np.sin(dyaw) * px + np.cos(dyaw) * py
        row = np.floor((qx - POINT_CLOUD_RANGE[0]) / VOXEL_SIZE).astype(np.int64)
        col = np.floor((qy - POINT_CLOUD_RANGE[1]) / VOXEL_SIZE).astype(np.int64)
        inside = (row >= 0) & (row < GRID_SHAPE[0]) & (col >= 0) & (col < GRID_SHAPE[1])
        moved = clip[t + 1, row[inside], col[inside], k[inside]]
        matches += int((moved == clip[t, i[inside], j[inside], k[inside]]).sum())
        compared += int(inside.sum())
    return matches, compared
