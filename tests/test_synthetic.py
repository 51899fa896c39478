"""The synthetic world: on-disk layout, determinism, static voxels that stay put in the world, ego futures and
commands that match the route, the scenario coverage of the default world, the counterfactual scenes (one town and
start, three ways through the first junction), and the visibility model."""
import os
import pickle
import re

import numpy as np
import pytest

from dataset.constants import (CLASS_ID, CLASS_NAMES, FREE_CLASS, GRID_SHAPE, KEYFRAME_HZ, NUM_CLASSES, OCC3D_KEYS,
                               POINT_CLOUD_RANGE, VOXEL_SIZE, voxel_centres)
from dataset.occ3d import labels_path, load_labels
from dataset.poses import ego_to_global
from dataset.synthetic import main, render_frame, scene_frames, scene_town, visibility_masks, write_world
from dataset.synthetic_routes import MANOEUVRES, SCENARIOS, plan_counterfactual, plan_scene
from dataset.synthetic_town import GROUND_SLAB

SCENES, FRAMES, VAL_SCENES = 3, 16, 1
FRAME_KEYS = {'token', 'scene_token', 'scene_name', 'frame_idx', 'timestamp', 'ego2global_translation',
              'ego2global_rotation', 'lidar2ego_translation', 'lidar2ego_rotation', 'gt_ego_fut_trajs',
              'gt_ego_fut_masks', 'pose_mode', 'cams'}
DYNAMIC = [CLASS_ID[n] for n in ('car', 'bus', 'truck', 'trailer', 'construction_vehicle', 'bicycle', 'motorcycle',
                                 'pedestrian')]
HEX32 = re.compile(r'^[0-9a-f]{32}$')


def _write(root, seed=0, scenes=SCENES, frames=FRAMES, val_scenes=VAL_SCENES):
    summary = write_world(str(root), num_scenes=scenes, num_frames=frames, seed=seed, num_val_scenes=val_scenes)
    return {'root': str(root), 'summary': summary}


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    return _write(tmp_path_factory.mktemp('synthetic'))


def _infos(root, split):
    with open(os.path.join(root, f'nuscenes_infos_{split}_temporal_v3_scene.pkl'), 'rb') as f:
        return pickle.load(f)


def _all_frames(root):
    return {**_infos(root, 'train')['infos'], **_infos(root, 'val')['infos']}


def _files(root):
    """Relative path -> bytes of every file under ``root``."""
    found = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            with open(path, 'rb') as f:
                found[os.path.relpath(path, root)] = f.read()
    return found


def _yaw(frame):
    w, x, y, z = frame['ego2global_rotation']
    return 2 * np.arctan2(z, w)


def test_layout_keys_and_dtypes(world):
    root = world['root']
    train, val = _infos(root, 'train'), _infos(root, 'val')
    assert train['metadata'] == val['metadata'] == {'version': 'synthetic', 'seed': 0}
    assert list(train['infos']) == ['scene-0000', 'scene-0001'] and list(val['infos']) == ['scene-0002']
    assert world['summary']['scenes'] == {'train': 2, 'val': 1} and world['summary']['frames'] == SCENES * FRAMES
    tokens = []
    for scene_name, frames in {**train['infos'], **val['infos']}.items():
        assert len(frames) == FRAMES and len({f['scene_token'] for f in frames}) == 1
        for i, frame in enumerate(frames):
            assert set(frame) == FRAME_KEYS
            assert HEX32.match(frame['token']) and HEX32.match(frame['scene_token'])
            assert frame['scene_name'] == scene_name and frame['frame_idx'] == i
            assert isinstance(frame['frame_idx'], int)
            assert isinstance(frame['timestamp'], int)
            assert frame['timestamp'] - frames[0]['timestamp'] == i * 1_000_000 // KEYFRAME_HZ
            translation, rotation = frame['ego2global_translation'], frame['ego2global_rotation']
            assert len(translation) == 3 and translation[2] == 0.0 and all(isinstance(v, float) for v in translation)
            assert len(rotation) == 4 and rotation[1] == rotation[2] == 0.0                 # a yaw-only quaternion
            assert np.isclose(np.linalg.norm(rotation), 1)
            assert frame['lidar2ego_translation'] == [0.943713, 0.0, 1.84023]
            assert np.allclose(frame['lidar2ego_rotation'], [np.sqrt(0.5), 0, 0, -np.sqrt(0.5)])
            for key, shape in (('gt_ego_fut_trajs', (6, 2)), ('gt_ego_fut_masks', (6,)), ('pose_mode', (3,))):
                assert frame[key].shape == shape and frame[key].dtype == np.float32, key
            assert sorted(frame['pose_mode'].tolist()) == [0, 0, 1] and frame['cams'] == {}
            labels = load_labels(labels_path(os.path.join(root, 'nuscenes', 'gts'), scene_name, frame['token']),
                                 OCC3D_KEYS)
            for key in ('mask_lidar', 'mask_camera'):
                assert set(np.unique(labels[key])) <= {0, 1}
            assert not np.any(labels['mask_camera'] > labels['mask_lidar'])          # camera-visible => lidar-visible
            tokens.append(frame['token'])
    assert len(set(tokens)) == len(tokens)
    with np.load(labels_path(os.path.join(root, 'nuscenes', 'gts'), 'scene-0000', tokens[0])) as npz:
        assert sorted(npz.files) == sorted(OCC3D_KEYS)
    histogram = world['summary']['class_histogram']
    assert list(histogram) == list(CLASS_NAMES) and sum(histogram.values()) == SCENES * FRAMES * np.prod(GRID_SHAPE)


