"""Gradient accumulation (utils/accumulation.py, train_2.py's grad_accum_steps): k micro-batches of b samples give
the update of one batch of k * b, the step counter counts optimiser steps, and a run resumes exactly at an
optimiser step, in one process and under torchrun with bf16."""
import os

import pytest
import torch

from model.diffusion import GaussianDiffusion
from model.dit import build_dit
from tests.pipeline import DIT_ARGS, read_jsonl, run_script, run_torchrun
from utils.accumulation import accumulate_gradients, accumulation_groups, micro_batch_size
from utils.checkpoint import load_checkpoint

LATENT_SHAPE, COND_SHAPE = (4, 2, 5, 5), (4, 2)


def test_micro_batch_size_splits_the_global_batch_or_names_the_keys():
    assert micro_batch_size(16, world_size=8, grad_accum_steps=1) == 2            # upstream: 2 per GPU on 8 GPUs
    assert micro_batch_size(16, world_size=2, grad_accum_steps=4) == 2
    with pytest.raises(ValueError, match='global_batch_size 16 is not divisible by 3 process.*grad_accum_steps 2'):
        micro_batch_size(16, world_size=3, grad_accum_steps=2)
    with pytest.raises(ValueError, match='grad_accum_steps must be at least 1'):
        micro_batch_size(16, world_size=1, grad_accum_steps=0)


def test_accumulation_groups_drop_a_short_last_group():
    assert list(accumulation_groups(range(7), 3)) == [[0, 1, 2], [3, 4, 5]]
    assert list(accumulation_groups(range(3), 1)) == [[0], [1], [2]]


def perturbed_dit():
    """A tiny DiT without condition dropout whose zero-initialised output layers are moved off zero, so that every
    parameter gets a gradient."""
    torch.manual_seed(0)
    model = build_dit('DiT-demo', LATENT_SHAPE, COND_SHAPE, class_dropout_prob=0.0, depth=2, hidden_size=32,
                      num_heads=2)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    return model


@pytest.mark.parametrize('micro_batches', [2, 4])
def test_accumulated_gradients_equal_one_batch_of_all_samples(micro_batches):
    """k micro-batches of 4 / k samples: the loss terms and the gradients (all an optimiser step reads) of one
    batch of 4 with the same timesteps and noise per sample, up to float rounding."""
    diffusion = GaussianDiffusion()
    x, traj = torch.randn(4, *LATENT_SHAPE), torch.randn(4, *COND_SHAPE)
    t, noise = torch.randint(0, diffusion.num_timesteps, (4,)), torch.randn(4, *LATENT_SHAPE)
    results = []
    for groups in (1, micro_batches):
        model = perturbed_dit()

        def losses_of(samples):
            return diffusion.training_losses(model, x[samples], t[samples], model_kwargs={'traj': traj[samples]},
                                             noise=noise[samples])

        losses = accumulate_gradients(model, [(samples,) for samples in torch.arange(4).chunk(groups)], losses_of)
        results.append((losses, [param.grad for param in model.parameters()]))
    (whole_losses, whole_grads), (losses, grads) = results
    assert set(losses) == {'loss', 'mse', 'vb'} and losses['loss'].shape == (4,)
    assert not any(value.requires_grad for value in losses.values())
    for name, value in whole_losses.items():
        torch.testing.assert_close(losses[name], value)
    assert all(grad is not None for grad in grads)
    for accumulated, whole in zip(grads, whole_grads):
        torch.testing.assert_close(accumulated, whole, rtol=1e-5, atol=1e-7)


def metrics_close(resumed, reference, tolerance=1e-6):
    assert [r['step'] for r in resumed] == [r['step'] for r in reference]
    for ours, theirs in zip(resumed, reference):
        for key in ('loss', 'mse', 'vb'):
            assert abs(ours[key] - theirs[key]) <= tolerance * max(1.0, abs(theirs[key])), (ours['step'], key)


def run_and_resume(run, tmp_path, token_dir, args, stop, total):
    """One uninterrupted train_2.py run of ``total`` optimiser steps, and one stopped at ``stop`` and resumed from
    its latest.pt. Returns (reference run dir, resumed run dir, the resume's stdout)."""
    reference_dir, resumed_dir = tmp_path / 'reference', tmp_path / 'resumed'
    run('train_2.py', '--data-path', token_dir, '--results-dir', reference_dir, '--max-steps', total, *args)
    resumed = ('train_2.py', '--data-path', token_dir, '--results-dir', resumed_dir)
    run(*resumed, '--max-steps', stop, *args)
    latest = resumed_dir / '000-DiT-demo' / 'checkpoints' / 'latest.pt'
    result = run(*resumed, '--max-steps', total, '--ckpt', latest, *args)
    return reference_dir / '000-DiT-demo', resumed_dir / '000-DiT-demo', result.stdout


def test_train_2_accumulation_counts_optimiser_steps_and_resumes_exactly_mid_epoch(token_dir, tmp_path):
    """6 train clips, global batch 2 = 1 process x 1 x 2 micro-batches: 3 optimiser steps per epoch. Stopped at
    step 2 (4 of the epoch's 6 micro-batches), the resumed steps 3 and 4 equal the uninterrupted run's."""
    args = (*DIT_ARGS, 'grad_accum_steps=2')
    reference, resumed, stdout = run_and_resume(run_script, tmp_path, token_dir, args, stop=2, total=4)
    assert 'resumed at step 2' in stdout
    log = open(reference / 'log.txt').read()
    assert '1 process(es) x batch 1 x 2 accumulation steps' in log and 'done at step 4' in log
    reference_metrics = read_jsonl(reference / 'metrics.jsonl')
    assert [r['step'] for r in reference_metrics] == [1, 2, 3, 4]
    metrics_close(read_jsonl(resumed / 'metrics.jsonl'), reference_metrics)
    assert load_checkpoint(resumed / 'checkpoints' / 'latest.pt')['step'] == 4


def test_train_2_torchrun_bf16_accumulation_resumes_exactly(token_dir, tmp_path):
    """torchrun, 2 processes, bf16, global batch 4 = 2 x 1 x 2 micro-batches (DDP syncs on the second only):
    stopped at step 1 and resumed, steps 2 and 3 equal the uninterrupted run's. A rank that missed a gradient
    sync would have drifted from rank 0, whose weights the resumed run loads on both."""
    args = (*DIT_ARGS, '--global-batch-size', 4, '--cfg-options', 'bf16=True', 'grad_accum_steps=2',
            'class_dropout_prob=0.0')
    reference, resumed, stdout = run_and_resume(run_torchrun, tmp_path, token_dir, args, stop=1, total=3)
    assert 'resumed at step 1' in stdout
    assert '2 process(es) x batch 1 x 2 accumulation steps, bf16 autocast' in open(reference / 'log.txt').read()
    metrics_close(read_jsonl(resumed / 'metrics.jsonl'), read_jsonl(reference / 'metrics.jsonl'))
    checkpoint = load_checkpoint(reference / 'checkpoints' / 'latest.pt')
    assert checkpoint['step'] == 3 and checkpoint['args']['grad_accum_steps'] == 2 and checkpoint['args']['bf16']
    assert all(value.dtype == torch.float32 for value in (*checkpoint['model'].values(), *checkpoint['ema'].values()))
    assert os.listdir(tmp_path / 'resumed') == ['000-DiT-demo']
