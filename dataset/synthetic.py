"""A synthetic world written in the exact on-disk layout of Occ3D-nuScenes + the OccWorld info pickles, so that
every test and the demo have data without nuScenes:

    DIR/nuscenes/gts/<scene_name>/<sample_token>/labels.npz   semantics, mask_lidar, mask_camera (200, 200, 16) uint8
    DIR/nuscenes_infos_{train,val}_temporal_v3_scene.pkl       {'infos': {scene: [frame dict, ...]}, 'metadata': ...}

Each scene is an ego car driving through its own procedural town (dataset/synthetic_town.py) at 2 Hz. Scene i
plays SCENARIOS[i % 4]: a left turn, a right turn, a stop at a junction, or a start from rest; the cruise speed,
the town and the other junctions' manoeuvres are drawn from the seeded generator (routes: dataset/synthetic_routes.py).
Each frame is the ego-centred crop of the town in that frame's ego coordinates, so the scene moves exactly as the
poses say.

With --counterfactual, each start i instead gives one scene per manoeuvre of MANOEUVRES, 'scene-000i-straight',
'scene-000i-left' and 'scene-000i-right': the same town, agents and start pose (so the same first frame), going
straight on, left or right at the first junction (within the first 8 frames) and at every later one. The scenes
of the last --val-scenes starts are val. Tokens and timestamps are drawn per scene, as in the default world.

Visibility masks (cheap, vectorised approximations of Occ3D's ray casting):
  mask_lidar : 2.5-D radial ray marching from the LiDAR (its nuScenes mounting, 1.84 m up). Every column becomes a
               solid pillar up to its highest occupied voxel; along 0.25-degree azimuth rays the running maximum
               elevation of those pillar tops is the horizon. A voxel is seen when its top edge is above the
               horizon of the nearer columns and inside the HDL-32E's vertical field of view; a free voxel, in
               addition, only when something farther along its azimuth rises above it (the beam through it
               returns a point, so Occ3D marks it observed-free).
  mask_camera: mask_lidar, less a blind sector behind the ego and the columns beyond CAMERA_RANGE.

Usage:
    python -m dataset.synthetic --out data/synthetic                    # 16 scenes x 40 frames, 4 for val
    python -m dataset.synthetic --out DIR --scenes 3 --frames 12 --seed 1 --val-scenes 1
    python -m dataset.synthetic --out data/synthetic_counterfactual --counterfactual     # 16 starts x 3 scenes
"""
import argparse
import logging
import os
import pickle
import time
import zipfile

import numpy as np
from tqdm import tqdm

from dataset.constants import (CLASS_NAMES, FREE_CLASS, GRID_SHAPE, KEYFRAME_HZ, NUM_CLASSES, POINT_CLOUD_RANGE,
                               VOXEL_SIZE, voxel_centres)
from dataset.poses import LIDAR2EGO_TRANSLATION, driving_command, frames_from_path, future_deltas, lidar_to_global
from dataset.synthetic_routes import MANOEUVRES, plan_counterfactual, plan_scene
from dataset.synthetic_town import GROUND_SLAB, build_town

LIDAR_ELEVATION_DEG = (-30.0, 10.0)        # vertical field of view of nuScenes' Velodyne HDL-32E
AZIMUTH_BINS, RADIAL_STEP, HORIZON_GAP = 1440, 0.2, 2   # polar raster; nearer samples (x0.2 m) that form the horizon
CAMERA_BLIND_SECTOR_DEG = 40.0             # centred straight behind the ego
CAMERA_RANGE = 40.0                        # metres from the ego origin
NPZ_DATE = (1980, 1, 1, 0, 0, 0)           # fixed zip timestamps: the same seed gives byte-identical files
BASE_TIMESTAMP = 1_533_000_000_000_000     # microseconds (mid-2018, like nuScenes)
logger = logging.getLogger(__name__)