def test_same_seed_is_byte_identical_and_another_seed_differs(world, tmp_path):
    again = _write(tmp_path / 'again')
    assert _files(world['root']) == _files(again['root'])
    other = _write(tmp_path / 'other', seed=1, scenes=1, frames=2, val_scenes=0)
    assert _infos(other['root'], 'train')['infos']['scene-0000'][0]['token'] != \
        _infos(world['root'], 'train')['infos']['scene-0000'][0]['token']
    plans = [plan_scene(seed, 0, FRAMES) for seed in (0, 1)]
    frames = [render_frame(scene_town(p), p.x[0], p.y[0], p.yaw[0], 0.0) for p in plans]
    assert (frames[0] != frames[1]).mean() > 0.05


def _map_voxels(source_pose, target_pose):
    """Index (X, Y, Z, 3) in the target grid of every voxel centre of the source grid (same z: flat world)."""
    x, y = np.meshgrid(voxel_centres(0), voxel_centres(1), indexing='ij')                    # (X, Y)
    centres = np.stack([x, y, np.zeros_like(x), np.ones_like(x)], -1)                          # (X, Y, 4)
    moved = centres @ (np.linalg.inv(target_pose) @ source_pose).T                            # (X, Y, 4)
    index = np.floor((moved[..., :2] - np.array(POINT_CLOUD_RANGE[:2])) / VOXEL_SIZE).astype(int)   # (X, Y, 2)
    return index


def _static_agreement(source, target, source_pose, target_pose):
    """How well the static occupied voxels of ``source`` land on their class in ``target``: the share that finds it
    in the very voxel they map to, the share that finds it within one voxel (x, y) of it, and their count."""
    index = _map_voxels(source_pose, target_pose)                                           # (X, Y, 2)
    inside = np.all((index >= 0) & (index < GRID_SHAPE[0]), axis=-1)                       # (X, Y)
    rows, cols = np.clip(index[..., 0], 0, GRID_SHAPE[0] - 1), np.clip(index[..., 1], 0, GRID_SHAPE[1] - 1)
    moved = target[rows, cols]                                                              # (X, Y, Z) target seen
    static = (source != FREE_CLASS) & ~np.isin(source, DYNAMIC) & inside[..., None] & ~np.isin(moved, DYNAMIC)
    nearby = np.zeros(GRID_SHAPE, bool)
    last = GRID_SHAPE[0] - 1
    for dx in (-1, 0, 1):
        for dy in (-1, 0, 1):
            nearby |= target[np.clip(rows + dx, 0, last), np.clip(cols + dy, 0, last)] == source
    return (source[static] == moved[static]).mean(), nearby[static].mean(), static.sum()


@pytest.mark.parametrize('gap', [1, 3, 8])
def test_static_voxels_keep_their_world_position(world, gap):
    """Point-sampling a class boundary at voxel centres that moved by a fraction of a voxel flips a few boundary
    voxels (thin walls and barriers most), so the exact-voxel agreement is ~0.94-1.0 and the one-voxel one ~1.0."""
    root = world['root']
    gts_root = os.path.join(root, 'nuscenes', 'gts')
    sideways = np.eye(4)
    sideways[1, 3] = 2.0                                                                    # a 2 m pose error
    for scene_name, frames in _all_frames(root).items():
        poses = ego_to_global(frames)
        semantics = [load_labels(labels_path(gts_root, scene_name, f['token']))['semantics'] for f in frames]
        for t in range(0, len(frames) - gap, 4):
            exact, within_one, count = _static_agreement(semantics[t], semantics[t + gap], poses[t], poses[t + gap])
            assert count > 10_000 and exact >= 0.93 and within_one >= 0.98, (scene_name, t, gap, exact, within_one)
            # the check can fail: a pose 2 m off breaks it
            wrong = _static_agreement(semantics[t], semantics[t + gap], poses[t], poses[t + gap] @ sideways)
            assert wrong[0] < 0.9 and wrong[1] < 0.97, (scene_name, t, gap, wrong)


