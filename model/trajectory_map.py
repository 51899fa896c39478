"""The ego trajectory as a map over the latent grid: where every latent cell lies in the first frame's coordinates.

The paper's condition is the ego path ``traj_xy`` (T, 2): (x, y) of every frame in the first frame's ego
coordinates. Upstream embeds it as one vector for the whole clip (model/dit.py TrajectoryEmbedder), which every token
receives alike through adaLN. This module turns the same path into a per-cell input, the bird's-eye-view analogue of
the per-pixel ray maps of camera-controlled video diffusion: latent cell (tau, i, j) sits at ego-frame point c_ij of
latent step tau, and at w = R(yaw_tau) c_ij + p_tau in the first frame's coordinates, with (p_tau, yaw_tau) the ego
pose of that step. The map holds sin / cos of w at several wavelengths (as a position table does), plus cos / sin of
yaw_tau. Static things keep their w from step to step, so cells that show the same place carry the same code, and a
DiT can read off which cells of two steps should agree.

The heading is not part of ``traj_xy``; it is the direction of travel: yaw_t = atan2 of the path's chord from frame
t - 1 to t + 1 (one-sided at the last frame), 0 at frame 0 by definition of the coordinates, and held while the ego
moves less than STANDING_M per frame (a stop). A car backing up would get the opposite heading; nuScenes has none.
A latent step covering several frames takes their mean position and circular-mean heading.
"""
import math

import torch

from dataset.constants import POINT_CLOUD_RANGE

WAVELENGTHS_M = (160.0, 80.0, 40.0, 20.0, 10.0, 5.0)    # of the sin / cos features of the world coordinates
STANDING_M = 0.2                                       # chord (per frame of the central difference) of a stopped ego
MAP_CHANNELS = 4 * len(WAVELENGTHS_M) + 2              # sin, cos of x and y per wavelength; cos, sin of the heading


def headings(traj_xy):
    """Heading of every frame from the path alone (module docstring).

    traj_xy: (B, T, 2) metres, frame 0 at the origin -> (B, T) radians, 0 at frame 0.
    """
    batch_size, frames, _ = traj_xy.shape
    yaw = [traj_xy.new_zeros(batch_size)]
    for t in range(1, frames):
        chord = traj_xy[:, min(t + 1, frames - 1)] - traj_xy[:, t - 1]                    # (B, 2)
        moving = chord.norm(dim=1) > STANDING_M * (min(t + 1, frames - 1) - (t - 1))
        direction = torch.atan2(chord[:, 1], chord[:, 0])
        # unwrap next to the previous heading, so that a long turn keeps counting past +-180 degrees
        direction = yaw[-1] + torch.remainder(direction - yaw[-1] + math.pi, 2 * math.pi) - math.pi
        yaw.append(torch.where(moving, direction, yaw[-1]))
    return torch.stack(yaw, dim=1)


def latent_step_poses(traj_xy, latent_frames):
    """Pose of every latent step: the mean position and circular-mean heading of the frames it covers.

    traj_xy: (B, T, 2) metres, T a multiple of latent_frames -> (position (B, T', 2), yaw (B, T'))
    """
    batch_size, frames, _ = traj_xy.shape
    if frames % latent_frames:
        raise ValueError(f'the trajectory has {frames} frames, not a multiple of the {latent_frames} latent steps')
    group = frames // latent_frames
    yaw = headings(traj_xy).view(batch_size, latent_frames, group)
    position = traj_xy.view(batch_size, latent_frames, group, 2).mean(dim=2)
    return position, torch.atan2(yaw.sin().mean(dim=2), yaw.cos().mean(dim=2))


def cell_world_coordinates(position, yaw, height, width):
    """Where the centres of an H' x W' grid spanning POINT_CLOUD_RANGE (H' along x, W' along y) lie when the ego is at
    ``position`` (B, T', 2) and ``yaw`` (B, T'): (world_x, world_y), each (B, T', H', W'), in those poses' frame."""
    x_min, y_min, _, x_max, y_max, _ = POINT_CLOUD_RANGE
    cell_x = x_min + (torch.arange(height, device=yaw.device) + 0.5) * (x_max - x_min) / height          # (H',)
    cell_y = y_min + (torch.arange(width, device=yaw.device) + 0.5) * (y_max - y_min) / width            # (W',)
    cos, sin = yaw.cos()[..., None, None], yaw.sin()[..., None, None]                          # (B, T', 1, 1)
    return (position[..., 0, None, None] + cos * cell_x[:, None] - sin * cell_y[None],
            position[..., 1, None, None] + sin * cell_x[:, None] + cos * cell_y[None])