def scene_frames(plan):
    """The info-pickle frame dicts of a planned scene, in time order."""
    rng = np.random.default_rng(plan.token_seed)
    scene_token, start_time = rng.bytes(16).hex(), BASE_TIMESTAMP + int(rng.integers(0, 10 ** 13))
    frames = frames_from_path(plan.x, plan.y, plan.yaw)
    for frame in frames:                        # plain floats, as nuScenes' own tables give them
        for key in ('ego2global_rotation', 'lidar2ego_rotation'):
            frame[key] = [float(v) for v in frame[key]]
    deltas, masks = future_deltas(lidar_to_global(frames))                 # (N, 6, 2), (N, 6)
    commands = driving_command(deltas, masks)                               # (N, 3)
    for i, frame in enumerate(frames):
        frame.update(token=rng.bytes(16).hex(), scene_token=scene_token, scene_name=plan.name, frame_idx=i,
                     timestamp=start_time + i * 1_000_000 // KEYFRAME_HZ, gt_ego_fut_trajs=deltas[i],
                     gt_ego_fut_masks=masks[i], pose_mode=commands[i], cams={})
    return frames


def scene_town(plan):
    """Paint the town of a planned scene (its agents placed for the scene's whole duration)."""
    return build_town(np.random.default_rng(plan.town_seed), plan.roads, plan.reserved,
                      len(plan.x) / KEYFRAME_HZ)


def _draw_agents(semantics, agents, x, y, yaw, time_s):
    """Burn the boxes of the agents near the ego into ``semantics`` (200, 200, 16), in place."""
    cos, sin = np.cos(yaw), np.sin(yaw)
    agent_x, agent_y = agents.positions(time_s)
    forward = cos * (agent_x - x) + sin * (agent_y - y)                    # (K,) ego-frame centres
    left = -sin * (agent_x - x) + cos * (agent_y - y)
    reach = np.hypot(agents.length, agents.width) / 2
    # a box thinner than 1.5 voxels is widened so that it always covers at least one voxel centre
    half_length = np.maximum(agents.length, 1.5 * VOXEL_SIZE) / 2
    half_width = np.maximum(agents.width, 1.5 * VOXEL_SIZE) / 2
    grid_x, grid_y = voxel_centres(0), voxel_centres(1)
    lo_x, lo_y = POINT_CLOUD_RANGE[0], POINT_CLOUD_RANGE[1]
    near = np.flatnonzero((np.abs(forward) < POINT_CLOUD_RANGE[3] + reach)
                          & (np.abs(left) < POINT_CLOUD_RANGE[4] + reach))
    for k in near:
        rows = slice(max(0, int((forward[k] - reach[k] - lo_x) / VOXEL_SIZE)),
                     max(0, int((forward[k] + reach[k] - lo_x) / VOXEL_SIZE) + 1))
        cols = slice(max(0, int((left[k] - reach[k] - lo_y) / VOXEL_SIZE)),
                     max(0, int((left[k] + reach[k] - lo_y) / VOXEL_SIZE) + 1))
        dx, dy = grid_x[rows, None] - forward[k], grid_y[None, cols] - left[k]        # (rows, cols)
        heading = agents.yaw[k] - yaw
        inside = ((np.abs(np.cos(heading) * dx + np.sin(heading) * dy) <= half_length[k])
                  & (np.abs(-np.sin(heading) * dx + np.cos(heading) * dy) <= half_width[k]))
        semantics[rows, cols, GROUND_SLAB + 1:GROUND_SLAB + 1 + agents.height[k]][inside] = agents.cls[k]


def render_frame(town, x, y, yaw, time_s):
    """Semantics (200, 200, 16) uint8 of the ego at world pose (x, y, yaw) ``time_s`` seconds into the scene."""
    grid_x, grid_y = voxel_centres(0)[:, None], voxel_centres(1)[None, :]
    cells = town.cells(x + np.cos(yaw) * grid_x - np.sin(yaw) * grid_y,            # (200, 200) world points
                       y + np.sin(yaw) * grid_x + np.cos(yaw) * grid_y)
    semantics = np.full(GRID_SHAPE, FREE_CLASS, np.uint8)
    semantics[:, :, GROUND_SLAB] = town.ground[cells]
    slab = np.arange(GRID_SHAPE[2])
    for layer in town.layers:                                               # solid, then crown
        cls, first, end = layer[(slice(None),) + cells]                    # each (200, 200)
        inside = (slab >= first[..., None]) & (slab < end[..., None])      # (200, 200, 16)
        semantics = np.where(inside, cls[..., None], semantics)
    _draw_agents(semantics, town.agents, x, y, yaw, time_s)
    return semantics