def test_ego_futures_and_commands_follow_the_poses(world):
    for scene_name, frames in _all_frames(world['root']).items():
        ego_xy = np.array([f['ego2global_translation'][:2] for f in frames])
        yaw = np.unwrap([_yaw(f) for f in frames])
        lidar_xy = ego_xy + 0.943713 * np.stack([np.cos(yaw), np.sin(yaw)], 1)          # LIDAR_TOP is 0.94 m ahead
        for i, frame in enumerate(frames):
            valid = min(6, len(frames) - 1 - i)
            assert frame['gt_ego_fut_masks'].tolist() == [1] * valid + [0] * (6 - valid)
            offset = lidar_xy[i + 1:i + 1 + valid] - lidar_xy[i]                              # world (k, 2)
            forward = offset @ [np.cos(yaw[i]), np.sin(yaw[i])]
            left = offset @ [-np.sin(yaw[i]), np.cos(yaw[i])]
            path = np.stack([-left, forward], 1)                                     # LiDAR x right, y forward
            expected = np.diff(np.concatenate([np.zeros((1, 2)), path]), axis=0)
            assert np.allclose(frame['gt_ego_fut_trajs'][:valid], expected, atol=1e-4)
            assert not frame['gt_ego_fut_trajs'][valid:].any()
            command = ('right', 'left', 'straight')[int(np.argmax(frame['pose_mode']))]
            if command != 'straight':                                   # a turn command means the ego really turns
                turned = yaw[i + valid] - yaw[i]
                assert (turned > 0.2) if command == 'left' else (turned < -0.2), (scene_name, i, command, turned)
    commands = {name: {int(np.argmax(f['pose_mode'])) for f in frames}
                for name, frames in _all_frames(world['root']).items()}
    assert SCENARIOS[:2] == ('left', 'right')
    assert 1 in commands['scene-0000'] and 0 in commands['scene-0001']     # scene 0 turns left, scene 1 right


def test_default_world_routes_cover_every_manoeuvre():
    seen = set()
    for scene_index in range(16):
        plan = plan_scene(0, scene_index, 40)
        speed = np.hypot(np.diff(plan.x), np.diff(plan.y)) * KEYFRAME_HZ                  # (39,) m/s
        assert speed.max() <= 12.5
        moving = speed > 1.0
        heading = np.arctan2(np.diff(plan.y), np.diff(plan.x))
        # the yaw follows the path: the heading of each step lies between the yaws at its ends (turns are smooth)
        to_heading = np.angle(np.exp(1j * (heading - plan.yaw[:-1])))
        to_next_yaw = np.angle(np.exp(1j * (plan.yaw[1:] - plan.yaw[:-1])))
        between = ((to_heading >= np.minimum(0, to_next_yaw) - 0.01)
                   & (to_heading <= np.maximum(0, to_next_yaw) + 0.01))
        assert between[moving].all()
        yaw_step = np.abs(np.diff(np.unwrap(plan.yaw)))
        assert yaw_step.max() < np.pi / 4                                                 # no jumps, smooth arcs
        commands = {('right', 'left', 'straight')[int(np.argmax(f['pose_mode']))] for f in scene_frames(plan)}
        seen |= commands
        stopped = np.convolve(speed < 0.01, np.ones(3), 'valid').max() == 3                # 3 steps at rest
        seen |= {'stop'} if stopped else set()
        seen |= {'accelerate'} if np.any(speed[4:] - speed[:-4] >= 4.0) else set()       # +4 m/s within 2 s
        if plan.scenario in ('left', 'right'):
            assert plan.scenario in commands
    assert seen == {'straight', 'left', 'right', 'stop', 'accelerate'}


def _heading_change_deg(frames, first, last):
    """Yaw of frame ``last`` minus that of frame ``first`` (degrees, + = left) of a scene's frame dicts."""
    yaw = np.unwrap([_yaw(f) for f in frames])
    return float(np.degrees(yaw[last] - yaw[first]))


