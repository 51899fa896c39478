"""Samplers (model/sampling.py): the schedule shared with training, DDPM's learned-range step against
GaussianDiffusion, every sampler against analytic eps-predictors whose output distribution is known, known
latents held through sampling, and rollouts whose windows overlap."""
import numpy as np
import pytest
import torch

from model.diffusion import GaussianDiffusion
from model.dit import DiT, prefix_mask
from model.sampling import SCHEDULERS, make_scheduler, sample_latents, sample_rollout

SHAPE = (16, 4, 4, 8, 8)          # 16,384 latent values: the sample mean of N(mu, s^2) to within s / 128


@pytest.fixture(scope='module')
def diffusion():
    return GaussianDiffusion()


def point_mass_model(diffusion, a):
    """Exact eps-predictor when the data are the constant a: eps = (x_t - sqrt(ab) a) / sqrt(1 - ab); v = 0."""
    def model_fn(x, t):
        alpha_bar = diffusion.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
        eps = (x.double() - alpha_bar.sqrt() * a) / (1 - alpha_bar).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], 1).float()
    return model_fn


def gaussian_model(diffusion, mu, s, v=0.0):
    """Exact eps-predictor E[eps | x_t] for data N(mu, s^2): x_t ~ N(sqrt(ab) mu, ab s^2 + 1 - ab) and
    Cov(eps, x_t) = sqrt(1 - ab)."""
    def model_fn(x, t):
        alpha_bar = diffusion.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
        eps = (1 - alpha_bar).sqrt() * (x.double() - alpha_bar.sqrt() * mu) / (alpha_bar * s ** 2 + 1 - alpha_bar)
        return torch.cat([eps, torch.full_like(eps, v)], 1).float()
    return model_fn


@pytest.mark.parametrize('name', SCHEDULERS)
@pytest.mark.parametrize('num_timesteps', [1000, 250])
def test_schedulers_use_the_training_betas(name, num_timesteps):
    scheduler = make_scheduler(name, num_train_timesteps=num_timesteps)
    reference = GaussianDiffusion(num_timesteps=num_timesteps)
    np.testing.assert_allclose(scheduler.betas.numpy(), reference.betas.numpy(), rtol=1e-6)
    np.testing.assert_allclose(scheduler.alphas_cumprod.numpy(), reference.alphas_cumprod.numpy(), rtol=1e-4)
    assert scheduler.config.prediction_type == 'epsilon'


def test_unknown_sampler_raises():
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        make_scheduler('euler')