def _polar_geometry():
    """Fixed geometry of the visibility model: per column its distance from the LiDAR (200, 200), polar cell
    (azimuth bin, radial bin), and the camera's column mask; per polar sample (A, R) its column and distance."""
    sensor_x, sensor_y, _ = LIDAR2EGO_TRANSLATION
    grid_x, grid_y = voxel_centres(0)[:, None] - sensor_x, voxel_centres(1)[None, :] - sensor_y
    distance = np.hypot(grid_x, grid_y)                                     # (200, 200)
    azimuth_bin = np.round(np.arctan2(grid_y, grid_x) / (2 * np.pi) * AZIMUTH_BINS).astype(np.intp) % AZIMUTH_BINS
    radii = np.arange(1, int(distance.max() / RADIAL_STEP) + 2) * RADIAL_STEP                        # (R,)
    angles = np.arange(AZIMUTH_BINS) * 2 * np.pi / AZIMUTH_BINS                                      # (A,)
    rows = np.floor((sensor_x + np.cos(angles)[:, None] * radii - POINT_CLOUD_RANGE[0]) / VOXEL_SIZE)
    cols = np.floor((sensor_y + np.sin(angles)[:, None] * radii - POINT_CLOUD_RANGE[1]) / VOXEL_SIZE)
    valid = (rows >= 0) & (rows < GRID_SHAPE[0]) & (cols >= 0) & (cols < GRID_SHAPE[1])            # (A, R)
    sample_column = np.where(valid, rows * GRID_SHAPE[1] + cols, -1).astype(np.intp)
    ego_x, ego_y = voxel_centres(0)[:, None], voxel_centres(1)[None, :]
    behind = np.abs(np.arctan2(ego_y, -ego_x)) < np.radians(CAMERA_BLIND_SECTOR_DEG) / 2
    camera_columns = ~behind & (np.hypot(ego_x, ego_y) <= CAMERA_RANGE)
    return distance, azimuth_bin, (distance / RADIAL_STEP).astype(np.intp) - 1, radii, sample_column, camera_columns


_GEOMETRY = _polar_geometry()


def visibility_masks(semantics):
    """(mask_lidar, mask_camera), each (200, 200, 16) uint8 in {0, 1}, of a frame (see the module docstring)."""
    distance, azimuth_bin, radial_bin, radii, sample_column, camera_columns = _GEOMETRY
    sensor_z = LIDAR2EGO_TRANSLATION[2]
    occupied = semantics != FREE_CLASS
    top_slab = GRID_SHAPE[2] - 1 - np.argmax(occupied[:, :, ::-1], axis=2)           # (200, 200)
    top_height = np.where(occupied.any(axis=2), POINT_CLOUD_RANGE[2] + (top_slab + 1) * VOXEL_SIZE - sensor_z,
                          -np.inf).ravel()
    slope = np.where(sample_column >= 0, top_height[sample_column] / radii, -np.inf)      # (A, R)
    horizon = np.maximum.accumulate(slope, axis=1)
    nearer = radial_bin - HORIZON_GAP
    before = np.where(nearer >= 0, horizon[azimuth_bin, np.maximum(nearer, 0)], -np.inf)   # (200, 200)
    beyond = horizon[azimuth_bin, -1]
    # slopes (height over distance, from the LiDAR) of the bottom, centre and top of every voxel: (200, 200, 16)
    bottom_slope = (voxel_centres(2) - VOXEL_SIZE / 2 - sensor_z) / distance[..., None]
    centre_slope = bottom_slope + VOXEL_SIZE / 2 / distance[..., None]
    top_slope = bottom_slope + VOXEL_SIZE / distance[..., None]
    low, high = np.tan(np.radians(LIDAR_ELEVATION_DEG))
    lidar = ((top_slope >= np.maximum(before, low)[..., None]) & (bottom_slope <= high)
             & (occupied | (centre_slope <= beyond[..., None])))
    return lidar.astype(np.uint8), (lidar & camera_columns[..., None]).astype(np.uint8)


