"""Forecasting and rollouts (model/rollout.py, evaluation/forecast.py, sample.py --context / --num-frames,
train_2.py known_prefix): the window layout, trajectories continued past the clip, seam consistency, and end to end
on the tiny tokenizer of tests/conftest.py run on 4-frame clips (its temporal factor 2 makes them 2 latent steps,
the fewest that can be forecast), with a DiT trained in this process with known_prefix on."""
import json
import os
import runpy
import shutil
import sys

import numpy as np
import pytest
import torch
from mmengine.config import Config

from dataset.clips import OccClipDataset
from dataset.constants import CLASS_ID, FREE_CLASS, GRID_SHAPE, KEYFRAME_HZ
from dataset.ego_warp import follow_ego_motion, warp_frames
from dataset.loader import build_dataset
from dataset.tokens import LatentCodec
from dataset.trajectories import PRESET_SPEED, preset_path
from evaluation import control, forecast
from evaluation.constant_velocity import constant_velocity_copy
from evaluation.ego_motion import recover_poses, static_consistency_counts
from evaluation.fill_head import extrude_into_view
from evaluation.metrics import OccupancyMetrics
from model.dit import build_dit
from model.pipeline import load_dit
from model.rollout import (assemble, clip_window_conditions, context_steps, decode_windows, default_context_frames,
                           guided_model_fn, preset_window_conditions, window_starts)
from model.sampling import sample_rollout
from model.trajectory_map import chain_static_warp, headings
from model.pipeline import load_tokenizer
from tests.pipeline import DIT_ARGS, REPO, read_jsonl
from utils.checkpoint import load_checkpoint

FRAMES = 4                        # clip length of the forecasting runs: 2 latent steps of 2 frames
CONTEXT = 2                       # known frames: one latent step
LATENT = [8, 2, 25, 25]
DIT_STEPS = 4


def run_in_process(script, *args):
    """``python script args`` in this process (same CLI, no new interpreter); the global RNG is restored."""
    with pytest.MonkeyPatch.context() as patch, torch.random.fork_rng():
        patch.chdir(REPO)
        patch.setattr(sys, 'argv', [script, *map(str, args)])
        runpy.run_path(os.path.join(REPO, script), run_name='__main__')


def run_forecast(*args):
    """``python -m evaluation.forecast args`` in this process: the JSON-ready result."""
    return forecast.main([str(arg) for arg in args])


@pytest.fixture(scope='module')
def token_dir(tokenizer_config, tokenizer_run, tmp_path_factory):
    """step02 tokens of 4-frame clips, encoded with the pipeline's tiny tokenizer (stride 4: 6 train, 3 val)."""
    work_dir = tmp_path_factory.mktemp('forecast_vqvae')
    run_in_process('step02.py', '--py-config', tokenizer_config, '--work-dir', work_dir, '--ckpt',
                   os.path.join(tokenizer_run, 'latest.pth'), '--stride', 4, '--cfg-options', f'num_frames={FRAMES}',
                   f'dataset.common.num_frames={FRAMES}')
    return str(work_dir / 'tokens')


def train_command(token_dir, results_dir, max_steps, *extra):
    return ('train_2.py', '--data-path', token_dir, '--results-dir', results_dir, '--max-steps', max_steps,
            *DIT_ARGS, 'known_prefix.enabled=True', *extra)


@pytest.fixture(scope='module')
def dit_run(token_dir, tmp_path_factory):
    """A known-prefix DiT trained for DIT_STEPS steps: its run directory."""
    results_dir = tmp_path_factory.mktemp('forecast_results')
    run_in_process(*train_command(token_dir, results_dir, DIT_STEPS))
    return str(results_dir / '000-DiT-demo')


@pytest.fixture(scope='module')
def ckpt(dit_run):
    return os.path.join(dit_run, 'checkpoints', 'latest.pt')


