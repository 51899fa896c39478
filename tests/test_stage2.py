"""End-to-end tests of step02.py (token dump) and train_2.py (DiT training) on the tiny tokenizer run of
tests/conftest.py: file layout and meta.json, latents rebuilt from tokens equal the tokenizer's, a
deterministic dump that guards its token dir, and a DiT run that resumes exactly and runs under torchrun."""
import glob
import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch
from mmengine.config import Config

from dataset.clips import CONDITIONS
from dataset.loader import build_dataset
from dataset.tokens import UPSTREAM_LATENT_SCALE, LatentCodec
from model.dit import build_dit
from model.pipeline import load_tokenizer
from step02 import prepare_token_dir
from tests.pipeline import (CODEBOOK_SIZE, DIT_ARGS, DIT_STEPS, LATENT_SHAPE, NUM_FRAMES, SCENE_FRAMES,
                            TOKEN_STRIDE, TOKENIZER_EPOCHS, read_jsonl, run_script, run_torchrun, temp_files)
from utils.checkpoint import load_checkpoint

STARTS = list(range(0, SCENE_FRAMES - NUM_FRAMES + 1, TOKEN_STRIDE))          # 0, 4, 8
SCENES = {'train': ['scene-0000', 'scene-0001'], 'val': ['scene-0002']}
CHECKPOINT_KEYS = {'model', 'ema', 'opt', 'step', 'rng', 'args', 'model_args', 'data_path'}


