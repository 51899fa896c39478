"""Generation metrics (evaluation/evaluate.py): known answers of the distances, streaming of clip files, and the command
on tiny .npz files and a dataset split."""
import json

import numpy as np
import pytest
import torch

from dataset.constants import FREE_CLASS, GRID_SHAPE, SEMANTIC_CLASSES
from evaluation.evaluate import frechet_distance, js_divergence_bits, main, npz_clips, polynomial_mmd
from evaluation.occ_features import OccFeatureEncoder
from tests.test_ego_motion import in_first_frame, make_world, moving_clip, path_poses
from utils.checkpoint import atomic_save, file_sha256


def test_frechet_distance_known_answers():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(200, 8)) @ rng.normal(size=(8, 8))
    assert frechet_distance(features, features) == pytest.approx(0, abs=1e-6)
    # a shift by c moves only the means: ||c||^2
    shift = np.arange(8.0)
    assert frechet_distance(features, features + shift) == pytest.approx((shift ** 2).sum(), rel=1e-6)
    # scaling by 2: ||mu||^2 + Tr(S + 4S - 2 (4 S^2)^(1/2)) = ||mu||^2 + Tr(S)
    expected = (features.mean(0) ** 2).sum() + np.trace(np.cov(features, rowvar=False))
    assert frechet_distance(features, 2 * features) == pytest.approx(expected, rel=1e-6)


def test_polynomial_mmd_known_answers():
    zeros, ones = np.zeros((5, 4)), np.ones((6, 4))
    assert polynomial_mmd(zeros, zeros) == pytest.approx(0)
    # k(0, 0) = 1, k(1, 1) = (4 / 4 + 1)^3 = 8, k(0, 1) = 1: 1 + 8 - 2 * 1
    assert polynomial_mmd(zeros, ones) == pytest.approx(7)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 8)), rng.normal(size=(300, 8))
    same = polynomial_mmd(a, b)
    # unbiased: about 0 for two draws of one distribution; for a set with itself it is -O(1 / N), not exactly 0
    assert abs(same) < 0.05 and -0.1 < polynomial_mmd(a, a) < 0
    assert polynomial_mmd(a, b + 1.0) > 20 * max(abs(same), 1e-3)


def test_js_divergence_in_bits():
    assert js_divergence_bits([3, 1, 0], [6, 2, 0]) == pytest.approx(0)
    assert js_divergence_bits([1, 0], [0, 1]) == pytest.approx(1)
    # p = (1, 0), q = (1/2, 1/2), m = (3/4, 1/4): (log2(4/3) + 1/2 log2(2/3) + 1/2 log2(2)) / 2
    expected = 0.5 * np.log2(4 / 3) + 0.25 * (np.log2(2 / 3) + 1)
    assert js_divergence_bits([1, 0], [1, 1]) == pytest.approx(expected)


def test_npz_clips_streams_the_array(tmp_path):
    rng = np.random.default_rng(0)
    occupancy = rng.integers(0, FREE_CLASS + 1, (3, 2, *GRID_SHAPE), dtype=np.uint8)
    np.savez_compressed(tmp_path / 'clips.npz', occupancy=occupancy)
    shape, clips = npz_clips(str(tmp_path / 'clips.npz'))
    assert shape == (3, 2)
    np.testing.assert_array_equal(np.stack(list(clips)), occupancy)
    np.savez_compressed(tmp_path / 'bad.npz', occupancy=occupancy[:, :, :10])
    with pytest.raises(ValueError, match="'occupancy' is"):
        npz_clips(str(tmp_path / 'bad.npz'))
    with pytest.raises(KeyError, match='no .semantics. array'):
        npz_clips(str(tmp_path / 'bad.npz'), key='semantics')