@pytest.fixture(scope='module')
def parts(ckpt, token_dir):
    """(DiT, tokenizer, codec) of the run, on the CPU."""
    model, _ = load_dit(ckpt)
    with open(os.path.join(token_dir, 'meta.json')) as f:
        tokenizer_path = os.path.join(token_dir, json.load(f)['tokenizer']['checkpoint'])
    return model, load_tokenizer(tokenizer_path)[0], LatentCodec(token_dir)


def decode(tokenizer, codec, x):
    """argmax decode of DiT-space latents (N, C, T', H', W'): (N, T, X, Y, Z) uint8."""
    with torch.no_grad():
        return tokenizer.decode(codec.from_model(x)).argmax(-1).to(torch.uint8)


# ---------------------------------------------------------------------------------------------------------------
# Window layout and trajectories

def test_window_layout_known_answers():
    assert context_steps(8, 32, 4) == 1 and context_steps(24, 32, 4) == 3
    assert default_context_frames(32, 4) == 16 and default_context_frames(16, 2) == 8
    with pytest.raises(ValueError, match='--context-frames 12: must be a multiple of .* factor 8 between 8 and 24'):
        context_steps(12, 32, 4)
    with pytest.raises(ValueError, match='--context-frames 32: must be a multiple'):
        context_steps(32, 32, 4)
    with pytest.raises(ValueError, match='single latent time step .* forecasting and rollouts are impossible'):
        context_steps(8, 8, 1)
    assert window_starts(32, 32, 8) == [0]
    assert window_starts(56, 32, 8) == [0, 24] and window_starts(57, 32, 8) == [0, 24, 48]
    assert forecast.seam_frames([0, 24, 48], 8) == [32, 56]
    windows = [torch.arange(4)[None] + 10 * w for w in range(3)]                    # (1, 4) "frames" 10w .. 10w+3
    assert assemble(windows, 1, axis=1).tolist() == [[0, 1, 2, 3, 11, 12, 13, 21, 22, 23]]


def test_preset_is_continued_and_re_expressed_in_each_window():
    starts = [0, 4, 8]
    full, windows = preset_window_conditions('left', 8, starts, 'traj_xy')
    assert full.shape == (16, 2) and windows.shape == (3, 8, 2)
    np.testing.assert_allclose(full[:8], windows[0], atol=1e-6)          # the run is told in the first frame's terms
    one_clip = preset_window_conditions('left', num_frames=8, starts=[0], condition='traj_xy')[0]
    np.testing.assert_allclose(windows[0], one_clip, atol=1e-6)                # window 0 is the plain clip's
    x, y, yaw = preset_path('left', 8, extra_frames=8)                      # the manoeuvre of the first clip only
    for start, window in zip(starts, windows):
        # positions relative to the window's first frame, rotated into its heading
        dx, dy = x[start:start + 8] - x[start], y[start:start + 8] - y[start]
        cos, sin = np.cos(yaw[start]), np.sin(yaw[start])
        np.testing.assert_allclose(window, np.stack([cos * dx + sin * dy, -sin * dx + cos * dy], 1), atol=1e-5)
    # after the turn it drives straight on at the preset speed
    np.testing.assert_allclose(windows[2][:, 0], np.arange(8) * PRESET_SPEED / KEYFRAME_HZ, atol=1e-5)
    straight_full, straight = preset_window_conditions('straight', 8, starts, 'traj_xy')
    one_clip = preset_window_conditions('straight', num_frames=16, starts=[0], condition='traj_xy')[0]
    np.testing.assert_allclose(straight_full, one_clip, atol=1e-5)
    assert all(np.allclose(window, straight[0], atol=1e-5) for window in straight)


def test_clip_window_conditions_cut_as_the_dataset_does(world):
    info_pkl = os.path.join(world, 'nuscenes_infos_train_temporal_v3_scene.pkl')
    gts_root = os.path.join(world, 'nuscenes', 'gts')
    long = OccClipDataset(info_pkl, gts_root, num_frames=7, mode='sliding', stride=5, conditions=('traj_xy',))
    short = OccClipDataset(info_pkl, gts_root, num_frames=4, mode='sliding', stride=1, conditions=('traj_xy',))
    starts = {window: index for index, window in enumerate(short.windows)}
    for index in range(len(long)):
        scene, first = long.window(index)
        full, windows = clip_window_conditions(long, index, [0, 3], 4, 'traj_xy')
        np.testing.assert_allclose(full, long[index]['traj_xy'].numpy(), atol=1e-6)
        for start, window in zip([0, 3], windows):
            np.testing.assert_allclose(window, short[starts[(scene, first + start)]]['traj_xy'].numpy(), atol=1e-6)