def test_counterfactual_scenes_share_town_and_first_frame_and_turn_the_stated_way(counterfactual_world):
    root = counterfactual_world
    train, val = _infos(root, 'train'), _infos(root, 'val')
    assert train['metadata'] == val['metadata'] == {'version': 'synthetic', 'seed': 0,
                                                    'manoeuvres': ['straight', 'left', 'right']}
    assert list(train['infos']) == [f'scene-0000-{m}' for m in MANOEUVRES]
    assert list(val['infos']) == [f'scene-0001-{m}' for m in MANOEUVRES]
    gts_root = os.path.join(root, 'nuscenes', 'gts')
    tokens = [f['token'] for frames in _all_frames(root).values() for f in frames]
    assert len(set(tokens)) == len(tokens)
    for start in ('scene-0000', 'scene-0001'):
        scenes = {m: _all_frames(root)[f'{start}-{m}'] for m in MANOEUVRES}
        assert len({frames[0]['scene_token'] for frames in scenes.values()}) == len(MANOEUVRES)
        first_frames = [load_labels(labels_path(gts_root, f'{start}-{m}', frames[0]['token']), OCC3D_KEYS)
                        for m, frames in scenes.items()]
        for m, frames in scenes.items():
            assert frames[0]['ego2global_translation'] == scenes['straight'][0]['ego2global_translation']
            assert frames[0]['ego2global_rotation'] == scenes['straight'][0]['ego2global_rotation']
        for labels in first_frames[1:]:                          # the same town, agents and pose: the same frame
            for key in OCC3D_KEYS:
                np.testing.assert_array_equal(labels[key], first_frames[0][key])
        later = [load_labels(labels_path(gts_root, f'{start}-{m}', frames[7]['token']))['semantics']
                 for m, frames in scenes.items()]
        assert (later[1] != later[0]).mean() > 0.05 and (later[2] != later[1]).mean() > 0.05
        # the manoeuvre falls inside the first 8 frames (4 s at 2 Hz)
        headings = {m: _heading_change_deg(frames, 0, 7) for m, frames in scenes.items()}
        assert abs(headings['straight']) < 1e-3 and headings['left'] > 45 and headings['right'] < -45, headings
        commands = {m: {int(np.argmax(f['pose_mode'])) for f in frames[:4]} for m, frames in scenes.items()}
        assert commands['straight'] == {2} and 1 in commands['left'] and 0 in commands['right']


def test_counterfactual_world_is_deterministic_and_off_by_default(counterfactual_world, tmp_path):
    again = write_world(str(tmp_path / 'again'), num_scenes=2, num_frames=12, seed=0, num_val_scenes=1,
                        counterfactual=True)
    assert again['scenes'] == {'train': 3, 'val': 3} and again['frames'] == 2 * 3 * 12
    assert _files(counterfactual_world) == _files(str(tmp_path / 'again'))
    main(['--out', str(tmp_path / 'plain'), '--scenes', '1', '--frames', '2', '--val-scenes', '0'])
    assert list(_infos(str(tmp_path / 'plain'), 'train')['infos']) == ['scene-0000']


def test_default_counterfactual_routes_turn_early_and_share_the_start():
    for scene_index in range(16):
        plans = plan_counterfactual(0, scene_index, 40)
        default = plan_scene(0, scene_index, 40)
        assert [p.scenario for p in plans] == list(MANOEUVRES)
        assert [p.name for p in plans] == [f'scene-{scene_index:04d}-{m}' for m in MANOEUVRES]
        for plan in plans:
            assert (plan.x[0], plan.y[0], plan.yaw[0]) == (plans[0].x[0], plans[0].y[0], plans[0].yaw[0])
            assert plan.reserved == plans[0].reserved and plan.town_seed == plans[0].town_seed   # one town
            assert plan.yaw[0] == default.yaw[0]                                  # the default scene's start lane
            for position, default_position in zip(plan.roads.position, default.roads.position):
                np.testing.assert_array_equal(position, default_position)
            speed = np.hypot(np.diff(plan.x), np.diff(plan.y)) * KEYFRAME_HZ
            assert speed.min() > 3.0 and speed.max() <= 12.5
            assert np.abs(np.diff(np.unwrap(plan.yaw))).max() < np.pi / 4
        heading = {p.scenario: np.degrees(np.unwrap(p.yaw)[7] - p.yaw[0]) for p in plans}
        assert heading['straight'] == 0 and heading['left'] > 45 and heading['right'] < -45, (scene_index, heading)


