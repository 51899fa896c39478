"""bf16 autocast (utils/precision.py) in train_2.py (bf16), sample.py and step02.py (--precision): off is the fp32
code path unchanged; on, the forward passes run in bf16 with fp32 weights, and losses, samples and codes stay
within bf16's rounding of fp32, while checkpoints stay fp32 and load in either precision."""
import json
import os

import numpy as np
import pytest
import torch

from model.diffusion import GaussianDiffusion
from model.dit import build_dit
from model.rollout import guided_model_fn
from model.sampling import sample_latents
from tests.pipeline import DIT_ARGS, TOKEN_STRIDE, read_jsonl, run_script
from utils.checkpoint import load_checkpoint
from utils.precision import autocast_forward, bf16_autocast, check_bf16_training

# bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2 % per op). On the tiny DiT the losses of one forward
# differ by ~1e-4 relative, those of a few training steps by ~1e-3 (the weights drift apart): 1 % is well above
# both and far below what a wrong dtype path would give (a bf16 loss or variance term: whole percents).
LOSS_RTOL = 1e-2
# Sampled latents: the sampler amplifies eps errors early on (x0 = (x - sqrt(1 - a) eps) / sqrt(a), a ~ 4e-5 at
# t = 999) and guidance by cfg_scale; DDIM latents of a guided (cfg 4) perturbed tiny DiT differ by ~1e-3 in norm.
SAMPLE_RTOL = 1e-2
# T' = 4 as in the configs: torch 2.14's oneDNN bf16 Conv3d weight gradient (the DiT's token_embed) is garbage at
# a time depth of 2 on AVX-512 CPUs (docs/performance.md)
LATENT_SHAPE, COND_SHAPE = (4, 4, 5, 5), (4, 2)


def relative_difference(ours, reference):
    """||ours - reference|| / ||reference|| (torch tensors or numpy arrays)."""
    ours, reference = torch.as_tensor(ours), torch.as_tensor(reference)
    return ((ours - reference).norm() / reference.norm()).item()


def perturbed_dit(class_dropout_prob=0.0):
    """A tiny DiT whose zero-initialised output layers are moved off zero (else it outputs 0 in any precision)."""
    torch.manual_seed(0)
    model = build_dit('DiT-demo', LATENT_SHAPE, COND_SHAPE, class_dropout_prob=class_dropout_prob, depth=2,
                      hidden_size=32, num_heads=2)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    return model


def test_bf16_off_is_the_fp32_path_and_on_keeps_fp32_weights_and_outputs():
    model = torch.nn.Linear(8, 4)
    assert autocast_forward(model, 'cpu', enabled=False) is model
    with bf16_autocast('cpu', enabled=False):
        assert model(torch.randn(2, 8)).dtype == torch.float32
    with bf16_autocast(torch.device('cpu')):
        assert model(torch.randn(2, 8)).dtype == torch.bfloat16
    out = autocast_forward(model, 'cpu', enabled=True)(torch.randn(2, 8))
    assert out.dtype == torch.float32 and model.weight.dtype == torch.float32
    assert not torch.is_autocast_enabled('cpu')                      # the context ends with the call


def test_bf16_training_losses_and_gradients_are_close_to_fp32():
    model, diffusion = perturbed_dit(), GaussianDiffusion()
    x, traj = torch.randn(4, *LATENT_SHAPE), torch.randn(4, *COND_SHAPE)
    t, noise = torch.randint(0, diffusion.num_timesteps, (4,)), torch.randn(4, *LATENT_SHAPE)
    results = []
    for bf16 in (False, True):
        model.zero_grad(set_to_none=True)
        losses = diffusion.training_losses(autocast_forward(model, 'cpu', bf16), x, t, model_kwargs={'traj': traj},
                                           noise=noise)
        losses['loss'].mean().backward()
        assert all(value.dtype == torch.float32 for value in losses.values())
        results.append((losses, torch.cat([param.grad.flatten() for param in model.parameters()])))
    (fp32, fp32_grad), (bf16, bf16_grad) = results
    for name in ('loss', 'mse'):
        torch.testing.assert_close(bf16[name], fp32[name], rtol=LOSS_RTOL, atol=0.0)
    torch.testing.assert_close(bf16['vb'], fp32['vb'], rtol=LOSS_RTOL, atol=LOSS_RTOL * fp32['loss'].mean().item())
    assert (bf16_grad - fp32_grad).norm() <= 5 * LOSS_RTOL * fp32_grad.norm()
    assert not torch.equal(bf16['loss'], fp32['loss'])              # bf16 did run