def test_seam_consistency_splits_the_frame_pairs(world):
    dataset = OccClipDataset(os.path.join(world, 'nuscenes_infos_train_temporal_v3_scene.pkl'),
                             os.path.join(world, 'nuscenes', 'gts'), num_frames=4, mode='sliding', stride=8)
    clip = dataset[0]['occupancy'].numpy()
    counts = forecast.seam_consistency(clip, [2])
    seam, within = counts['seam'], counts['within']
    total = static_consistency_counts(clip, recover_poses(clip))
    assert (seam[0] + within[0], seam[1] + within[1]) == total and seam[1] > 0
    # a clip whose second half is mirrored jumps at the seam and nowhere else
    jumped = np.concatenate([clip[:2], clip[2:, :, ::-1]])
    jumped_counts = forecast.seam_consistency(jumped, [2])
    ratio = {key: matches / compared for key, (matches, compared) in jumped_counts.items()}
    assert ratio['seam'] < ratio['within'] - 0.2, ratio
    assert ratio['within'] > 0.8


# ---------------------------------------------------------------------------------------------------------------
# train_2.py with known_prefix

def test_train_2_records_known_prefix_and_resumes_exactly(dit_run, token_dir, tmp_path):
    checkpoint = load_checkpoint(os.path.join(dit_run, 'checkpoints', 'latest.pt'))
    assert checkpoint['model_args']['known_prefix'] is True and checkpoint['args']['known_prefix']['prob'] == 0.5
    model = build_dit(**checkpoint['model_args'])
    model.load_state_dict(checkpoint['ema'])                                         # strict
    assert model.token_embed[0].in_channels == 2 * LATENT[0] + 1
    # stop at step 2, resume: steps 3 and 4 repeat the uninterrupted run (prefixes come from the saved RNG)
    run_in_process(*train_command(token_dir, tmp_path, 2))
    latest = tmp_path / '000-DiT-demo' / 'checkpoints' / 'latest.pt'
    run_in_process(*train_command(token_dir, tmp_path, DIT_STEPS), '--ckpt', latest)
    reference = read_jsonl(os.path.join(dit_run, 'metrics.jsonl'))
    resumed = read_jsonl(tmp_path / '000-DiT-demo' / 'metrics.jsonl')
    assert [r['step'] for r in resumed] == [r['step'] for r in reference] == list(range(1, DIT_STEPS + 1))
    for ours, theirs in zip(resumed, reference):
        for key in ('loss', 'mse', 'vb'):
            assert abs(ours[key] - theirs[key]) <= 1e-6 * max(1.0, abs(theirs[key])), (ours['step'], key)
    # resuming with the flag off would build another network
    with pytest.raises(ValueError, match='known_prefix.enabled True -> False'):
        run_in_process('train_2.py', '--data-path', token_dir, '--results-dir', tmp_path, '--max-steps', 6,
                       *DIT_ARGS, '--ckpt', latest)


def test_train_2_refuses_known_prefix_with_one_latent_step(token_dir, tmp_path):
    single = tmp_path / 'tokens'
    shutil.copytree(token_dir, single)
    meta = json.loads((single / 'meta.json').read_text())
    meta['latent_shape'][1] = 1
    (single / 'meta.json').write_text(json.dumps(meta))
    with pytest.raises(ValueError, match='known_prefix.enabled=True needs at least 2 latent time steps'):
        run_in_process(*train_command(single, tmp_path / 'results', 1))


# ---------------------------------------------------------------------------------------------------------------
# sample.py: context and rollouts