def test_ddpm_step_matches_gaussian_diffusion(diffusion):
    # one 1000-step DDPM update = our p(x_{t-1} | x_t) mean + exp(log_variance / 2) * the same noise draw
    scheduler = make_scheduler('ddpm')
    scheduler.set_timesteps(1000)
    generator = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, 3, 2, 4, 4, generator=generator)
    output = torch.cat([torch.randn(2, 3, 2, 4, 4, generator=generator),
                        torch.rand(2, 3, 2, 4, 4, generator=generator) * 2 - 1], 1)
    for step in [999, 500, 37, 1, 0]:
        prev = scheduler.step(output, step, x_t, generator=torch.Generator().manual_seed(step)).prev_sample
        ours = diffusion.p_mean_variance(output.double(), x_t.double(), torch.full((2,), step))
        noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(step)) if step > 0 else 0.0
        expected = ours['mean'] + (0.5 * ours['log_variance']).exp() * noise
        torch.testing.assert_close(prev, expected.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('name,num_steps', [('ddpm', 10), ('ddim', 10), ('ddim', 7), ('dpm-solver', 10),
                                            ('dpm-solver', 3)])
def test_point_mass_is_recovered(diffusion, name, num_steps):
    x0 = sample_latents(point_mass_model(diffusion, 0.7), (2, 3, 2, 4, 4), name, num_steps,
                        generator=torch.Generator().manual_seed(0), progress=False)
    assert x0.shape == (2, 3, 2, 4, 4) and x0.dtype == torch.float32
    torch.testing.assert_close(x0, torch.full_like(x0, 0.7), rtol=0, atol=1e-4)


@pytest.mark.parametrize('name,num_steps,v', [('ddpm', 1000, -1.0), ('ddpm', 1000, 1.0), ('ddim', 1000, 0.0),
                                              ('dpm-solver', 100, 0.0)])
def test_gaussian_data_distribution_is_reproduced(diffusion, name, num_steps, v):
    mu, s = 0.5, 0.3
    x0 = sample_latents(gaussian_model(diffusion, mu, s, v), SHAPE, name, num_steps,
                        generator=torch.Generator().manual_seed(0), progress=False)
    assert abs(x0.mean().item() - mu) < 0.01
    assert abs(x0.std().item() / s - 1) < 0.02


def test_dpm_solver_converges_faster_than_ddim(diffusion):
    # second-order multistep vs first order at the same 25 steps: both too dispersion-poor, DPM-Solver less so
    errors = {}
    for name in ('ddim', 'dpm-solver'):
        x0 = sample_latents(gaussian_model(diffusion, 0.5, 0.3), SHAPE, name, 25,
                            generator=torch.Generator().manual_seed(0), progress=False)
        errors[name] = abs(x0.std().item() - 0.3)
    assert errors['dpm-solver'] < errors['ddim']


@pytest.mark.parametrize('name', SCHEDULERS)
def test_samplers_run_a_tiny_dit_with_guidance(name):
    torch.manual_seed(0)
    model = DiT((4, 2, 3, 3), (6, 2), hidden_size=16, depth=1, num_heads=2).eval()
    for param in model.final_layer.parameters():          # a non-zero output, so guidance has an effect
        torch.nn.init.normal_(param, std=0.1)
    traj = torch.randn(2, 6, 2)
    x0 = sample_latents(lambda x, t: model.forward_with_cfg(x, t, traj, 3.0), (2, 4, 2, 3, 3), name, 4,
                        generator=torch.Generator().manual_seed(0), progress=False)
    assert x0.shape == (2, 4, 2, 3, 3) and torch.isfinite(x0).all()


def test_ddpm_is_reproducible_with_a_generator(diffusion):
    model_fn = gaussian_model(diffusion, 0.0, 1.0)

    def run(seed):
        return sample_latents(model_fn, (1, 2, 1, 3, 3), 'ddpm', 20, generator=torch.Generator().manual_seed(seed),
                              progress=False)
    torch.testing.assert_close(run(1), run(1), rtol=0, atol=0)
    assert not torch.allclose(run(1), run(2))


def test_schedule_follows_the_training_diffusion(diffusion):
    # a 500-step schedule trained model: its exact predictor recovers the point mass only with that schedule
    short = GaussianDiffusion(num_timesteps=500)
    x0 = sample_latents(point_mass_model(short, -0.4), (1, 2, 1, 2, 2), 'ddim', 10, progress=False,
                        schedule={'num_timesteps': 500, 'beta_start': 1e-4, 'beta_end': 0.02})
    torch.testing.assert_close(x0, torch.full_like(x0, -0.4), rtol=0, atol=1e-4)


def test_sample_latents_rejects_bad_inputs(diffusion):
    with pytest.raises(ValueError, match=r'eps \|\| v'):
        sample_latents(lambda x, t: x, (1, 2, 1, 2, 2), 'ddim', 2, progress=False)
    with pytest.raises(ValueError, match=r'num_steps must lie in \[1, 1000\]'):
        sample_latents(point_mass_model(diffusion, 0.0), (1, 2, 1, 2, 2), 'ddpm', 0, progress=False)
    with pytest.raises(ValueError, match='unknown sampler'):
        sample_latents(point_mass_model(diffusion, 0.0), (1, 2, 1, 2, 2), 'pndm', 2, progress=False)


# ---------------------------------------------------------------------------------------------------------------
# Known latents and rollouts

def known_prefix_dit():
    """A tiny known-prefix DiT with random weights everywhere (so its output depends on every input channel)."""
    torch.manual_seed(0)
    model = DiT((4, 3, 3, 3), (6, 2), hidden_size=16, depth=1, num_heads=2, known_prefix=True).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(std=0.1)
    return model


@pytest.mark.parametrize('name', SCHEDULERS)
def test_known_latents_are_unchanged_through_sampling_with_guidance(name):
    model, shape = known_prefix_dit(), (2, 4, 3, 3, 3)
    traj = torch.randn(2, 6, 2)
    known = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    steps = prefix_mask(torch.tensor([1, 2]), 3)                                    # (B, T') per-sample prefixes

    def run(known_latents):
        model_fn = lambda x, t: model.forward_with_cfg(x, t, traj, 3.0, known=known_latents,   # noqa: E731
                                                       known_mask=steps)
        return sample_latents(model_fn, shape, name, 4, generator=torch.Generator().manual_seed(0), progress=False,
                              known=known_latents, known_mask=steps[:, None, :, None, None])

    x0 = run(known)
    assert torch.equal(x0[0, :, :1], known[0, :, :1]) and torch.equal(x0[1, :, :2], known[1, :, :2])
    assert torch.isfinite(x0).all() and not torch.allclose(x0[0, :, 1:], known[0, :, 1:])
    # the unknown steps are sampled in view of the known ones
    other = run(known + 1.0)
    assert not torch.allclose(other[0, :, 1:], x0[0, :, 1:])


@pytest.mark.parametrize('name', SCHEDULERS)
def test_exact_predictor_fills_in_the_unknown_steps(diffusion, name):
    known = torch.full((2, 3, 2, 4, 4), -2.0)
    mask = torch.tensor([True, False])[None, None, :, None, None]
    x0 = sample_latents(point_mass_model(diffusion, 0.7), (2, 3, 2, 4, 4), name, 10, progress=False,
                        generator=torch.Generator().manual_seed(0), known=known, known_mask=mask)
    assert (x0[:, :, 0] == -2.0).all()
    torch.testing.assert_close(x0[:, :, 1], torch.full_like(x0[:, :, 1], 0.7), rtol=0, atol=1e-4)


def test_rollout_windows_know_the_overlap_with_the_window_before(diffusion):
    calls = []

    def window_model_fn(window, known, known_mask):
        calls.append((window, known, known_mask))
        return point_mass_model(diffusion, float(window))          # window w alone would be the constant w

    shape, context = (2, 3, 4, 2, 2), torch.full((2, 3, 1, 2, 2), -5.0)
    windows = sample_rollout(window_model_fn, shape, 3, 2, 'ddim', 5, context=context, progress=False,
                             generator=torch.Generator().manual_seed(0))
    assert len(windows) == 3 and all(w.shape == shape for w in windows)
    assert torch.equal(windows[0][:, :, :1], context)
    torch.testing.assert_close(windows[0][:, :, 1:], torch.zeros(2, 3, 3, 2, 2), rtol=0, atol=1e-4)
    for before, after in zip(windows, windows[1:]):
        assert torch.equal(after[:, :, :2], before[:, :, 2:])          # the seam: exactly the overlap
    torch.testing.assert_close(windows[2][:, :, 2:], torch.full((2, 3, 2, 2, 2), 2.0), rtol=0, atol=1e-4)
    # the model is told what is known: the first window the context step, later ones the 2 overlap steps
    assert calls[0][2].tolist() == [[True, False, False, False]] * 2
    assert calls[1][2].tolist() == calls[2][2].tolist() == [[True, True, False, False]] * 2
    assert torch.equal(calls[1][1][:, :, :2], windows[0][:, :, 2:]) and (calls[1][1][:, :, 2:] == 0).all()
    # without context the first window knows nothing
    sample_rollout(window_model_fn, shape, 1, 0, 'ddim', 2, progress=False)
    assert calls[-1][1] is None and calls[-1][2] is None


def test_known_and_rollout_inputs_raise_clear_errors(diffusion):
    model_fn = point_mass_model(diffusion, 0.0)
    shape = (1, 2, 3, 2, 2)
    with pytest.raises(ValueError, match='or neither'):
        sample_latents(model_fn, shape, 'ddim', 2, progress=False, known=torch.zeros(shape))
    with pytest.raises(ValueError, match='known_mask must be a bool tensor broadcastable'):
        sample_latents(model_fn, shape, 'ddim', 2, progress=False, known=torch.zeros(shape),
                       known_mask=torch.ones(1, 1, 2, 1, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match='known must have the shape of the latents'):
        sample_latents(model_fn, shape, 'ddim', 2, progress=False, known=torch.zeros(1, 2, 2, 2, 2),
                       known_mask=torch.ones(1, 1, 3, 1, 1, dtype=torch.bool))
    window_fn = lambda window, known, known_mask: model_fn                  # noqa: E731
    with pytest.raises(ValueError, match=r'overlap_steps must lie in \[1, 2\]'):
        sample_rollout(window_fn, shape, 2, 3, 'ddim', 2, progress=False)
    with pytest.raises(ValueError, match='context must have shape'):
        sample_rollout(window_fn, shape, 2, 1, 'ddim', 2, progress=False, context=torch.zeros(1, 2, 3, 2, 2))