def test_default_world_has_many_classes():
    present = np.zeros(NUM_CLASSES, bool)
    for scene_index in range(4):
        plan = plan_scene(0, scene_index, 40)
        town = scene_town(plan)
        for i in (0, 13, 26, 39):
            present[np.unique(render_frame(town, plan.x[i], plan.y[i], plan.yaw[i], i / KEYFRAME_HZ))] = True
    assert present[FREE_CLASS] and present[:FREE_CLASS].sum() >= 10


def _ground_only():
    semantics = np.full(GRID_SHAPE, FREE_CLASS, np.uint8)
    semantics[:, :, GROUND_SLAB] = CLASS_ID['driveable_surface']
    return semantics


def _index(x, y, z):
    return tuple(int((v - lo) / VOXEL_SIZE) for v, lo in zip((x, y, z), POINT_CLOUD_RANGE[:3]))


def test_visibility_known_answers():
    semantics = _ground_only()
    wall_row = _index(20.0, 0, 0)[0]
    semantics[wall_row, :, GROUND_SLAB + 1:] = CLASS_ID['manmade']                      # a wall 20 m ahead
    lidar, camera = visibility_masks(semantics)
    ground_z = voxel_centres(2)[GROUND_SLAB]
    assert lidar[_index(10.0, 0, ground_z)] and lidar[_index(-10.0, 5.0, ground_z)]      # road seen all around
    # the HDL-32E looks at most 30 degrees down from 1.84 m: the road (top at -0.6 m) is blind within 4.2 m
    assert not lidar[_index(3.0, 0, ground_z)] and lidar[_index(0.94 + 4.6, 0, ground_z)]
    assert lidar[wall_row, 100, GROUND_SLAB + 1:].all()                                   # the wall's face
    assert not lidar[wall_row + 2:, :, GROUND_SLAB].any()                                  # nothing behind it
    assert lidar[_index(15.0, 0, 3.0)]                                                     # air in front of the wall
    assert not lidar[_index(-15.0, 0, 4.0)]          # air above the LiDAR with nothing behind it: no return
    behind, ahead = _index(-10.0, 0, ground_z), _index(10.0, 0, ground_z)
    assert lidar[behind] and not camera[behind] and camera[ahead]                          # the camera blind sector
    far = _index(-38.0, 38.0, ground_z)
    assert lidar[far] and not camera[far]                                                  # beyond camera range
    assert lidar.dtype == camera.dtype == np.uint8


def test_car_casts_a_shadow_on_the_road():
    semantics = _ground_only()
    x, y, _ = _index(6.0, 0, 0)
    semantics[x:x + 11, y - 2:y + 3, GROUND_SLAB + 1:GROUND_SLAB + 5] = CLASS_ID['car']     # 4.4 x 2 x 1.6 m
    lidar, _ = visibility_masks(semantics)
    assert lidar[x, y, GROUND_SLAB + 4] and lidar[x + 5, y, GROUND_SLAB + 4]               # its front and roof
    assert not lidar[x + 5, y, GROUND_SLAB + 1]                                            # its inside
    # the roof's far edge (1.0 m high, 9.5 m from the LiDAR at 1.84 m) hides the road top (-0.6 m) up to 27.5 m
    shadow_end = _index(0.94 + 2.44 * 9.46 / 0.84, 0, 0)[0]
    assert not lidar[x + 12:shadow_end - 1, y, GROUND_SLAB].any() and lidar[shadow_end + 1:, y, GROUND_SLAB].all()


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match='num_val_scenes'):
        write_world(str(tmp_path), num_scenes=2, num_frames=2, num_val_scenes=3)
    with pytest.raises(ValueError, match='num_frames'):
        write_world(str(tmp_path), num_scenes=2, num_frames=0)


def test_command_line_and_clip_dataset(tmp_path):
    torch = pytest.importorskip('torch')
    from dataset.clips import OccClipDataset

    main(['--out', str(tmp_path), '--scenes', '2', '--frames', '5', '--val-scenes', '1', '--seed', '3'])
    dataset = OccClipDataset(str(tmp_path / 'nuscenes_infos_val_temporal_v3_scene.pkl'),
                             str(tmp_path / 'nuscenes' / 'gts'), num_frames=4, mode='sliding',
                             conditions=('traj_xy', 'command', 'delta_xy'), load_camera_mask=True)
    assert len(dataset) == 2
    item = dataset[1]
    assert item['occupancy'].shape == (4,) + GRID_SHAPE and item['occupancy'].dtype == torch.uint8
    assert item['mask_camera'].shape == (4,) + GRID_SHAPE and item['scene_name'] == 'scene-0001'
    assert torch.allclose(item['traj_xy'][0], torch.zeros(2)) and item['traj_xy'][-1, 0] > 0   # drives forward