def sample_args(ckpt, out, *options):
    return ('sample.py', '--ckpt', ckpt, '--sampler', 'ddim', '--num-sampling-steps', 3, '--cfg-scale', 2,
            '--num-samples', 2, '--seed', 0, '--out', out, *options)


def test_two_window_rollout_has_the_expected_length_and_its_seam_frames_equal_the_overlap(parts):
    model, tokenizer, codec = parts
    traj = torch.randn(2, FRAMES, 2)
    windows = sample_rollout(lambda w, known, mask: guided_model_fn(model, traj, 2.0, known, mask),
                             (2, *LATENT), 2, 1, 'ddim', 3, progress=False, generator=torch.Generator().manual_seed(0))
    assert torch.equal(windows[1][:, :, :1], windows[0][:, :, 1:])
    latents, occupancy = decode_windows(tokenizer, codec, windows, 1, CONTEXT)
    assert latents.shape == (2, LATENT[0], 3, *LATENT[2:]) and occupancy.shape[:2] == (2, 6)
    first, second = decode(tokenizer, codec, windows[0]), decode(tokenizer, codec, windows[1])
    assert torch.equal(occupancy[:, :FRAMES], first)                  # the overlap frames: the first window's
    assert torch.equal(occupancy[:, FRAMES:], second[:, CONTEXT:])


def test_sample_rolls_out_presets_and_dataset_trajectories(ckpt, world, tmp_path):
    run_in_process(*sample_args(ckpt, tmp_path / 'left.npz', '--traj', 'left', '--num-frames', 7))
    with np.load(tmp_path / 'left.npz') as sample:
        assert sample['occupancy'].shape[:2] == (2, 7) and sample['latents'].shape == (2, LATENT[0], 4, 25, 25)
        assert sample['window_starts'].tolist() == [0, 2, 4] and int(sample['context_frames']) == CONTEXT
        full, _ = preset_window_conditions('left', FRAMES, [0, 2, 4], 'traj_xy')
        np.testing.assert_allclose(sample['traj'], np.broadcast_to(full[:7], (2, 7, 2)), atol=1e-6)
        occupancy = sample['occupancy']
    # --seams: the rollout's seams (frames 4 and 6) against the pairs inside its windows, sample by sample
    seams = run_forecast('--seams', tmp_path / 'left.npz', '--out', tmp_path / 'seams.json')
    assert json.loads((tmp_path / 'seams.json').read_text()) == json.loads(json.dumps(seams))
    assert seams['samples'] == 2 and seams['frames'] == 7 and seams['seam_frames'] == [4, 6]
    counts = [forecast.seam_consistency(clip, [4, 6]) for clip in occupancy]
    assert seams['per_sample'] == [{key: m / c for key, (m, c) in sample.items()} for sample in counts]
    assert seams['static_consistency']['seam'] == (sum(sample['seam'][0] for sample in counts)
                                                  / sum(sample['seam'][1] for sample in counts))

    run_in_process(*sample_args(ckpt, tmp_path / 'dataset.npz', '--traj', 'dataset', '--num-frames', 6))
    val = OccClipDataset(os.path.join(world, 'nuscenes_infos_val_temporal_v3_scene.pkl'),
                         os.path.join(world, 'nuscenes', 'gts'), num_frames=6, mode='sliding', stride=1)
    with np.load(tmp_path / 'dataset.npz') as sample:
        assert sample['occupancy'].shape[:2] == (2, 6)
        truths = [val[i]['traj_xy'].numpy() for i in range(len(val))]
        assert all(any(np.allclose(traj, truth, atol=1e-5) for truth in truths) for traj in sample['traj'])


