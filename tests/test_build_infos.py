"""The info builder on a tiny nuScenes-schema table set: two v1.0-mini scenes (one of mini_train, one of
mini_val), 8 keyframes each; the train scene drives straight, then turns left."""
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from pyquaternion import Quaternion

from dataset.build_infos import build_infos, info_pkl_name, main

pytest.importorskip('nuscenes')

VERSION = 'v1.0-mini'
TRAIN_SCENE, VAL_SCENE = 'scene-0061', 'scene-0103'      # in nuscenes.utils.splits.mini_train / mini_val
NUM_KEYFRAMES = 8
STEP_M = 5.0                                              # ego travel between keyframes
HEADING = 0.3                                             # global yaw of the straight part, rad
TURN_START, TURN_RATE = 4, 0.4                            # yaw grows by TURN_RATE per keyframe after TURN_START
LIDAR_TRANSLATION = [0.94, 0.0, 1.84]
LIDAR_ROTATION = list(Quaternion(axis=[0, 0, 1], angle=-np.pi / 2).elements)   # LiDAR x right, y forward
CAMERA_INTRINSIC = [[1266.4, 0.0, 816.3], [0.0, 1266.4, 491.5], [0.0, 0.0, 1.0]]


def ego_path(turn):
    """Planar ego poses (x, y, yaw) of NUM_KEYFRAMES keyframes: straight along HEADING, then (if ``turn``) left."""
    poses, x, y, yaw = [], 100.0, 200.0, HEADING
    for i in range(NUM_KEYFRAMES):
        poses.append((x, y, yaw))
        if turn and i >= TURN_START:
            yaw += TURN_RATE
        x, y = x + STEP_M * np.cos(yaw), y + STEP_M * np.sin(yaw)
    return poses


def write_tables(dataroot):
    """Write the 13 JSON tables NuScenes() loads (plus the map file it checks for) under dataroot/VERSION."""
    tables = {name: [] for name in ('attribute', 'category', 'instance', 'sample_annotation', 'visibility')}
    tables['sensor'] = [{'token': 'sensor-lidar', 'channel': 'LIDAR_TOP', 'modality': 'lidar'},
                        {'token': 'sensor-cam', 'channel': 'CAM_FRONT', 'modality': 'camera'}]
    tables['calibrated_sensor'] = [
        {'token': 'calib-lidar', 'sensor_token': 'sensor-lidar', 'translation': LIDAR_TRANSLATION,
         'rotation': LIDAR_ROTATION, 'camera_intrinsic': []},
        {'token': 'calib-cam', 'sensor_token': 'sensor-cam', 'translation': [1.7, 0.0, 1.5],
         'rotation': [0.5, -0.5, 0.5, -0.5], 'camera_intrinsic': CAMERA_INTRINSIC}]
    tables['log'] = [{'token': 'log-0', 'logfile': 'n015-test', 'vehicle': 'n015', 'date_captured': '2018-07-24',
                      'location': 'singapore-onenorth'}]
    tables['map'] = [{'token': 'map-0', 'log_tokens': ['log-0'], 'category': 'semantic_prior',
                      'filename': 'maps/map-0.png'}]
    os.makedirs(os.path.join(dataroot, 'maps'))
    open(os.path.join(dataroot, 'maps', 'map-0.png'), 'wb').close()       # NuScenes() only checks that it exists
    tables.update(scene=[], sample=[], sample_data=[], ego_pose=[])
    for scene_name, turn, with_camera in ((TRAIN_SCENE, True, True), (VAL_SCENE, False, False)):
        tokens = [f'{scene_name}-sample-{i}' for i in range(NUM_KEYFRAMES)]
        tables['scene'].append({'token': f'{scene_name}-token', 'name': scene_name, 'log_token': 'log-0',
                                'description': 'test', 'nbr_samples': NUM_KEYFRAMES,
                                'first_sample_token': tokens[0], 'last_sample_token': tokens[-1]})
        for i, (x, y, yaw) in enumerate(ego_path(turn)):
            timestamp = 1_532_402_927_000_000 + 500_000 * i
            tables['sample'].append({'token': tokens[i], 'timestamp': timestamp, 'scene_token': f'{scene_name}-token',
                                     'prev': tokens[i - 1] if i else '',
                                     'next': tokens[i + 1] if i + 1 < NUM_KEYFRAMES else ''})
            channels = [('LIDAR_TOP', 'calib-lidar', 'pcd.bin')] + ([('CAM_FRONT', 'calib-cam', 'jpg')] * with_camera)
            for channel, calibration, extension in channels:
                data_token = f'{tokens[i]}-{channel}'
                tables['ego_pose'].append({'token': data_token, 'timestamp': timestamp, 'translation': [x, y, 0.0],
                                           'rotation': list(Quaternion(axis=[0, 0, 1], angle=yaw).elements)})
                tables['sample_data'].append({
                    'token': data_token, 'sample_token': tokens[i], 'ego_pose_token': data_token,
                    'calibrated_sensor_token': calibration, 'timestamp': timestamp, 'fileformat': extension[-3:],
                    'is_key_frame': True, 'height': 0, 'width': 0,
                    'filename': f'samples/{channel}/{data_token}.{extension}', 'prev': '', 'next': ''})
    tables['sample'].reverse()                 # the builder must follow 'next', not the table order
    os.makedirs(os.path.join(dataroot, VERSION))
    for name, records in tables.items():
        with open(os.path.join(dataroot, VERSION, f'{name}.json'), 'w') as f:
            json.dump(records, f)