@pytest.fixture(scope='module')
def clip_files(tmp_path_factory):
    """Samples (2 clips of 3 frames along known paths, with their traj), a reference .npz and a feature
    checkpoint of an untrained (seeded) encoder."""
    root = tmp_path_factory.mktemp('evaluate')
    world = make_world()
    paths = [path_poses(3, 3.0, 0.0, start=(-10.0, 2.0, 0.3)), path_poses(3, 1.5, 0.1, start=(5.0, -5.0, -0.2))]
    occupancy = np.stack([moving_clip(world, poses) for poses in paths])
    traj = np.stack([in_first_frame(poses)[:, :2] for poses in paths]).astype(np.float32)
    np.savez_compressed(root / 'samples.npz', occupancy=occupancy, traj=traj, condition='traj_xy')
    np.savez_compressed(root / 'no_traj.npz', occupancy=occupancy)
    np.savez_compressed(root / 'reference.npz', occupancy=occupancy[::-1], traj=traj[::-1])
    torch.manual_seed(0)
    atomic_save({'model': OccFeatureEncoder(width=8, feature_dim=16).state_dict(),
                 'model_args': {'width': 8, 'feature_dim': 16}, 'training': {'steps': 0}}, str(root / 'features.pt'))
    return root


def test_command_on_npz_files(clip_files, capsys):
    out = clip_files / 'metrics.json'
    result = main(['--samples', str(clip_files / 'samples.npz'), '--reference', str(clip_files / 'reference.npz'),
                   '--features', str(clip_files / 'features.pt'), '--out', str(out)])
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text()) == json.loads(json.dumps(result))
    for key in ('adherence_ade_m', 'adherence_fde_m', 'frechet_distance', 'mmd', 'class_js_divergence',
                'static_consistency', 'reference_static_consistency', 'reference_adherence_ade_m'):
        assert isinstance(printed[key], float), key
    assert printed['num_samples'] == 2 and printed['num_frames'] == 3
    assert printed['features']['sha256'] == file_sha256(str(clip_files / 'features.pt'))
    # the clips follow their trajectories; the reference is the same clips, so the set metrics vanish
    assert printed['adherence_fde_m'] < 0.4 and len(printed['adherence_per_clip']) == 2
    assert printed['shuffled_adherence_ade_m'] > 3 * printed['adherence_ade_m'] + 0.5
    assert printed['static_consistency'] > 0.9
    assert printed['frechet_distance'] == pytest.approx(0, abs=1e-3)
    assert printed['class_js_divergence'] == pytest.approx(0, abs=1e-12)
    assert set(printed['class_frequencies']['samples']) == {n for n in printed['class_frequencies']['reference']}
    assert len(printed['class_frequencies']['samples']) == len(SEMANTIC_CLASSES)


def test_mismatched_trajectories_score_badly(clip_files, tmp_path):
    with np.load(clip_files / 'samples.npz') as npz:
        np.savez_compressed(tmp_path / 'swapped.npz', occupancy=npz['occupancy'], traj=npz['traj'][::-1])
    result = main(['--samples', str(tmp_path / 'swapped.npz')])
    assert result['adherence_fde_m'] > 2.0
    # shuffling the swapped set (two clips) gives each clip its own trajectory back
    assert result['shuffled_adherence_ade_m'] < 0.4 < result['adherence_ade_m']
    assert 'frechet_distance' not in result


def test_samples_without_traj_is_a_clear_error(clip_files):
    with pytest.raises(KeyError, match="no 'traj' array"):
        main(['--samples', str(clip_files / 'no_traj.npz')])


def test_reference_from_a_dataset_split(clip_files, tiny_dataset, tmp_path):
    config = tmp_path / 'reference_config.py'
    config.write_text(
        f"dataset = dict(train_pkl={tiny_dataset['info_pkl']!r}, val_pkl={tiny_dataset['info_pkl']!r},\n"
        f"    common=dict(gts_root={tiny_dataset['gts_root']!r}, num_frames=2), train=dict(), val=dict(stride=2))\n")
    result = main(['--samples', str(clip_files / 'samples.npz'), '--reference-config', str(config),
                   '--reference-split', 'val', '--features', str(clip_files / 'features.pt'), '--max-clips', '2'])
    assert result['num_reference'] == 2 and result['reference'].endswith(':val')
    assert result['frechet_distance'] > 0 and result['class_js_divergence'] > 0.1
    assert 'reference_adherence_ade_m' in result


def test_command_line_errors(clip_files):
    with pytest.raises(SystemExit):
        main([])
    with pytest.raises(SystemExit):
        main(['--samples', str(clip_files / 'samples.npz'), '--reference', 'a.npz', '--reference-config', 'c.py'])
    with pytest.raises(FileNotFoundError, match='missing clip file'):
        main(['--samples', str(clip_files / 'missing.npz')])