def sha256_of(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def load_meta(token_dir):
    with open(os.path.join(token_dir, 'meta.json')) as f:
        return json.load(f)


def token_arrays(token_dir):
    """{'<split>/<file>': {key: array}} of every token file of a token dir."""
    arrays = {}
    for path in sorted(glob.glob(os.path.join(token_dir, '*', '*.npz'))):
        with np.load(path) as clip:
            arrays[os.path.relpath(path, token_dir)] = {key: clip[key] for key in clip.files}
    return arrays


# ---------------------------------------------------------------------------------------------------------------
# step02.py

def test_step02_writes_token_files_and_meta(token_dir, tokenizer_run):
    meta = load_meta(token_dir)
    assert meta['latent_shape'] == LATENT_SHAPE and meta['codebook_size'] == CODEBOOK_SIZE
    assert len(meta['latent_mean']) == len(meta['latent_std']) == LATENT_SHAPE[0]
    checkpoint = os.path.join(tokenizer_run, 'latest.pth')
    assert os.path.normpath(os.path.join(token_dir, meta['tokenizer']['checkpoint'])) == os.path.normpath(checkpoint)
    assert meta['tokenizer']['sha256'] == sha256_of(checkpoint)
    assert meta['tokenizer']['step'] == load_checkpoint(checkpoint)['step'] == 2 * TOKENIZER_EPOCHS
    assert meta['num_frames'] == NUM_FRAMES and meta['stride'] == TOKEN_STRIDE
    assert meta['clips'] == {split: len(scenes) * len(STARTS) for split, scenes in SCENES.items()}
    conditions = meta['conditions']
    assert conditions['names'] == list(CONDITIONS) and conditions['shape'] == [NUM_FRAMES, 2]
    assert conditions['scale']['command'] == 1.0 and all(s > 0 for s in conditions['scale'].values())
    vectors = np.load(os.path.join(token_dir, 'codebook_vectors.npy'))
    assert vectors.shape == (CODEBOOK_SIZE, LATENT_SHAPE[0]) and vectors.dtype == np.float32
    assert temp_files(token_dir) == []

    arrays = token_arrays(token_dir)
    assert sorted(arrays) == sorted(f'{split}/{scene}_{start:04d}.npz' for split, scenes in SCENES.items()
                                    for scene in scenes for start in STARTS)
    for name, clip in arrays.items():
        assert clip['indices'].dtype == np.int16 and list(clip['indices'].shape) == LATENT_SHAPE[1:]
        assert 0 <= clip['indices'].min() and clip['indices'].max() < CODEBOOK_SIZE
        for condition in CONDITIONS:
            assert clip[condition].dtype == np.float32 and clip[condition].shape == (NUM_FRAMES, 2)
        scene, start = os.path.basename(name)[:-len('.npz')].rsplit('_', 1)
        assert str(clip['scene_name']) == scene and int(clip['start']) == int(start)
        np.testing.assert_allclose(clip['traj_xy'][0], [0, 0], atol=1e-6)    # first frame's own ego coordinates


def test_latents_rebuilt_from_tokens_equal_encode(tokenizer_config, token_dir, tokenizer_run):
    cfg = Config.fromfile(tokenizer_config)
    tokenizer, _ = load_tokenizer(os.path.join(tokenizer_run, 'latest.pth'), 'cpu')
    codec = LatentCodec(token_dir, 'standardize')
    all_codes = torch.arange(CODEBOOK_SIZE).view(1, 1, 1, -1)                            # (1, 1, 1, K)
    with torch.no_grad():
        table = tokenizer.quantizer.lookup(all_codes)[0, :, 0, 0].T                         # (C, K) -> (K, C)
    torch.testing.assert_close(codec.vectors, table, atol=1e-5, rtol=1e-5)

    train_latents = []
    for split in ('train', 'val'):
        dataset = build_dataset(cfg, split, mode='sliding', stride=TOKEN_STRIDE, conditions=CONDITIONS)
        for item in dataset:
            with np.load(os.path.join(token_dir, split, f'{item["scene_name"]}_{item["start"]:04d}.npz')) as clip:
                saved = torch.from_numpy(clip['indices'].astype(np.int64))[None]           # (1, T', H', W')
                for condition in CONDITIONS:
                    np.testing.assert_array_equal(clip[condition], item[condition].numpy())
            with torch.no_grad():
                z_q, indices, _ = tokenizer.encode(item['occupancy'][None].long())
            assert torch.equal(saved, indices)
            latent = codec.lookup(saved)                                                    # (1, C, T', H', W')
            torch.testing.assert_close(latent, z_q, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(codec.from_model(codec.to_model(saved)), latent, atol=1e-5, rtol=1e-5)
            if split == 'train':
                train_latents.append(latent)

    # meta.json's statistics are the per-channel mean and (population) std of every train latent cell
    meta = load_meta(token_dir)
    train_latents = torch.cat(train_latents).transpose(0, 1).flatten(1).double()             # (C, cells)
    np.testing.assert_allclose(meta['latent_mean'], train_latents.mean(1).numpy(), atol=1e-5)
    np.testing.assert_allclose(meta['latent_std'], train_latents.std(1, correction=0).numpy(), atol=1e-5)
    upstream = LatentCodec(token_dir, 'upstream')
    torch.testing.assert_close(upstream.to_model(saved), latent * UPSTREAM_LATENT_SCALE)


def test_step02_is_deterministic_and_refuses_another_checkpoint(tokenizer_config, tokenizer_run, token_dir,
                                                                  tmp_path):
    work_dir = tmp_path / 'again'
    run_script('step02.py', '--py-config', tokenizer_config, '--work-dir', work_dir,
               '--ckpt', os.path.join(tokenizer_run, 'latest.pth'), '--stride', TOKEN_STRIDE)
    again = str(work_dir / 'tokens')
    first_arrays, second_arrays = token_arrays(token_dir), token_arrays(again)
    assert sorted(first_arrays) == sorted(second_arrays)
    for name, clip in first_arrays.items():
        assert clip.keys() == second_arrays[name].keys()
        for key, value in clip.items():
            np.testing.assert_array_equal(second_arrays[name][key], value, err_msg=f'{name}: {key}')
    first_meta, second_meta = load_meta(token_dir), load_meta(again)
    for meta in (first_meta, second_meta):
        meta['tokenizer'].pop('checkpoint')                                # relative to each token dir
    assert first_meta == second_meta
    assert sha256_of(os.path.join(again, 'codebook_vectors.npy')) == sha256_of(
        os.path.join(token_dir, 'codebook_vectors.npy'))

    result = run_script('step02.py', '--py-config', tokenizer_config, '--work-dir', work_dir,
                        '--ckpt', os.path.join(tokenizer_run, 'epoch_1.pth'), expect_success=False)
    assert 'another tokenizer checkpoint' in result.stderr and '--overwrite' in result.stderr
    assert token_arrays(again).keys() == second_arrays.keys()
    assert load_meta(again)['tokenizer']['sha256'] == sha256_of(os.path.join(tokenizer_run, 'latest.pth'))


def test_step02_does_not_depend_on_the_process_count(tokenizer_config, gaussian_tokenizer_run, world, tmp_path):
    """An odd number of train clips (the val scene's 3 windows as the train split) over 2 processes: the padding
    sampler counted one clip twice in meta.json's statistics; now they and the token files equal one process's.
    Continuous latents, so that every clip moves the statistics (the tiny VQ run uses one or two codes)."""
    val_pkl = os.path.join(world, 'nuscenes_infos_val_temporal_v3_scene.pkl')
    runs = {}
    for nproc in (1, 2):
        work_dir = str(tmp_path / f'nproc{nproc}')
        args = ('step02.py', '--py-config', tokenizer_config, '--work-dir', work_dir, '--ckpt',
                os.path.join(gaussian_tokenizer_run, 'latest.pth'), '--stride', TOKEN_STRIDE, '--cfg-options',
                f'dataset.train_pkl={val_pkl}')
        if nproc == 1:
            run_script(*args)
        else:
            run_torchrun(*args, nproc=nproc)
        runs[nproc] = os.path.join(work_dir, 'tokens')
    one, two = load_meta(runs[1]), load_meta(runs[2])
    assert one['clips']['train'] == 3
    np.testing.assert_allclose(two['latent_mean'], one['latent_mean'], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(two['latent_std'], one['latent_std'], rtol=1e-6, atol=1e-7)
    first, second = token_arrays(runs[1]), token_arrays(runs[2])
    assert sorted(first) == sorted(second)
    for name, clip in first.items():
        for key, value in clip.items():
            np.testing.assert_array_equal(second[name][key], value, err_msg=f'{name}: {key}')


def test_prepare_token_dir_keeps_one_checkpoint_and_one_run(tmp_path):
    def make_token_dir(sha256):
        for split in ('train', 'val'):
            (tmp_path / split).mkdir(exist_ok=True)
            (tmp_path / split / 'scene-0000_0000.npz').write_bytes(b'old clip')
        (tmp_path / 'meta.json').write_text(json.dumps({'tokenizer': {'sha256': sha256}}))

    make_token_dir('aaa')
    prepare_token_dir(str(tmp_path), 'aaa', overwrite=False)     # same checkpoint: the old run's clips go
    assert glob.glob(str(tmp_path / '*' / '*.npz')) == [] and not (tmp_path / 'meta.json').exists()

    make_token_dir('aaa')
    with pytest.raises(FileExistsError, match='another tokenizer checkpoint'):
        prepare_token_dir(str(tmp_path), 'bbb', overwrite=False)
    assert len(glob.glob(str(tmp_path / '*' / '*.npz'))) == 2 and (tmp_path / 'meta.json').exists()
    prepare_token_dir(str(tmp_path), 'bbb', overwrite=True)
    assert not tmp_path.exists()


def test_continuous_latents_from_step02_to_samples(tokenizer_config, gaussian_tokenizer_run, tmp_path):
    """A tokenizer with latent_type='gaussian': step02 writes its posterior means as float16 latents with their
    per-channel statistics, train_2 trains on them and sample.py decodes a sample (--snap is refused)."""
    work_dir = gaussian_tokenizer_run
    run_script('step02.py', '--py-config', tokenizer_config, '--work-dir', work_dir, '--stride', TOKEN_STRIDE)
    token_dir = os.path.join(work_dir, 'tokens')
    meta = load_meta(token_dir)
    assert meta['latent_type'] == 'continuous' and meta['codebook_size'] is None and 'codebook_usage' not in meta
    assert not os.path.exists(os.path.join(token_dir, 'codebook_vectors.npy'))
    tokenizer, _ = load_tokenizer(os.path.join(work_dir, 'latest.pth'), 'cpu')
    cfg = Config.fromfile(tokenizer_config)
    train = []
    for item in build_dataset(cfg, 'train', mode='sliding', stride=TOKEN_STRIDE, conditions=CONDITIONS):
        with np.load(os.path.join(token_dir, 'train', f'{item["scene_name"]}_{item["start"]:04d}.npz')) as clip:
            assert 'indices' not in clip.files and clip['latents'].dtype == np.float16
            saved = torch.from_numpy(clip['latents'].astype(np.float32))                       # (C, T', H', W')
        with torch.no_grad():
            z_q, _, _ = tokenizer.encode(item['occupancy'][None].long())                       # the mean, in eval
        torch.testing.assert_close(saved, z_q[0], atol=2e-3, rtol=2e-3)                        # float16 rounding
        train.append(z_q[0].flatten(1).double())
    train = torch.cat(train, dim=1)                                                             # (C, cells)
    np.testing.assert_allclose(meta['latent_mean'], train.mean(1).numpy(), atol=1e-5)
    np.testing.assert_allclose(meta['latent_std'], train.std(1, correction=0).numpy(), atol=1e-5)
    codec = LatentCodec(token_dir)
    torch.testing.assert_close(codec.from_model(codec.to_model(saved[None])), saved[None])

    results_dir = tmp_path / 'results'
    run_script('train_2.py', '--data-path', token_dir, '--results-dir', results_dir, '--max-steps', 2, *DIT_ARGS)
    ckpt = str(results_dir / '000-DiT-demo' / 'checkpoints' / 'latest.pt')
    out = str(tmp_path / 'sample.npz')
    run_script('sample.py', '--ckpt', ckpt, '--sampler', 'ddim', '--num-sampling-steps', 2, '--num-samples', 1,
               '--traj', 'left', '--out', out)
    with np.load(out) as sample:
        assert sample['occupancy'].shape == (1, NUM_FRAMES, 200, 200, 16)
    refused = run_script('sample.py', '--ckpt', ckpt, '--num-sampling-steps', 2, '--num-samples', 1, '--snap',
                         '--out', str(tmp_path / 'snapped.npz'), expect_success=False)
    assert 'continuous' in refused.stderr


# ---------------------------------------------------------------------------------------------------------------
# train_2.py

def test_train_2_writes_run_dir_and_checkpoints(dit_run, token_dir):
    assert {'config.py', 'log.txt', 'metrics.jsonl', 'checkpoints'} <= set(os.listdir(dit_run))
    assert set(os.listdir(os.path.join(dit_run, 'checkpoints'))) == {'0000002.pt', '0000004.pt', 'latest.pt'}
    assert temp_files(dit_run) == []
    metrics = read_jsonl(os.path.join(dit_run, 'metrics.jsonl'))
    assert [r['step'] for r in metrics] == list(range(1, DIT_STEPS + 1))
    assert all(np.isfinite(r['loss']) and r['loss'] > 0 for r in metrics)
    # the trajectory-sensitivity diagnostic: logged every step here, non-negative, and it moves as training does
    sensitivity = [r['traj_sensitivity'] for r in metrics]
    assert all(np.isfinite(value) and value >= 0 for value in sensitivity) and len(set(sensitivity)) > 1
    assert f'done at step {DIT_STEPS}' in open(os.path.join(dit_run, 'log.txt')).read()

    latest = load_checkpoint(os.path.join(dit_run, 'checkpoints', 'latest.pt'))
    last = load_checkpoint(os.path.join(dit_run, 'checkpoints', f'{DIT_STEPS:07d}.pt'))
    assert CHECKPOINT_KEYS <= set(latest) and latest['step'] == last['step'] == DIT_STEPS
    assert all(torch.equal(latest['ema'][k], last['ema'][k]) for k in latest['ema'])
    assert latest['model_args'] == {'name': 'DiT-demo', 'latent_shape': LATENT_SHAPE, 'cond_shape': [NUM_FRAMES, 2],
                                    'class_dropout_prob': 0.1, 'known_prefix': False, 'depth': 1, 'hidden_size': 32,
                                    'num_heads': 2}
    assert latest['data_path'] == os.path.abspath(token_dir)
    assert latest['args']['latent_scaling'] == 'standardize' and latest['args']['condition'] == 'traj_xy'
    model = build_dit(**latest['model_args'])
    model.load_state_dict(latest['ema'])                                     # strict: the checkpoint describes itself
    assert any(not torch.equal(latest['ema'][k], latest['model'][k]) for k in latest['model'])


def test_train_2_stops_loudly_on_a_non_finite_loss_before_saving(token_dir, tmp_path):
    results_dir = tmp_path / 'diverging'
    result = run_script('train_2.py', '--data-path', token_dir, '--results-dir', results_dir, '--max-steps', 6,
                        *DIT_ARGS, 'lr=1e30', expect_success=False)
    assert 'FloatingPointError: non-finite training values at step' in result.stderr
    assert 'grad_norm' in result.stderr and ' vb ' in result.stderr
    step = int(result.stderr.split('non-finite training values at step ')[-1].split(':')[0])
    # checkpoints hold only the steps before the failure (every 2 steps), never the failed one
    saved = sorted(glob.glob(str(results_dir / '000-DiT-demo' / 'checkpoints' / '0*.pt')))
    assert all(load_checkpoint(path)['step'] < step for path in saved)


def test_train_2_resumes_exactly(dit_run, token_dir, tmp_path):
    """Stop inside the first epoch (step 2 of 3), resume with --ckpt: the losses of steps 3 and 4 equal the
    uninterrupted run's; resuming a run already at --max-steps trains nothing."""
    results_dir = tmp_path / 'results'
    common = ('train_2.py', '--data-path', token_dir, '--results-dir', results_dir)
    run_script(*common, '--max-steps', 2, *DIT_ARGS)
    run_dir = results_dir / '000-DiT-demo'
    latest = run_dir / 'checkpoints' / 'latest.pt'
    result = run_script(*common, '--max-steps', DIT_STEPS, '--ckpt', latest, *DIT_ARGS)
    assert 'resumed at step 2' in result.stdout
    assert os.listdir(results_dir) == ['000-DiT-demo']                        # the resumed run keeps its directory
    reference, resumed = read_jsonl(os.path.join(dit_run, 'metrics.jsonl')), read_jsonl(run_dir / 'metrics.jsonl')
    assert [r['step'] for r in resumed] == [r['step'] for r in reference]
    for ours, theirs in zip(resumed, reference):
        for key in ('loss', 'mse', 'vb'):
            assert abs(ours[key] - theirs[key]) <= 1e-6 * max(1.0, abs(theirs[key])), (ours['step'], key)

    result = run_script(*common, '--max-steps', DIT_STEPS - 1, '--ckpt', latest, *DIT_ARGS, timeout=120)
    assert f'done at step {DIT_STEPS}' in result.stdout
    assert len(read_jsonl(run_dir / 'metrics.jsonl')) == DIT_STEPS


def test_train_2_resume_refuses_or_applies_a_changed_config(dit_run, token_dir, tmp_path):
    """A copy of dit_run (killed after step 4) resumed from its step-2 checkpoint: another --data-path and a new lr
    are refused with their old and new values; --allow-config-changes applies the lr to the optimiser (its
    checkpoint used to record the new lr while the loaded optimiser state kept the old one) and records it; and
    metrics.jsonl does not repeat step 3."""
    run_dir = tmp_path / 'copy'
    shutil.copytree(dit_run, run_dir)
    other_tokens = tmp_path / 'tokens'
    shutil.copytree(token_dir, other_tokens)
    resume = ('train_2.py', '--ckpt', run_dir / 'checkpoints' / '0000002.pt', '--max-steps', 3, *DIT_ARGS)
    refused = run_script(*resume, '--data-path', other_tokens, expect_success=False)
    assert f"data_path {os.path.abspath(token_dir)!r} -> {str(other_tokens)!r}" in refused.stderr
    refused = run_script(*resume, 'lr=0.001', '--data-path', token_dir, expect_success=False)
    assert 'lr 1e-05 -> 0.001' in refused.stderr and 'data_path' not in refused.stderr
    assert len(read_jsonl(run_dir / 'metrics.jsonl')) == DIT_STEPS                      # refused: nothing touched

    result = run_script(*resume, 'lr=0.001', '--data-path', token_dir, '--allow-config-changes')
    assert 'config change applied on resume: lr 1e-05 -> 0.001' in result.stdout
    checkpoint = load_checkpoint(run_dir / 'checkpoints' / '0000003.pt')
    assert checkpoint['args']['lr'] == 0.001 and checkpoint['opt']['param_groups'][0]['lr'] == 0.001
    assert [r['step'] for r in read_jsonl(run_dir / 'metrics.jsonl')] == [1, 2, 3]


def test_train_2_compile_flag_trains_the_same_steps(dit_run, token_dir, tmp_path):
    """compile=True compiles the DiT in place: the same losses (up to the compiled kernels' rounding) and a
    checkpoint with the uncompiled state dict keys."""
    results_dir = tmp_path / 'results'
    run_script('train_2.py', '--data-path', token_dir, '--results-dir', results_dir, '--max-steps', 2, *DIT_ARGS,
               'compile=True', timeout=600)
    compiled = read_jsonl(results_dir / '000-DiT-demo' / 'metrics.jsonl')
    reference = read_jsonl(os.path.join(dit_run, 'metrics.jsonl'))[:2]
    assert [r['step'] for r in compiled] == [1, 2]
    for ours, theirs in zip(compiled, reference):
        for key in ('loss', 'mse', 'vb'):
            assert abs(ours[key] - theirs[key]) <= 1e-4 * max(1.0, abs(theirs[key])), (ours['step'], key)
    latest = load_checkpoint(results_dir / '000-DiT-demo' / 'checkpoints' / 'latest.pt')
    assert set(latest['model']) == set(load_checkpoint(os.path.join(dit_run, 'checkpoints', 'latest.pt'))['model'])


def test_train_2_torchrun_two_processes(dit_run_without_dropout):
    assert set(os.listdir(os.path.join(dit_run_without_dropout, 'checkpoints'))) == {
        '0000002.pt', '0000003.pt', 'latest.pt'}
    log = open(os.path.join(dit_run_without_dropout, 'log.txt')).read()
    assert '2 process(es) x batch 1' in log and log.count('done at step 3') == 1
    assert [r['step'] for r in read_jsonl(os.path.join(dit_run_without_dropout, 'metrics.jsonl'))] == [1, 2, 3]
    checkpoint = load_checkpoint(os.path.join(dit_run_without_dropout, 'checkpoints', 'latest.pt'))
    assert CHECKPOINT_KEYS <= set(checkpoint) and checkpoint['step'] == 3 and len(checkpoint['rng']) == 2
    assert checkpoint['model_args']['class_dropout_prob'] == 0.0 and 'null_traj' not in checkpoint['model']
    assert checkpoint['model_args']['known_prefix'] is False