@pytest.fixture(scope='module')
def built(tmp_path_factory):
    """Tables in <tmp>/nuscenes, the pickles built by the CLI entry into <tmp>/out."""
    root = tmp_path_factory.mktemp('nuscenes_mini')
    dataroot, out = str(root / 'nuscenes'), str(root / 'out')
    write_tables(dataroot)
    main(['--dataroot', dataroot, '--version', VERSION, '--out', out])
    infos = {}
    for split in ('mini_train', 'mini_val'):
        with open(os.path.join(out, info_pkl_name(split)), 'rb') as f:
            infos[split] = pickle.load(f)
    return {'dataroot': dataroot, 'out': out, 'infos': infos}


def test_split_assignment_and_format(built):
    assert sorted(os.listdir(built['out'])) == [info_pkl_name('mini_train'), info_pkl_name('mini_val')]
    train, val = built['infos']['mini_train'], built['infos']['mini_val']
    assert list(train['infos']) == [TRAIN_SCENE] and list(val['infos']) == [VAL_SCENE]
    assert train['metadata'] == {'version': VERSION}
    frame = train['infos'][TRAIN_SCENE][0]
    assert set(frame) == {'token', 'scene_token', 'scene_name', 'frame_idx', 'timestamp', 'ego2global_translation',
                          'ego2global_rotation', 'lidar2ego_translation', 'lidar2ego_rotation', 'lidar_path',
                          'gt_ego_fut_trajs', 'gt_ego_fut_masks', 'pose_mode', 'cams'}
    assert frame['gt_ego_fut_trajs'].shape == (6, 2) and frame['gt_ego_fut_trajs'].dtype == np.float32
    assert frame['gt_ego_fut_masks'].shape == (6,) and frame['pose_mode'].shape == (3,)
    assert frame['lidar_path'] == os.path.join(built['dataroot'], 'samples/LIDAR_TOP',
                                               f'{TRAIN_SCENE}-sample-0-LIDAR_TOP.pcd.bin')


def test_frames_in_time_order_with_poses_copied(built):
    frames = built['infos']['mini_train']['infos'][TRAIN_SCENE]
    assert [f['token'] for f in frames] == [f'{TRAIN_SCENE}-sample-{i}' for i in range(NUM_KEYFRAMES)]
    assert [f['frame_idx'] for f in frames] == list(range(NUM_KEYFRAMES))
    assert np.all(np.diff([f['timestamp'] for f in frames]) == 500_000)
    for frame, (x, y, yaw) in zip(frames, ego_path(turn=True)):
        assert frame['scene_name'] == TRAIN_SCENE and frame['scene_token'] == f'{TRAIN_SCENE}-token'
        assert frame['ego2global_translation'] == pytest.approx([x, y, 0.0])
        assert frame['ego2global_rotation'] == pytest.approx(list(Quaternion(axis=[0, 0, 1], angle=yaw).elements))
        assert frame['lidar2ego_translation'] == LIDAR_TRANSLATION
        assert frame['lidar2ego_rotation'] == pytest.approx(LIDAR_ROTATION)