def test_sample_forecasts_from_a_context_file(ckpt, parts, tmp_path):
    _, tokenizer, codec = parts
    clips = tmp_path / 'clips.npz'
    run_forecast('--ckpt', ckpt, '--write-clips', clips, '--num-clips', 2)
    with np.load(clips) as written:
        occupancy, traj = written['occupancy'], written['traj']
        assert occupancy.shape[:2] == (2, FRAMES) and traj.shape == (2, FRAMES, 2)
        assert str(written['condition']) == 'traj_xy'
    run_in_process(*sample_args(ckpt, tmp_path / 'forecast.npz', '--context', clips, '--context-frames', CONTEXT,
                                '--traj', 'context'))
    with np.load(tmp_path / 'forecast.npz') as sample:
        np.testing.assert_allclose(sample['traj'], traj)
        assert int(sample['context_frames']) == CONTEXT and sample['occupancy'].shape[:2] == (2, FRAMES)
        with torch.no_grad():
            indices = tokenizer.encode(torch.from_numpy(occupancy[:, :CONTEXT]).long())[1]     # (2, 1, 25, 25)
        # the known latent step is the context's, exactly as encoded (up to the standardisation round trip)
        np.testing.assert_allclose(sample['latents'][:, :, :1], codec.lookup(indices).numpy(), atol=1e-5)


def test_sample_rejects_impossible_forecasts_clearly(ckpt, tmp_path):
    out = tmp_path / 'never.npz'
    with pytest.raises(ValueError, match='--context-frames 1: must be a multiple of the tokenizer\'s temporal factor'):
        run_in_process(*sample_args(ckpt, out, '--num-frames', 6, '--context-frames', 1))
    with pytest.raises(ValueError, match='--context-frames 4: must be a multiple'):
        run_in_process(*sample_args(ckpt, out, '--num-frames', 6, '--context-frames', 4))
    with pytest.raises(ValueError, match='a rollout continues only a preset or the dataset'):
        run_in_process(*sample_args(ckpt, out, '--num-frames', 6, '--traj', 'context'))
    with pytest.raises(ValueError, match='--num-frames 3 is shorter than'):
        run_in_process(*sample_args(ckpt, out, '--num-frames', 3))
    with pytest.raises(ValueError, match='--context-frames needs --context or --num-frames'):
        run_in_process(*sample_args(ckpt, out, '--context-frames', 2))
    np.savez(tmp_path / 'three.npz', occupancy=np.zeros((3, FRAMES, 200, 200, 16), np.uint8))
    with pytest.raises(ValueError, match='holds 3 clips: expected 1 .* or --num-samples 2'):
        run_in_process(*sample_args(ckpt, out, '--context', tmp_path / 'three.npz'))
    # a DiT without the known-prefix channels cannot be told anything
    plain = load_checkpoint(ckpt)
    plain['model_args']['known_prefix'] = False
    plain['model'] = plain['ema'] = build_dit(**plain['model_args']).state_dict()
    torch.save(plain, tmp_path / 'plain.pt')
    with pytest.raises(ValueError, match='need a DiT trained with known_prefix.enabled=True'):
        run_in_process(*sample_args(tmp_path / 'plain.pt', out, '--num-frames', 6))
    assert not out.exists()


def test_sample_holds_the_static_warp_gate_open(ckpt, token_dir, tmp_path):
    """--static-warp hard on a 'gated' DiT: the sample's later latent step is its first moved along the trajectory
    wherever that is in view (guidance 1, so nothing but the composed prediction reaches the sampler)."""
    gated = load_checkpoint(ckpt)
    scale = json.load(open(os.path.join(token_dir, 'meta.json')))['conditions']['scale']['traj_xy']
    gated['model_args'].update(static_warp='gated', traj_scale=float(scale), schedule=dict(gated['args']['diffusion']))
    torch.manual_seed(0)
    model = build_dit(**gated['model_args'])
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)                  # off its zero initialisation
    with torch.no_grad():                                 # the learned gate shut: the trained model ignores the warp
        model.final_layer.linear.bias.view(-1, model.output_channels)[:, -1] = -20.0
    gated['model'] = gated['ema'] = model.state_dict()
    torch.save(gated, tmp_path / 'gated.pt')
    options = ('--traj', 'left', '--cfg-scale', 1)
    run_in_process(*sample_args(tmp_path / 'gated.pt', tmp_path / 'trained.npz', *options))
    run_in_process(*sample_args(tmp_path / 'gated.pt', tmp_path / 'hard.npz', *options, '--static-warp', 'hard'))
    with np.load(tmp_path / 'hard.npz') as hard, np.load(tmp_path / 'trained.npz') as trained:
        assert str(hard['static_warp']) == 'hard' and str(trained['static_warp']) == 'gated'
        latents, traj = torch.from_numpy(hard['latents']), torch.from_numpy(hard['traj'])
        chained = chain_static_warp(latents, traj, gate=torch.ones(len(latents), 1, *latents.shape[2:]))
        # the tiny tokenizer's latents vary by ~1e-5 across cells around ~0.2: compare at float32 rounding
        torch.testing.assert_close(latents, chained, rtol=0, atol=1e-7)
        trained_latents = torch.from_numpy(trained['latents'])
        assert not torch.allclose(trained_latents, chain_static_warp(trained_latents, traj, gate=torch.ones(
            len(latents), 1, *latents.shape[2:])), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match='--static-warp hard needs a DiT trained with static_warp'):
        run_in_process(*sample_args(ckpt, tmp_path / 'never.npz', '--static-warp', 'hard'))