def save_labels(path, arrays):
    """Write ``arrays`` (name -> array) as an .npz exactly like np.savez_compressed, but with fixed timestamps."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            entry = zipfile.ZipInfo(f'{name}.npy', date_time=NPZ_DATE)
            entry.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(entry, 'w', force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(array))


def write_world(out_dir, num_scenes=16, num_frames=40, seed=0, num_val_scenes=4, counterfactual=False):
    """Write the synthetic world (layout in the module docstring); the last ``num_val_scenes`` scenes are val.
    With ``counterfactual``, each of the ``num_scenes`` starts writes one scene per manoeuvre of MANOEUVRES.

    Returns {'scenes': {'train': n, 'val': m}, 'frames': int, 'class_histogram': {class name: voxel count},
    'seconds': float}.
    """
    if num_scenes < 1 or num_frames < 1:
        raise ValueError(f'num_scenes and num_frames must be >= 1, got {num_scenes} and {num_frames}')
    if not 0 <= num_val_scenes <= num_scenes:
        raise ValueError(f'num_val_scenes must be in [0, num_scenes={num_scenes}], got {num_val_scenes}')
    started = time.perf_counter()
    histogram = np.zeros(NUM_CLASSES, np.int64)
    infos = {'train': {}, 'val': {}}
    scenes_per_start = len(MANOEUVRES) if counterfactual else 1
    with tqdm(total=num_scenes * scenes_per_start * num_frames, desc='synthetic frames', unit='frame') as progress:
        for scene_index in range(num_scenes):
            plans = (plan_counterfactual(seed, scene_index, num_frames) if counterfactual
                     else [plan_scene(seed, scene_index, num_frames)])
            town = scene_town(plans[0])                        # counterfactual scenes share their town
            split = 'val' if scene_index >= num_scenes - num_val_scenes else 'train'
            for plan in plans:
                frames = scene_frames(plan)
                for i, frame in enumerate(frames):
                    semantics = render_frame(town, plan.x[i], plan.y[i], plan.yaw[i], i / KEYFRAME_HZ)
                    mask_lidar, mask_camera = visibility_masks(semantics)
                    save_labels(os.path.join(out_dir, 'nuscenes', 'gts', plan.name, frame['token'], 'labels.npz'),
                                {'semantics': semantics, 'mask_lidar': mask_lidar, 'mask_camera': mask_camera})
                    histogram += np.bincount(semantics.ravel(), minlength=NUM_CLASSES)
                    progress.update()
                infos[split][plan.name] = frames
    metadata = {'version': 'synthetic', 'seed': seed}
    if counterfactual:
        metadata['manoeuvres'] = list(MANOEUVRES)
    for split, split_infos in infos.items():
        with open(os.path.join(out_dir, f'nuscenes_infos_{split}_temporal_v3_scene.pkl'), 'wb') as f:
            pickle.dump({'infos': split_infos, 'metadata': metadata}, f, protocol=pickle.HIGHEST_PROTOCOL)
    return {'scenes': {split: len(split_infos) for split, split_infos in infos.items()},
            'frames': num_scenes * scenes_per_start * num_frames,
            'class_histogram': {name: int(count) for name, count in zip(CLASS_NAMES, histogram)},
            'seconds': time.perf_counter() - started}


def main(argv=None):
    parser = argparse.ArgumentParser(description='Write the synthetic Occ3D-nuScenes world.')
    parser.add_argument('--out', required=True, help='output directory (gets nuscenes/gts/ and the two pkls)')
    parser.add_argument('--scenes', type=int, default=16, help='scenes in total (starts, with --counterfactual)')
    parser.add_argument('--frames', type=int, default=40, help='keyframes per scene (2 Hz)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--val-scenes', type=int, default=4,
                        help='the last this many scenes (starts, with --counterfactual) form the val split')
    parser.add_argument('--counterfactual', action='store_true',
                        help=f'write one scene per manoeuvre ({", ".join(MANOEUVRES)}) of every start, '
                             'named scene-NNNN-<manoeuvre>')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    summary = write_world(args.out, args.scenes, args.frames, args.seed, args.val_scenes,
                          counterfactual=args.counterfactual)
    logger.info('wrote %d train + %d val scenes, %d frames in %.1f s (%.1f frames/s) to %s',
                summary['scenes']['train'], summary['scenes']['val'], summary['frames'], summary['seconds'],
                summary['frames'] / summary['seconds'], args.out)
    logger.info('voxels per class: %s', summary['class_histogram'])


if __name__ == '__main__':
    main()
