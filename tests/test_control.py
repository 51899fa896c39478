"""Trajectory control (evaluation/control.py): clips that turn the way their files are named pass, the same clip
for left and right fails, and the ground truth of the counterfactual world scores at its true headings."""
import json

import numpy as np
import pytest

from evaluation.control import Thresholds, main, manoeuvre_of
from tests.test_ego_motion import in_first_frame, make_world, moving_clip, path_poses

NUM_FRAMES = 8
YAW_RATES = {'straight': 0.0, 'left': 0.18, 'right': -0.15}        # radians per frame: 0, +72, -60 degrees


@pytest.fixture(scope='module')
def clips():
    """Manoeuvre -> (occupancy (2, T, X, Y, Z) uint8, traj (2, T, 2)): two starts per manoeuvre in a static world."""
    world, result = make_world(), {}
    for name, yaw_rate in YAW_RATES.items():
        occupancy, traj = [], []
        for start in ((-10.0, 2.0, 0.3), (5.0, -4.0, -0.2)):
            poses = path_poses(NUM_FRAMES, 3.0, yaw_rate, start=start)
            occupancy.append(moving_clip(world, poses, with_car=False))
            traj.append(in_first_frame(poses)[:, :2])
        result[name] = np.stack(occupancy), np.stack(traj).astype(np.float32)
    return result


def _write(path, occupancy, traj, **extra):
    np.savez_compressed(path, occupancy=occupancy, traj=traj, condition='traj_xy', **extra)
    return str(path)


def test_clips_that_turn_as_named_pass(clips, tmp_path):
    paths = [_write(tmp_path / f'{name}-ddim50-cfg2-seed0.npz', *clips[name]) for name in YAW_RATES]
    out = tmp_path / 'control.json'
    result = main(['--samples', *paths, '--out', str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result['criterion_met'] is True
    for file, (name, yaw_rate) in zip(result['files'], YAW_RATES.items()):
        assert file['manoeuvre'] == name and file['passes'] == 2 and file['pass_fraction'] == 1.0
        true_heading = np.degrees(yaw_rate * (NUM_FRAMES - 1))
        for sample in file['samples']:
            assert sample['heading_deg'] == pytest.approx(true_heading, abs=1.0)
            assert sample['ade_m'] < 0.2 and sample['closest_to_own'] and sample['passes']
            assert min(sample['counterfactual_ade_m']) > 5 * sample['ade_m']
            assert len(sample['counterfactual_ade_m']) == len(sample['counterfactual_fde_m']) == 2
        assert file['closest_to_own'] == 2 and file['counterfactual_ade_m'] > 5 * file['ade_m']


def test_the_same_clip_for_left_and_right_fails(clips, tmp_path):
    left = _write(tmp_path / 'left.npz', *clips['left'])
    right = _write(tmp_path / 'right.npz', clips['left'][0], clips['right'][1])
    result = main(['--samples', left, right])
    assert result['criterion_met'] is False
    assert [f['passes'] for f in result['files']] == [2, 0]
    # with its own (left) trajectories the wrongly named file still fails, and no file is closer to its own
    mislabelled = _write(tmp_path / 'also_left.npz', *clips['left'])
    result = main(['--samples', left, mislabelled, '--names', 'left', 'right'])
    assert result['criterion_met'] is False and [f['closest_to_own'] for f in result['files']] == [0, 0]


def test_thresholds_names_and_bad_input(clips, tmp_path):
    thresholds = Thresholds()
    assert thresholds.passes('left', 45.0) and not thresholds.passes('left', 44.9)
    assert thresholds.passes('right', -45.0) and not thresholds.passes('straight', -15.1)
    assert thresholds.passes('stop', 0.0) is None
    assert [thresholds.classify(h) for h in (60, 10, -30, -90)] == ['left', 'straight', 'between', 'right']
    assert manoeuvre_of('out/samples/left.npz') == 'left' and manoeuvre_of('right-n64-ddim50.npz') == 'right'
    straight = _write(tmp_path / 'straight.npz', *clips['straight'])
    # a stricter threshold, and a name without one (scored, not passed)
    result = main(['--samples', straight, straight, '--names', 'straight', 'stop', '--straight-deg', '0.5'])
    assert [f['passes'] for f in result['files']] == [2, None] and result['criterion_met'] is True
    short = _write(tmp_path / 'short.npz', clips['left'][0][:1], clips['left'][1][:1])
    with pytest.raises(ValueError, match='same number of samples and frames'):
        main(['--samples', straight, short])
    unconditional = _write(tmp_path / 'none.npz', *clips['straight'], unconditional=True)
    with pytest.raises(ValueError, match='unconditional'):
        main(['--samples', unconditional])
    for argv in (['--samples', straight, '--world', str(tmp_path)], ['--samples', straight, '--names', 'a', 'b'],
                 ['--samples', straight, '--left-deg', '10'], ['--samples', straight, '--write-clips', 'x']):
        with pytest.raises(SystemExit):
            main(argv)


def test_ground_truth_of_the_counterfactual_world(counterfactual_world, tmp_path):
    result = main(['--world', counterfactual_world, '--split', 'val', '--out', str(tmp_path / 'gt.json')])
    assert result['windows'] == 6                                        # 3 scenes x starts 0 and 4
    for window in result['per_window']:
        assert window['recovered_heading_deg'] == pytest.approx(window['true_heading_deg'], abs=1.0)
    for manoeuvre, groups in result['by_scene_manoeuvre'].items():
        first = groups['first_windows']
        assert first['windows'] == 1 and first['true_classes'][manoeuvre] == 1
        assert first['recovered_passes_true_class'] == 1
    for group in result['by_true_heading'].values():
        assert group['recovered_passes_true_class'] == group['windows']
    adherence = result['adherence']
    assert adherence['ade_m'] < 0.3 and adherence['counterfactual_ade_m'] > 10 * adherence['ade_m']

    written = main(['--world', counterfactual_world, '--split', 'val', '--write-clips', str(tmp_path / 'clips')])
    assert written['clips'] == 1 and written['frames'] == NUM_FRAMES
    with np.load(written['wrote']['left']) as npz:
        assert npz['occupancy'].shape == (1, NUM_FRAMES, 200, 200, 16) and npz['traj'].shape == (1, NUM_FRAMES, 2)
        assert npz['scene_name'].tolist() == ['scene-0001-left'] and str(npz['condition']) == 'traj_xy'
    scored = main(['--samples', *written['wrote'].values()])
    assert scored['criterion_met'] is True and [f['passes'] for f in scored['files']] == [1, 1, 1]