def test_sample_voxel_warp_moves_the_decoded_static_voxels_along_the_trajectory(ckpt, tmp_path):
    """--voxel-warp: decoded_occupancy is the sample as drawn without the flag, occupancy that clip composed by
    follow_ego_motion along traj; evaluation.control and --seams read either with --decoded."""
    options = ('--traj', 'left', '--num-frames', 7)
    run_in_process(*sample_args(ckpt, tmp_path / 'plain.npz', *options))
    run_in_process(*sample_args(ckpt, tmp_path / 'left.npz', *options, '--voxel-warp'))
    with np.load(tmp_path / 'left.npz') as warped, np.load(tmp_path / 'plain.npz') as plain:
        assert bool(warped['voxel_warp']) and not bool(plain['voxel_warp']) and 'decoded_occupancy' not in plain
        np.testing.assert_array_equal(warped['decoded_occupancy'], plain['occupancy'])
        path = torch.from_numpy(warped['traj'])
        poses = torch.cat([path, headings(path)[..., None]], dim=-1)                       # (N, T, 3)
        assert poses[0, -1, 2] > 1.0                                                       # the ego has turned
        for clip, decoded, clip_poses in zip(warped['occupancy'], warped['decoded_occupancy'], poses):
            np.testing.assert_array_equal(clip, follow_ego_motion(torch.from_numpy(decoded), clip_poses).numpy())
        assert not np.array_equal(warped['occupancy'], warped['decoded_occupancy'])
        occupancy, decoded = warped['occupancy'], warped['decoded_occupancy']
    for key, clips, flags in (('occupancy', occupancy, ()), ('decoded_occupancy', decoded, ('--decoded',))):
        seams = run_forecast('--seams', tmp_path / 'left.npz', *flags)
        assert seams['clips'] == key
        assert seams['per_sample'][1] == forecast.consistency_ratios(forecast.seam_consistency(clips[1], [4, 6]))
        scored = control.main(['--samples', str(tmp_path / 'left.npz'), *flags])
        assert scored['clips'] == key
        assert scored['files'][0]['samples'][0]['heading_deg'] == pytest.approx(
            float(np.degrees(recover_poses(clips[0])[-1, 2])))
    with pytest.raises(ValueError, match='--voxel-warp moves static voxels along the ego path'):
        run_in_process(*sample_args(ckpt, tmp_path / 'never.npz', '--traj', 'none', '--cfg-scale', 1,
                                    '--voxel-warp'))
    with pytest.raises(ValueError, match='lacks decoded_occupancy: .* sample.py --voxel-warp'):
        run_forecast('--seams', tmp_path / 'plain.npz', '--decoded')


# ---------------------------------------------------------------------------------------------------------------
# python -m evaluation.forecast