def trajectory_map(traj_xy, latent_shape):
    """The per-cell trajectory map of a batch of paths (module docstring).

    traj_xy: (B, T, 2) metres; latent_shape: (C, T', H', W'), H' along the grid's x axis and W' along y, both
    spanning POINT_CLOUD_RANGE -> (B, MAP_CHANNELS, T', H', W') float32
    """
    _, latent_frames, height, width = latent_shape
    traj_xy = traj_xy.float()
    position, yaw = latent_step_poses(traj_xy, latent_frames)                            # (B, T', 2), (B, T')
    world_x, world_y = cell_world_coordinates(position, yaw, height, width)               # (B, T', H', W') each
    frequencies = 2 * math.pi / torch.tensor(WAVELENGTHS_M, device=traj_xy.device)         # (F,)
    angles = torch.cat([world_x[:, None] * frequencies[None, :, None, None, None],
                        world_y[:, None] * frequencies[None, :, None, None, None]], dim=1)  # (B, 2F, T', H', W')
    heading = torch.stack([yaw.cos(), yaw.sin()], dim=1)[..., None, None]                 # (B, 2, T', 1, 1)
    heading = heading.expand(-1, -1, -1, height, width)                                   # (B, 2, T', H', W')
    return torch.cat([angles.sin(), angles.cos(), heading], dim=1)


def warp_latent(latent, source_position, source_yaw, target_position, target_yaw, mode='bilinear'):
    """Move one latent step into the ego frames of other steps, as if everything in it were static: the warped
    copy of a known step (the latent counterpart of copying the last frame moved by the ego motion).

    latent: (B, C, H', W') seen from the pose (source_position (B, 2), source_yaw (B,)); target_position
    (B, T', 2), target_yaw (B, T'), all in one frame's coordinates, metres and radians, H' along x and W' along y
    spanning POINT_CLOUD_RANGE -> (warped (B, C, T', H', W'), in_view (B, 1, T', H', W') float 0/1: 1 where the
    target cell lies inside the source grid; warped is 0 elsewhere)
    """
    batch_size, channels, height, width = latent.shape
    frames = target_position.shape[1]
    x_min, y_min, _, x_max, y_max, _ = POINT_CLOUD_RANGE
    world_x, world_y = cell_world_coordinates(target_position, target_yaw, height, width)   # (B, T', H', W') each
    # q = R(source_yaw)^T (w - source_position): the target cell centres in the source step's ego frame
    dx = world_x - source_position[:, 0, None, None, None]
    dy = world_y - source_position[:, 1, None, None, None]
    cos_s, sin_s = source_yaw.cos()[:, None, None, None], source_yaw.sin()[:, None, None, None]
    q_x, q_y = cos_s * dx + sin_s * dy, -sin_s * dx + cos_s * dy
    # grid_sample's last axis is (column, row) = (y, x), normalised so that the grid's outer edges are -1 and 1
    grid = torch.stack([(q_y - y_min) / (y_max - y_min) * 2 - 1, (q_x - x_min) / (x_max - x_min) * 2 - 1], -1)
    grid = grid.view(batch_size, frames * height, width, 2).to(latent.dtype)
    warped = torch.nn.functional.grid_sample(latent, grid, mode=mode, padding_mode='zeros', align_corners=False)
    in_view = (grid.abs() <= 1).all(-1).to(latent.dtype)                                          # (B, T'H', W')
    return (warped.view(batch_size, channels, frames, height, width),
            in_view.view(batch_size, 1, frames, height, width))


def chain_static_warp(x0, traj_xy, gate):
    """Compose a clip's per-step clean-latent predictions with the ego motion: step 0 as predicted; every later
    step takes, where the step before is in view, the step before moved by the ego motion (warp_latent, nearest
    cell), mixed with its own prediction by ``gate``: x'_tau = g m W(x'_{tau-1}) + (1 - g m) x_tau, m = in view.
    A static world is then consistent with the trajectory by construction; the gate lets moving things and
    newly seen space through.

    x0: (B, C, T', H', W'); traj_xy: (B, T, 2) metres; gate: (B, 1, T', H', W') in [0, 1] -> (B, C, T', H', W')
    """
    latent_frames = x0.shape[2]
    position, yaw = latent_step_poses(traj_xy.float(), latent_frames)                      # (B, T', 2), (B, T')
    steps = [x0[:, :, 0]]
    for tau in range(1, latent_frames):
        warped, in_view = warp_latent(steps[-1], position[:, tau - 1], yaw[:, tau - 1], position[:, tau:tau + 1],
                                      yaw[:, tau:tau + 1], mode='nearest')               # (B, C, 1, H', W')
        weight = gate[:, :, tau] * in_view[:, :, 0]                                          # (B, 1, H', W')
        steps.append(weight * warped[:, :, 0] + (1 - weight) * x0[:, :, tau])
    return torch.stack(steps, dim=2)
