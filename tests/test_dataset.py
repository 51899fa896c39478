"""The clip dataset on the real Occ3D format: layout, clips, conditions, samplers and every bad input."""
import hashlib
import logging
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

from dataset.clips import OccClipDataset, load_infos
from dataset.constants import CLASS_ID, FREE_CLASS, GRID_SHAPE
from dataset.loader import ResumableSampler, build_loader, set_epoch
from dataset.occ3d import labels_path, load_labels
from tests.conftest import REAL_FRAME_DIR, REAL_FRAME_TOKEN, make_frames, write_dataset


def clips(tiny_dataset, **kwargs):
    return OccClipDataset(tiny_dataset['info_pkl'], tiny_dataset['gts_root'], **{'num_frames': 4, **kwargs})


# ---------------------------------------------------------------------------------------------------------------
# The real Occ3D frame, through the same code path as real data
# ---------------------------------------------------------------------------------------------------------------

def test_real_occ3d_frame_matches_its_provenance():
    path = labels_path(REAL_FRAME_DIR, '', REAL_FRAME_TOKEN)
    with open(path, 'rb') as f:
        assert hashlib.sha256(f.read()).hexdigest() == \
            '2f4e523d38db42a7ca4635d59946b70b5d4b0b35a999d1e029c2446df8e65249'
    frame = load_labels(path, keys=('semantics', 'mask_lidar', 'mask_camera'))
    histogram = dict(zip(*np.unique(frame['semantics'], return_counts=True)))
    assert histogram == {0: 169, 1: 82, 3: 974, 4: 1749, 6: 83, 11: 8433, 13: 2610, 14: 1007, 15: 5286,
                         16: 18699, 17: 600908}
    assert (frame['semantics'] != FREE_CLASS).sum() == 39092
    assert frame['mask_camera'].sum() == 43355


def test_real_frame_through_the_clip_dataset(tmp_path):
    scene = 'scene-real'
    os.makedirs(tmp_path / 'gts' / scene / REAL_FRAME_TOKEN)
    shutil.copy(labels_path(REAL_FRAME_DIR, '', REAL_FRAME_TOKEN), tmp_path / 'gts' / scene / REAL_FRAME_TOKEN)
    frames = make_frames(scene, 1)
    frames[0]['token'] = REAL_FRAME_TOKEN
    with open(tmp_path / 'infos.pkl', 'wb') as f:
        pickle.dump({'infos': {scene: frames}}, f)
    dataset = OccClipDataset(str(tmp_path / 'infos.pkl'), str(tmp_path / 'gts'), num_frames=1, mode='sliding',
                             load_camera_mask=True)
    item = dataset[0]
    expected = load_labels(labels_path(REAL_FRAME_DIR, '', REAL_FRAME_TOKEN), ('semantics', 'mask_camera'))
    assert item['occupancy'].shape == (1, *GRID_SHAPE) and item['occupancy'].dtype == torch.uint8
    assert np.array_equal(item['occupancy'][0].numpy(), expected['semantics'])
    assert np.array_equal(item['mask_camera'][0].numpy(), expected['mask_camera'])
    # Axis convention: axis 0 is the ego's x (forward); on this frame the road runs along it.
    road = np.argwhere(expected['semantics'] == CLASS_ID['driveable_surface'])
    assert np.ptp(road[:, 0]) > 1.5 * np.ptp(road[:, 1]) or road[:, 0].std() > 1.5 * road[:, 1].std()


# ---------------------------------------------------------------------------------------------------------------
# Clips and conditions
# ---------------------------------------------------------------------------------------------------------------

def test_sliding_windows_cover_every_start(tiny_dataset):
    dataset = clips(tiny_dataset, mode='sliding', conditions=('traj_xy', 'command', 'delta_xy'))
    # scene-a: 7 frames -> starts 0..3; scene-b: 5 frames -> 0..1; scene-c is too short
    assert [dataset.window(i) for i in range(len(dataset))] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]
    item = dataset[5]
    assert item['scene_name'] == 'scene-b' and item['start'] == 1
    assert item['occupancy'].shape == (4, *GRID_SHAPE)
    # frame i of a scene carries class i % 17 in voxel (0, 0, 0)
    assert item['occupancy'][:, 0, 0, 0].tolist() == [1, 2, 3, 4]
    assert torch.equal(item['condition'], item['traj_xy'])
    assert all(item[name].shape == (4, 2) and item[name].dtype == torch.float32
               for name in ('traj_xy', 'command', 'delta_xy'))