def test_forecast_evaluation_reports_every_method_and_the_seams(ckpt, parts, tokenizer_config, tmp_path, capsys):
    out = tmp_path / 'forecast.json'
    result = run_forecast('--ckpt', ckpt, '--rollout-windows', 2, '--stride', 2, '--num-clips', 2,
                            '--num-sampling-steps', 3, '--batch-size', 2, '--out', out)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    printed = capsys.readouterr().out                                                # the JSON, then the table
    assert all(f'\n{name} ' in printed for name in forecast.METHODS)
    assert result['num_clips'] == 2 and result['clip_frames'] == 6 and result['window_starts'] == [0, 2]
    assert result['context_frames'] == CONTEXT and result['seam_frames'] == [4]
    # +1 s and +2 s after the last context frame (frame 1) at 2 Hz; +3 s lies past the 6 frames
    assert result['horizons'] == {'+1s': 3, '+2s': 5} and result['skipped_horizons'][0].startswith('+3s')
    assert set(result['metrics']) == set(forecast.METHODS)
    for name in ('forecast', 'ground_truth'):
        assert set(result['static_consistency'][name]) == {'seam', 'within'}

    # the baselines, computed here independently on the same clips
    _, tokenizer, _ = parts
    dataset = build_dataset(Config.fromfile(tokenizer_config), 'val', mode='sliding', num_frames=6, stride=2,
                            load_ego_pose=True)
    gt = torch.stack([dataset[i]['occupancy'] for i in range(2)])                       # (2, 6, X, Y, Z)
    poses = torch.stack([dataset[i]['ego_pose'] for i in range(2)])                     # (2, 6, 3)
    with torch.no_grad():
        first = tokenizer.decode(tokenizer.encode(gt[:, :4].long())[0]).argmax(-1)
        second = tokenizer.decode(tokenizer.encode(gt[:, 2:].long())[0]).argmax(-1)
    reencoded = torch.stack([first[:, 3], second[:, 3]], 1)                              # frames 3 and 5
    copied = gt[:, 1:2].expand(-1, 2, -1, -1, -1)
    warped, seen = warp_frames(gt[:, 1], poses[:, 1], poses[:, [3, 5]], return_seen=True)   # frame 1 in frames 3, 5
    moving = constant_velocity_copy(gt, poses, CONTEXT, [3, 5])
    for name, prediction in (('reencoded_ground_truth', reencoded), ('copy_last_context_frame', copied),
                             ('warped_last_context_frame', warped), ('constant_velocity_copy', moving),
                             ('constant_velocity_copy_extruded', extrude_into_view(moving, seen))):
        metrics = OccupancyMetrics(2)
        metrics.update(prediction, gt[:, [3, 5]])
        expected = metrics.compute()
        for i, horizon in enumerate(('+1s', '+2s')):
            reported = result['metrics'][name][horizon]
            assert reported['iou'] == expected['iou_per_frame'][i]
            assert reported['miou'] == expected['miou_per_frame'][i]
            assert reported['class_iou'] == {c: v[i] for c, v in expected['class_iou_per_frame'].items()}


def test_warped_copy_is_filled_by_the_forecast_where_it_saw_nothing():
    """Seen columns keep the warped copy (free voxels included), columns that came into view take the forecast."""
    warped = torch.full((1, 2, *GRID_SHAPE), FREE_CLASS, dtype=torch.uint8)
    warped[..., 0] = CLASS_ID['manmade']
    forecast_frames = torch.full_like(warped, CLASS_ID['car'])
    seen = torch.ones((1, 2, *GRID_SHAPE[:2]), dtype=torch.bool)
    seen[:, 1, -10:] = False                                                           # frame 1 drove 10 rows on
    filled = forecast.warped_copy_filled(warped, seen, forecast_frames)
    assert torch.equal(filled[:, 0], warped[:, 0]) and torch.equal(filled[:, 1, :-10], warped[:, 1, :-10])
    assert torch.all(filled[:, 1, -10:] == CLASS_ID['car'])