def test_cameras_present_only_where_recorded(built):
    train_frame = built['infos']['mini_train']['infos'][TRAIN_SCENE][3]
    assert list(train_frame['cams']) == ['CAM_FRONT']
    camera = train_frame['cams']['CAM_FRONT']
    assert camera['data_path'].endswith(f'samples/CAM_FRONT/{TRAIN_SCENE}-sample-3-CAM_FRONT.jpg')
    assert camera['sensor2ego_translation'] == [1.7, 0.0, 1.5]
    assert camera['sensor2ego_rotation'] == [0.5, -0.5, 0.5, -0.5]
    np.testing.assert_array_equal(camera['cam_intrinsic'], CAMERA_INTRINSIC)
    assert built['infos']['mini_val']['infos'][VAL_SCENE][0]['cams'] == {}


def test_ego_future_in_lidar_frame_and_driving_command(built):
    train = built['infos']['mini_train']['infos'][TRAIN_SCENE]
    # Driving straight, the LiDAR (x right, y forward) moves STEP_M straight ahead every keyframe: (0, STEP_M).
    # Frame 0's first TURN_START steps end at keyframe TURN_START, before the heading changes.
    np.testing.assert_allclose(train[0]['gt_ego_fut_trajs'][:TURN_START], [[0.0, STEP_M]] * TURN_START, atol=1e-5)
    np.testing.assert_allclose(train[1]['gt_ego_fut_trajs'][:TURN_START - 1], [[0.0, STEP_M]] * 3, atol=1e-5)
    # After the turn starts the LiDAR drifts left (negative x).
    assert train[0]['gt_ego_fut_trajs'][TURN_START + 1, 0] < -1.0
    # Masks: frame 0 has 6 future keyframes, frame 5 has 2, the last frame none.
    assert train[0]['gt_ego_fut_masks'].tolist() == [1] * 6
    assert train[5]['gt_ego_fut_masks'].tolist() == [1, 1, 0, 0, 0, 0]
    assert train[-1]['gt_ego_fut_masks'].tolist() == [0] * 6
    np.testing.assert_array_equal(train[5]['gt_ego_fut_trajs'][2:], 0)
    # pose_mode is one-hot over (right, left, straight): a frame before the left turn commands 'left'.
    assert train[2]['pose_mode'].tolist() == [0, 1, 0]
    assert all(f['pose_mode'].tolist() == [0, 0, 1] for f in built['infos']['mini_val']['infos'][VAL_SCENE])
    val = built['infos']['mini_val']['infos'][VAL_SCENE]
    np.testing.assert_allclose(val[0]['gt_ego_fut_trajs'], [[0.0, STEP_M]] * 6, atol=1e-5)


def test_check_gts_reports_the_missing_file_by_path(built, tmp_path):
    gts = tmp_path / 'gts'
    frames = {**built['infos']['mini_train']['infos'], **built['infos']['mini_val']['infos']}
    for scene_name, scene in frames.items():
        for frame in scene:
            os.makedirs(gts / scene_name / frame['token'])
            (gts / scene_name / frame['token'] / 'labels.npz').touch()
    out = tmp_path / 'out'
    args = ['--dataroot', built['dataroot'], '--version', VERSION, '--out', str(out), '--check-gts', str(gts)]
    main(args)                                                           # every file present: passes and writes
    assert sorted(os.listdir(out)) == [info_pkl_name('mini_train'), info_pkl_name('mini_val')]
    missing = gts / VAL_SCENE / f'{VAL_SCENE}-sample-5' / 'labels.npz'
    missing.unlink()
    with pytest.raises(FileNotFoundError, match='1 of 16 Occ3D labels files are missing') as error:
        main(args[:5] + [str(tmp_path / 'out2')] + args[6:])
    assert str(missing) in str(error.value)
    assert not (tmp_path / 'out2').exists()                               # a failed check writes nothing


def test_bad_arguments_are_named(built, tmp_path):
    with pytest.raises(FileNotFoundError, match='v1.0-trainval'):
        build_infos(built['dataroot'], 'v1.0-trainval')                 # tables of another version
    with pytest.raises(ValueError, match='version must be one of'):
        build_infos(built['dataroot'], 'v2.0')


def test_runs_as_a_module(built, tmp_path):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, '-m', 'dataset.build_infos', '--dataroot', built['dataroot'],
                             '--version', VERSION, '--out', str(tmp_path)], cwd=repo, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    with open(tmp_path / info_pkl_name('mini_val'), 'rb') as f:
        assert list(pickle.load(f)['infos']) == [VAL_SCENE]