def test_traj_xy_is_in_the_first_frame_ego_coordinates(tiny_dataset):
    dataset = clips(tiny_dataset, mode='sliding')
    straight = dataset[4]['traj_xy']                           # scene-b: 1 m per frame straight ahead
    assert torch.allclose(straight, torch.tensor([[0., 0.], [1., 0.], [2., 0.], [3., 0.]]), atol=1e-5)
    turning = dataset[2]['traj_xy']                            # scene-a from frame 2: 2 m per frame, +0.2 rad per frame
    assert torch.allclose(turning[:2], torch.tensor([[0., 0.], [2., 0.]]), atol=1e-5)
    heading = 0.2                                              # relative heading at the second frame
    expected = torch.tensor([2 + 2 * np.cos(heading), 2 * np.sin(heading)], dtype=torch.float32)
    assert torch.allclose(turning[2], expected, atol=1e-5)
    assert (turning[1:, 1] >= 0).all() and turning[3, 1] > 0.5  # a left turn goes to +y


def test_command_and_delta_conditions(tiny_dataset):
    dataset = clips(tiny_dataset, mode='sliding', conditions=('command', 'delta_xy'))
    turning, straight = dataset[0], dataset[4]
    assert torch.equal(turning['condition'], turning['command'])
    assert turning['command'][0].tolist() == [0.0, 1.0]         # [right, left] bits: turning left
    assert straight['command'].abs().sum() == 0                  # straight: neither bit
    # LiDAR frame is x right, y forward: 1 m forward per frame
    assert torch.allclose(straight['delta_xy'], torch.tensor([[0., 1.]] * 4), atol=1e-5)


def test_random_mode_is_reproducible_and_redrawn_per_epoch(tiny_dataset):
    dataset = clips(tiny_dataset, mode='random', times=20, seed=3)
    assert len(dataset) == 2 * 20
    first = [dataset.window(i) for i in range(len(dataset))]
    assert first == [clips(tiny_dataset, mode='random', times=20, seed=3).window(i) for i in range(len(dataset))]
    assert all(0 <= start <= (3 if scene == 0 else 1) for scene, start in first)
    assert {start for scene, start in first if scene == 0} == {0, 1, 2, 3}
    dataset.set_epoch(1)
    assert [dataset.window(i) for i in range(len(dataset))] != first


def test_short_scenes_are_skipped_and_logged(tiny_dataset, caplog):
    with caplog.at_level(logging.WARNING, logger='dataset'):
        dataset = clips(tiny_dataset, num_frames=6, mode='sliding')
    assert {name for name, _, _ in dataset.scenes} == {'scene-a'}
    assert 'skipped 2 scene(s) shorter than 6 frames' in caplog.text and 'scene-b' in caplog.text
    with pytest.raises(ValueError, match='no scene has at least 8 frames'):
        clips(tiny_dataset, num_frames=8)


def test_loader_batches_and_resumes_mid_epoch(tiny_dataset):
    dataset = clips(tiny_dataset, mode='sliding')
    loader = build_loader(dataset, batch_size=2, shuffle=True, seed=5)
    set_epoch(loader, 1)
    order = [batch['start'].tolist() + batch['scene_name'] for batch in loader]
    batch = next(iter(loader))
    assert batch['occupancy'].shape == (2, 4, *GRID_SHAPE) and batch['condition'].shape == (2, 4, 2)
    set_epoch(loader, 1)
    loader.sampler.set_start_index(2)                            # skip the first batch of two samples
    assert [b['start'].tolist() + b['scene_name'] for b in loader] == order[1:]
    set_epoch(loader, 2)
    assert [b['start'].tolist() + b['scene_name'] for b in loader] != order


def test_evaluation_order_visits_every_sample_once_over_any_process_count():
    samples = list(range(5))
    for world_size in (1, 2, 3):
        ranks = [ResumableSampler(samples, shuffle=False, seed=0, drop_last=False, num_replicas=world_size, rank=r)
                 for r in range(world_size)]
        assert sorted(i for sampler in ranks for i in sampler) == samples            # no padding repeats
        assert [len(sampler) for sampler in ranks] == [len(list(sampler)) for sampler in ranks]
    # training keeps DistributedSampler's equal share per rank (DDP needs the same number of steps everywhere)
    training = [ResumableSampler(samples, shuffle=True, seed=0, drop_last=False, num_replicas=2, rank=r)
                for r in range(2)]
    assert [len(list(sampler)) for sampler in training] == [3, 3]


