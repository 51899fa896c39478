"""The occupancy feature extractor (evaluation/occ_features.py): input encoding and targets by hand, any clip length,
batch-independent features, and the train command end to end on the tiny dataset."""
import numpy as np
import pytest
import torch

from dataset.clips import OccClipDataset
from dataset.constants import CLASS_ID, FREE_CLASS, GRID_SHAPE, SEMANTIC_CLASSES
from evaluation.occ_features import (BLOCK, FEATURE_DIM, MOTION_SCALE_M, OccFeatureEncoder, _TrainingClips, clip_input,
                                clip_targets, extract_features, file_sha256, load_feature_extractor, main, objective,
                                target_sizes)
from utils.checkpoint import load_checkpoint

Z_BLOCKS = GRID_SHAPE[2] // BLOCK[2]
INPUT_CHANNELS = len(SEMANTIC_CLASSES) * Z_BLOCKS
INPUT_CELLS = (GRID_SHAPE[0] // BLOCK[0], GRID_SHAPE[1] // BLOCK[1])


def empty_clip(num_frames):
    return np.full((num_frames, *GRID_SHAPE), FREE_CLASS, np.uint8)


def test_clip_input_counts_class_fractions_per_block():
    clip = empty_clip(2)
    clip[1, 8:12, 4:8, 4:8] = CLASS_ID['manmade']            # one whole block: x block 2, y block 1, z block 1
    clip[1, 0, 0, 0] = CLASS_ID['car']                          # one voxel of the first block
    inputs = clip_input(clip)
    assert inputs.shape == (INPUT_CHANNELS, 2, *INPUT_CELLS)
    assert inputs[:, 0].sum() == 0                               # frame 0 is all free
    assert inputs[CLASS_ID['manmade'] * Z_BLOCKS + 1, 1, 2, 1] == 1
    assert inputs[CLASS_ID['car'] * Z_BLOCKS + 0, 1, 0, 0] == pytest.approx(1 / 64)
    assert inputs.sum() == pytest.approx(1 + 1 / 64)


def test_clip_targets_by_hand():
    clip = empty_clip(3)
    clip[:, :, :, 0] = CLASS_ID['driveable_surface']            # the whole ground slab, every frame
    traj = np.array([[0.0, 0.0], [2.0, 0.0], [4.0, 1.0]], np.float32)
    targets = clip_targets(clip_input(clip), traj)
    assert {k: len(v) for k, v in targets.items()} == {k: n for k, n in target_sizes().items() if k != 'in_order'}
    expected_classes = np.zeros(len(SEMANTIC_CLASSES))
    expected_classes[CLASS_ID['driveable_surface']] = np.sqrt(1 / GRID_SHAPE[2])
    np.testing.assert_allclose(targets['classes'], expected_classes, atol=1e-6)
    assert targets['layout'].max() == pytest.approx(np.sqrt(1 / GRID_SHAPE[2]))
    speed = (2.0 + np.hypot(2.0, 1.0)) / 2
    np.testing.assert_allclose(targets['motion'], np.array([2.0, 0.5, speed]) / MOTION_SCALE_M, rtol=1e-6)


def test_objective_by_hand():
    predictions = {k: torch.zeros(2, n) for k, n in target_sizes().items()}
    targets = {k: torch.ones(2, n) for k, n in target_sizes().items() if k != 'in_order'}
    targets['in_order'] = torch.tensor([1.0, 0.0])
    loss, accuracy = objective(predictions, targets)
    # BCE of logit 0 is ln 2; each regression group's error is 1, counted for the in-order clip only
    assert loss.item() == pytest.approx(np.log(2) + 3)
    assert accuracy.item() == pytest.approx(0.5)
    targets['in_order'] = torch.tensor([0.0, 0.0])
    assert objective(predictions, targets)[0].item() == pytest.approx(np.log(2))


def test_training_clips_shuffle_frames_deterministically(tiny_dataset):
    clips = OccClipDataset(tiny_dataset['info_pkl'], tiny_dataset['gts_root'], num_frames=4, mode='sliding')
    training = _TrainingClips(clips, seed=0)
    orders = []
    for index in range(len(training)):
        inputs, targets = training[index]
        again, _ = training[index]
        assert torch.equal(inputs, again)
        ordered = clip_input(clips[index]['occupancy'].numpy())                       # (C_in, T, X', Y')
        if targets['in_order'] == 1:
            assert torch.equal(inputs, ordered)
        else:                    # the same frames in another order (each frame of the tiny dataset is distinct)
            source = [[torch.equal(a, b) for b in ordered.unbind(1)].index(True) for a in inputs.unbind(1)]
            assert sorted(source) == list(range(4)) and source != list(range(4))
        orders.append(int(targets['in_order']))
    assert 0 < sum(orders) < len(orders)


@pytest.mark.parametrize('num_frames', [1, 2, 8])
def test_features_for_any_clip_length(num_frames):
    torch.manual_seed(0)
    model = OccFeatureEncoder(width=8, feature_dim=16)
    inputs = torch.rand(2, INPUT_CHANNELS, num_frames, *INPUT_CELLS)
    assert model.features(inputs).shape == (2, 16)
    assert {k: v.shape[1] for k, v in model(inputs).items()} == target_sizes()


def test_extract_features_is_deterministic_and_batch_independent():
    torch.manual_seed(0)
    model = OccFeatureEncoder(width=8, feature_dim=16)
    rng = np.random.default_rng(0)
    clips = rng.integers(0, FREE_CLASS + 1, (3, 2, *GRID_SHAPE), dtype=np.uint8)
    together = extract_features(model, clips, batch_size=3)
    one_by_one = extract_features(model, list(clips), batch_size=1)
    assert together.shape == (3, 16) and together.dtype == np.float64
    np.testing.assert_allclose(together, one_by_one, rtol=1e-4, atol=1e-5)
    assert np.abs(together[0] - together[1]).max() > 0


def test_clip_input_rejects_bad_clips():
    with pytest.raises(ValueError, match='uint8'):
        clip_input(np.zeros((2, *GRID_SHAPE), np.int64))
    with pytest.raises(ValueError, match='clip must be'):
        clip_input(np.zeros((2, 100, 100, 16), np.uint8))


def test_train_command_writes_a_self_describing_checkpoint(tiny_dataset, tmp_path):
    config = tmp_path / 'features_config.py'
    config.write_text(
        f"dataset = dict(train_pkl={tiny_dataset['info_pkl']!r}, val_pkl={tiny_dataset['info_pkl']!r},\n"
        f"    common=dict(gts_root={tiny_dataset['gts_root']!r}, num_frames=4, conditions=('traj_xy',)),\n"
        f"    train=dict(mode='random', times=2), val=dict(mode='sliding', stride=2))\n"
        f"num_workers = 0\n")
    out = tmp_path / 'features.pt'
    main(['train', '--py-config', str(config), '--out', str(out), '--steps', '2', '--batch-size', '2',
          '--width', '8', '--feature-dim', '16'])
    checkpoint = load_checkpoint(str(out), ('model', 'model_args', 'training'))
    assert checkpoint['model_args'] == {'width': 8, 'feature_dim': 16}
    assert checkpoint['training']['steps'] == 2 and checkpoint['training']['num_frames'] == 4
    assert np.isfinite(checkpoint['training']['val_loss'])
    assert 0 <= checkpoint['training']['val_order_accuracy'] <= 1
    model, _ = load_feature_extractor(str(out))
    assert not model.training
    assert extract_features(model, empty_clip(4)[None]).shape == (1, 16)
    assert len(file_sha256(str(out))) == 64


def test_default_feature_dim():
    assert OccFeatureEncoder().features(torch.zeros(1, INPUT_CHANNELS, 2, *INPUT_CELLS)).shape == (1, FEATURE_DIM)