def test_bf16_guided_sampling_is_close_to_fp32():
    model, traj = perturbed_dit(class_dropout_prob=0.1).eval(), torch.randn(2, *COND_SHAPE)
    samples = []
    for bf16 in (False, True):
        model_fn = autocast_forward(guided_model_fn(model, traj, cfg_scale=4.0), 'cpu', bf16)
        samples.append(sample_latents(model_fn, (2, *LATENT_SHAPE), 'ddim', 4,
                                      generator=torch.Generator().manual_seed(0), progress=False))
    fp32, bf16 = samples
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, fp32)
    assert relative_difference(bf16, fp32) <= SAMPLE_RTOL


def test_train_2_bf16_trains_close_to_fp32_writes_fp32_checkpoints_and_samples(dit_run, token_dir, tmp_path):
    """Two steps with bf16=True write fp32 weights, EMA and AdamW state; resumed with bf16 off for two more, all
    four losses are within LOSS_RTOL of the fp32 run's (the same random stream); sample.py --precision bf16 draws
    latents within SAMPLE_RTOL of --precision fp32 ones from that checkpoint."""
    results_dir = tmp_path / 'results'
    common = ('train_2.py', '--data-path', token_dir, '--results-dir', results_dir)
    run_script(*common, '--max-steps', 2, *DIT_ARGS, 'bf16=True')
    run_dir = results_dir / '000-DiT-demo'
    assert 'bf16 autocast' in open(run_dir / 'log.txt').read()
    checkpoint = load_checkpoint(run_dir / 'checkpoints' / 'latest.pt')
    opt_tensors = [value for state in checkpoint['opt']['state'].values() for value in state.values()
                   if value.dtype.is_floating_point and value.ndim]
    assert opt_tensors and all(value.dtype == torch.float32 for value in (
        *checkpoint['model'].values(), *checkpoint['ema'].values(), *opt_tensors))

    run_script(*common, '--max-steps', 4, '--ckpt', run_dir / 'checkpoints' / 'latest.pt', *DIT_ARGS)    # fp32
    reference = read_jsonl(os.path.join(dit_run, 'metrics.jsonl'))
    ours = read_jsonl(run_dir / 'metrics.jsonl')
    assert [r['step'] for r in ours] == [r['step'] for r in reference] == [1, 2, 3, 4]
    for mine, theirs in zip(ours, reference):
        assert abs(mine['loss'] - theirs['loss']) <= LOSS_RTOL * theirs['loss'], mine['step']
        assert abs(mine['mse'] - theirs['mse']) <= LOSS_RTOL * theirs['mse'], mine['step']

    latents = {}
    for precision in ('fp32', 'bf16'):
        out = tmp_path / f'{precision}.npz'
        run_script('sample.py', '--ckpt', run_dir / 'checkpoints' / 'latest.pt', '--sampler', 'ddim',
                   '--num-sampling-steps', 2, '--traj', 'left', '--precision', precision, '--out', out)
        with np.load(out) as sample:
            assert str(sample['precision']) == precision
            latents[precision] = sample['latents']
    assert latents['bf16'].dtype == np.float32
    assert relative_difference(latents['bf16'], latents['fp32']) <= SAMPLE_RTOL


def test_step02_bf16_encodes_the_codes_of_fp32(tokenizer_config, tokenizer_run, token_dir, tmp_path):
    """step02.py --precision bf16 (the code distances stay fp32 in the quantizer): the same clips, meta.json saying
    bf16, and nearly every code equal to fp32's (bf16 may move a latent across a code boundary)."""
    work_dir = tmp_path / 'bf16'
    run_script('step02.py', '--py-config', tokenizer_config, '--work-dir', work_dir, '--ckpt',
               os.path.join(tokenizer_run, 'latest.pth'), '--stride', TOKEN_STRIDE, '--precision', 'bf16')
    with open(work_dir / 'tokens' / 'meta.json') as f:
        meta = json.load(f)
    with open(os.path.join(token_dir, 'meta.json')) as f:
        assert json.load(f)['precision'] == 'fp32' and meta['precision'] == 'bf16'
    same = total = 0
    for split in ('train', 'val'):
        names = sorted(os.listdir(os.path.join(token_dir, split)))
        assert sorted(os.listdir(work_dir / 'tokens' / split)) == names
        for name in names:
            with np.load(os.path.join(token_dir, split, name)) as fp32:
                fp32_codes = fp32['indices']
            with np.load(work_dir / 'tokens' / split / name) as bf16:
                same += int((bf16['indices'] == fp32_codes).sum())
            total += fp32_codes.size
    assert same >= 0.99 * total


def test_bf16_training_refused_where_torch_gets_it_wrong():
    """bf16 training is refused on a CPU at T' = 2 only (the oneDNN Conv3d bug), with the token dir named."""
    with pytest.raises(ValueError, match=r"tokens/run.*T' = 2"):
        check_bf16_training('cpu', 2, 'tokens/run')
    for device, latent_frames in (('cpu', 1), ('cpu', 4), ('cuda', 2)):
        check_bf16_training(device, latent_frames, 'tokens/run')