# ---------------------------------------------------------------------------------------------------------------
# Bad input: each error names the file or key
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def copied_dataset(tiny_dataset, tmp_path):
    shutil.copytree(tiny_dataset['gts_root'], tmp_path / 'gts')
    return str(tmp_path / 'gts'), tiny_dataset['scenes']


def first_labels(gts_root, scenes):
    return labels_path(gts_root, 'scene-b', scenes['scene-b'][0]['token'])


def test_missing_labels_file_is_named(copied_dataset, tiny_dataset):
    gts_root, scenes = copied_dataset
    path = first_labels(gts_root, scenes)
    os.remove(path)
    dataset = OccClipDataset(tiny_dataset['info_pkl'], gts_root, num_frames=4, mode='sliding')
    with pytest.raises(FileNotFoundError, match=path):
        dataset[4]


@pytest.mark.parametrize('content, message', [
    (b'not a zip file', 'not a readable .npz'),
    ('corrupt deflate stream', 'corrupt array in .npz file'),
    ({'semantics': np.zeros((200, 200, 8), np.uint8)}, r"'semantics' has shape \(200, 200, 8\)"),
    ({'semantics': np.zeros(GRID_SHAPE, np.int64)}, 'dtype int64, expected'),
    ({'labels': np.zeros(GRID_SHAPE, np.uint8)}, r"missing key\(s\) \['semantics'\]"),
    ({'semantics': np.full(GRID_SHAPE, 30, np.uint8)}, 'holds class 30'),
])
def test_bad_labels_file_is_named(copied_dataset, tiny_dataset, content, message):
    gts_root, scenes = copied_dataset
    path = first_labels(gts_root, scenes)
    if isinstance(content, bytes):
        with open(path, 'wb') as f:
            f.write(content)
    elif isinstance(content, str):                 # a valid file whose compressed bytes are then damaged
        noise = np.random.default_rng(0).integers(0, 18, GRID_SHAPE).astype(np.uint8)
        np.savez_compressed(path, semantics=noise)
        data = bytearray(open(path, 'rb').read())
        data[len(data) // 2:len(data) // 2 + 64] = bytes(b ^ 0xFF for b in data[len(data) // 2:len(data) // 2 + 64])
        with open(path, 'wb') as f:
            f.write(data)
    else:
        np.savez_compressed(path, **content)
    dataset = OccClipDataset(tiny_dataset['info_pkl'], gts_root, num_frames=4, mode='sliding')
    with pytest.raises(ValueError, match=message) as error:
        dataset[4]
    assert path in str(error.value)


def test_bad_info_pickles_are_named(tmp_path, tiny_dataset):
    with pytest.raises(FileNotFoundError, match='missing info pickle'):
        load_infos(str(tmp_path / 'absent.pkl'))
    no_infos = str(tmp_path / 'no_infos.pkl')
    with open(no_infos, 'wb') as f:
        pickle.dump({'data_list': []}, f)
    with pytest.raises(KeyError, match="no_infos.pkl: expected a dict with key 'infos'"):
        load_infos(no_infos)
    frames = make_frames('scene-x', 5)
    del frames[3]['ego2global_rotation']
    info_pkl = write_dataset(str(tmp_path), {'scene-x': frames})
    with pytest.raises(KeyError, match=r"frame 3 of scene-x lacks key\(s\) \['ego2global_rotation'\]"):
        OccClipDataset(info_pkl, str(tmp_path / 'gts'), num_frames=4)
    # the command condition does not need the ego pose
    assert len(OccClipDataset(info_pkl, str(tmp_path / 'gts'), num_frames=4, conditions=('command',))) == 5


@pytest.mark.parametrize('condition, key', [('traj_xy', 'ego2global_translation'),
                                            ('delta_xy', 'gt_ego_fut_trajs')])
def test_a_non_finite_pose_is_named_with_its_scene_and_frame(tmp_path, condition, key):
    frames = make_frames('scene-x', 5)
    frames[2][key] = np.full_like(np.asarray(frames[2][key], np.float64), np.nan)
    info_pkl = write_dataset(str(tmp_path), {'scene-x': frames})
    with pytest.raises(ValueError, match=f"scene scene-x frame 2 has a NaN or infinite value in what the "
                                         f"'{condition}' condition is built from"):
        OccClipDataset(info_pkl, str(tmp_path / 'gts'), num_frames=4, conditions=(condition,))


def test_bad_arguments_are_refused(tiny_dataset):
    with pytest.raises(ValueError, match="mode must be 'random' or 'sliding'"):
        clips(tiny_dataset, mode='shuffle')
    with pytest.raises(ValueError, match='conditions must be a non-empty subset'):
        clips(tiny_dataset, conditions=('yaw',))