def test_per_horizon_splits_the_miou_into_static_and_movable_classes():
    """Static and movable mIoU average their own classes by the rule for absent classes; 'miou' averages both."""
    target = torch.full((1, 2, 2, 2, 2), FREE_CLASS, dtype=torch.uint8)
    target[0, :, 0, 0, 0], target[0, :, 0, 1, 0], target[0, :, 1, 0, 0] = (CLASS_ID[name] for name in
                                                                           ('manmade', 'car', 'pedestrian'))
    prediction = target.clone()
    prediction[0, 1, 0, 1, 0] = CLASS_ID['truck']                            # frame 1: the car taken for a truck
    metrics = OccupancyMetrics(2)
    metrics.update(prediction, target)
    result = forecast.per_horizon({'method': metrics}, {'+1s': 0, '+2s': 1})['method']
    assert result['+1s']['miou_static'] == result['+1s']['miou_movable'] == result['+1s']['miou'] == 100
    assert result['+2s']['miou_static'] == 100
    assert result['+2s']['miou_movable'] == pytest.approx(100 / 3)          # car 0, truck 0, pedestrian 100
    assert result['+2s']['miou'] == pytest.approx(100 / 2)                   # manmade 100 as well
    assert result['+2s']['class_iou']['truck'] == 0 and result['+2s']['class_iou']['bus'] is None


def test_baselines_without_a_model(tokenizer_config, capsys):
    result = run_forecast('--baselines-only', '--py-config', tokenizer_config, '--context-frames', 2,
                          '--stride', 4)
    assert 'warped_last_context_frame ' in capsys.readouterr().out
    # clips of 2 + 6 frames (starts 0 and 4 of the 12-frame val scene), horizons at frames 1 + 2 s
    assert result['num_clips'] == 2 and result['clip_frames'] == 8 and result['context_frames'] == 2
    assert result['horizons'] == {'+1s': 3, '+2s': 5, '+3s': 7} and result['skipped_horizons'] == []
    assert set(result['metrics']) == set(forecast.BASELINES)
    for horizon in result['horizons']:                        # the ego drives on: moving the copy with it pays
        assert (result['metrics']['warped_last_context_frame'][horizon]['iou']
                > result['metrics']['copy_last_context_frame'][horizon]['iou'])
    with pytest.raises(ValueError, match='--baselines-only needs --py-config .* and --context-frames'):
        run_forecast('--baselines-only', '--py-config', tokenizer_config)
    with pytest.raises(SystemExit):
        run_forecast('--baselines-only', '--ckpt', 'dit.pt', '--py-config', tokenizer_config, '--context-frames', 2)
    with pytest.raises(SystemExit):
        run_forecast('--context-frames', 2)                                            # no --ckpt


def test_seams_of_a_file_without_seams_are_refused(tmp_path):
    np.savez(tmp_path / 'one.npz', occupancy=np.zeros((1, 4, *GRID_SHAPE), np.uint8), window_starts=np.array([0]),
             context_frames=0)
    with pytest.raises(ValueError, match=r'one.npz holds one window .* --num-frames past'):
        run_forecast('--seams', tmp_path / 'one.npz')
    np.savez(tmp_path / 'bare.npz', occupancy=np.zeros((1, 4, *GRID_SHAPE), np.uint8))
    with pytest.raises(ValueError, match=r'bare.npz lacks window_starts, context_frames'):
        run_forecast('--seams', tmp_path / 'bare.npz')
    with pytest.raises(SystemExit):
        run_forecast('--seams', tmp_path / 'one.npz', '--ckpt', 'dit.pt')


def test_forecast_of_a_single_window_and_its_errors(ckpt, tmp_path):
    result = run_forecast('--ckpt', ckpt, '--num-clips', 1, '--num-sampling-steps', 2)
    assert result['clip_frames'] == FRAMES and result['horizons'] == {'+1s': 3}
    assert len(result['skipped_horizons']) == 2 and 'static_consistency' not in result
    with pytest.raises(ValueError, match='--context-frames 3: must be a multiple'):
        run_forecast('--ckpt', ckpt, '--context-frames', 3)
    with pytest.raises(ValueError, match='--rollout-windows must be at least 1'):
        run_forecast('--ckpt', ckpt, '--rollout-windows', 0)
