"""GaussianDiffusion (model/diffusion.py) against closed forms computed independently in float64 numpy."""
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from model.diffusion import (GaussianDiffusion, discretized_gaussian_log_likelihood, linear_betas, mean_flat,
                             normal_kl)


@pytest.fixture(scope='module')
def diffusion():
    return GaussianDiffusion()


def numpy_schedule(num_timesteps=1000, beta_start=1e-4, beta_end=0.02):
    """betas, alphas and alpha_bar of IDDPM's scaled linear schedule, in numpy float64."""
    scale = 1000 / num_timesteps
    betas = np.linspace(scale * beta_start, scale * beta_end, num_timesteps)
    return betas, 1 - betas, np.cumprod(1 - betas)


def test_linear_betas_are_scaled_to_the_number_of_steps():
    betas = linear_betas(1000)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    assert (betas[1:] > betas[:-1]).all()
    half = linear_betas(500)
    assert half[0].item() == pytest.approx(2e-4) and half[-1].item() == pytest.approx(0.04)
    with pytest.raises(ValueError, match='betas must lie in'):
        linear_betas(10, beta_end=0.02)             # scaled by 100 -> beta_end 2


def test_posterior_matches_bayes_rule(diffusion):
    # q(x_{t-1} | x0) = N(sqrt(ab_prev) x0, 1 - ab_prev) and q(x_t | x_{t-1}) = N(sqrt(a_t) x_{t-1}, b_t): the
    # posterior precision is the sum of precisions and the mean their weighted combination
    betas, alphas, alpha_bar = numpy_schedule()
    rng = np.random.default_rng(0)
    t = np.array([1, 2, 10, 500, 998, 999])
    x0, x_t = rng.normal(size=(6, 3, 2)), rng.normal(size=(6, 3, 2))
    ab_prev = alpha_bar[t - 1]
    precision = 1 / (1 - ab_prev) + alphas[t] / betas[t]
    variance = 1 / precision
    mean = variance[:, None, None] * (np.sqrt(ab_prev)[:, None, None] * x0 / (1 - ab_prev)[:, None, None]
                                      + np.sqrt(alphas[t])[:, None, None] * x_t / betas[t][:, None, None])
    got_mean, got_variance, got_log_variance = diffusion.q_posterior_mean_variance(
        torch.from_numpy(x0), torch.from_numpy(x_t), torch.from_numpy(t))
    np.testing.assert_allclose(got_mean.numpy(), mean, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got_variance.numpy().ravel(), variance, rtol=1e-10)
    np.testing.assert_allclose(got_log_variance.numpy().ravel(), np.log(variance), rtol=1e-10)


def test_posterior_at_t0_is_x0_with_clipped_log_variance(diffusion):
    x0, x_t = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    t = torch.zeros(2, dtype=torch.long)
    mean, variance, log_variance = diffusion.q_posterior_mean_variance(x0, x_t, t)
    torch.testing.assert_close(mean, x0)
    assert (variance == 0).all()
    betas, _, alpha_bar = numpy_schedule()
    posterior_variance_1 = betas[1] * (1 - alpha_bar[0]) / (1 - alpha_bar[1])
    np.testing.assert_allclose(log_variance.numpy().ravel(), np.log(posterior_variance_1), rtol=1e-12)


def test_normal_kl_known_values():
    zeros, zero, one = torch.zeros(3), torch.tensor(0.), torch.tensor(1.)
    assert (normal_kl(zeros, zeros, zeros, zeros) == 0).all()
    means, logvars = torch.randn(5), torch.randn(5)
    torch.testing.assert_close(normal_kl(means, logvars, means, logvars), torch.zeros(5))
    # KL(N(0, 1) || N(1, 1)) = 1/2; KL(N(0, 1) || N(0, 4)) = (log 4 + 1/4 - 1) / 2
    assert normal_kl(zero, zero, one, zero).item() == pytest.approx(0.5)
    log_4 = torch.tensor(math.log(4))
    assert normal_kl(zero, zero, zero, log_4).item() == pytest.approx(0.5 * (math.log(4) + 0.25 - 1))


def test_discretized_likelihood_known_value_and_normalisation():
    # centre bin of N(0, 1): Phi(1/255) - Phi(-1/255)
    zero = torch.zeros(1, dtype=torch.float64)
    value = discretized_gaussian_log_likelihood(zero, zero, zero)
    assert value.item() == pytest.approx(math.log(norm.cdf(1 / 255) - norm.cdf(-1 / 255)), rel=1e-9)
    # the 256 bins of [-1, 1] carry all the probability mass, whatever the Gaussian
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, log_scale in [(0.0, math.log(0.5)), (0.3, math.log(0.05)), (-2.0, 0.0)]:
        probabilities = discretized_gaussian_log_likelihood(
            bins, torch.full_like(bins, mean), torch.full_like(bins, log_scale)).exp()
        assert probabilities.sum().item() == pytest.approx(1.0, abs=1e-9)


def test_q_sample_statistics(diffusion):
    torch.manual_seed(0)
    t = torch.tensor([0, 250, 999])
    x0 = torch.full((3, 20000), 0.8, dtype=torch.float64)
    x_t = diffusion.q_sample(x0, t, torch.randn_like(x0))
    _, _, alpha_bar = numpy_schedule()
    np.testing.assert_allclose(x_t.mean(1).numpy(), np.sqrt(alpha_bar[t]) * 0.8, atol=0.02)
    np.testing.assert_allclose(x_t.std(1).numpy(), np.sqrt(1 - alpha_bar[t]), rtol=0.03)
    # with the noise given, x_t is exactly sqrt(ab) x0 + sqrt(1 - ab) noise
    noise = torch.full_like(x0, -1.5)
    np.testing.assert_allclose(diffusion.q_sample(x0, t, noise)[:, 0].numpy(),
                               np.sqrt(alpha_bar[t]) * 0.8 - 1.5 * np.sqrt(1 - alpha_bar[t]), rtol=1e-12)


def test_p_mean_variance_interpolates_the_log_variance(diffusion):
    betas, alphas, alpha_bar = numpy_schedule()
    t = torch.tensor([0, 1, 500, 999])
    x0, noise = torch.randn(4, 2, 3, dtype=torch.float64), torch.randn(4, 2, 3, dtype=torch.float64)
    x_t = diffusion.q_sample(x0, t, noise)
    posterior_log_variance = diffusion.q_posterior_mean_variance(x0, x_t, t)[2].ravel().numpy()
    for v, expected in [(1.0, np.log(betas[t])), (-1.0, posterior_log_variance),
                        (0.0, 0.5 * (np.log(betas[t]) + posterior_log_variance))]:
        out = diffusion.p_mean_variance(torch.cat([noise, torch.full_like(noise, v)], 1), x_t, t)
        np.testing.assert_allclose(out['log_variance'][:, 0, 0].numpy(), expected, rtol=1e-12)
        torch.testing.assert_close(out['variance'], out['log_variance'].exp())
        # the true noise recovers x0, and the mean is the true posterior mean
        torch.testing.assert_close(out['pred_x0'], x0)
        torch.testing.assert_close(out['mean'], diffusion.q_posterior_mean_variance(x0, x_t, t)[0])


def test_p_mean_variance_rejects_an_output_without_variance(diffusion):
    with pytest.raises(ValueError, match=r'eps \|\| v'):
        diffusion.p_mean_variance(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.zeros(2, dtype=torch.long))


def test_vb_term_is_decoder_nll_at_t0_and_kl_elsewhere(diffusion):
    torch.manual_seed(0)
    x0 = torch.rand(3, 2, 5) * 2 - 1
    output = torch.randn(3, 4, 5) * 0.1
    t0 = torch.zeros(3, dtype=torch.long)
    x_t = diffusion.q_sample(x0, t0, torch.randn_like(x0))
    p = diffusion.p_mean_variance(output, x_t, t0)
    nll = -mean_flat(discretized_gaussian_log_likelihood(x0, p['mean'], 0.5 * p['log_variance'])) / math.log(2)
    torch.testing.assert_close(diffusion.variational_bound_term(output, x0, x_t, t0), nll)
    # a model with the true noise and the posterior variance (v = -1) has a zero KL for every t > 0
    t = torch.tensor([1, 400, 999])
    noise = torch.randn_like(x0)
    x_t = diffusion.q_sample(x0, t, noise)
    perfect = torch.cat([noise, -torch.ones_like(noise)], 1)
    assert diffusion.variational_bound_term(perfect, x0, x_t, t).abs().max() < 1e-5


def test_training_losses_hand_computed_mse_and_finite_at_both_ends(diffusion):
    x0 = torch.rand(4, 2, 3, 3) * 2 - 1
    noise = torch.full_like(x0, 1.5)

    def constant_model(x_t, t, scale):
        return torch.cat([torch.full_like(x_t, 0.5 * scale), torch.zeros_like(x_t)], 1)

    t = torch.tensor([0, 1, 500, 999])
    losses = diffusion.training_losses(constant_model, x0, t, model_kwargs={'scale': 2.0}, noise=noise)
    torch.testing.assert_close(losses['mse'], torch.full((4,), 0.25))           # (1.5 - 1.0)^2
    torch.testing.assert_close(losses['loss'], losses['mse'] + losses['vb'])
    assert all(torch.isfinite(value).all() for value in losses.values())
    assert (losses['vb'] >= 0).all()


def test_vb_trains_only_the_variance_and_mse_only_the_mean(diffusion):
    eps = torch.zeros(2, 3, 4, requires_grad=True)
    var_values = torch.zeros(2, 3, 4, requires_grad=True)
    model = lambda x_t, t: torch.cat([x_t * 0 + eps, var_values], 1)      # noqa: E731
    losses = diffusion.training_losses(model, torch.randn(2, 3, 4), torch.tensor([0, 300]))
    eps_grad, var_grad = torch.autograd.grad(losses['vb'].sum(), [eps, var_values])
    assert (eps_grad == 0).all() and var_grad.abs().sum() > 0
    losses = diffusion.training_losses(model, torch.randn(2, 3, 4), torch.tensor([0, 300]))
    eps_grad, var_grad = torch.autograd.grad(losses['mse'].sum(), [eps, var_values])
    assert eps_grad.abs().sum() > 0 and (var_grad == 0).all()


def test_vb_weight_scales_with_the_number_of_steps():
    x0, noise, t = torch.rand(2, 1, 4) * 2 - 1, torch.randn(2, 1, 4), torch.tensor([3, 40])
    model = lambda x_t, t: torch.cat([x_t * 0.3, torch.zeros_like(x_t)], 1)   # noqa: E731
    diffusion = GaussianDiffusion(num_timesteps=100)
    losses = diffusion.training_losses(model, x0, t, noise=noise)
    x_t = diffusion.q_sample(x0, t, noise)
    unweighted = diffusion.variational_bound_term(model(x_t, t), x0, x_t, t)
    torch.testing.assert_close(losses['vb'], unweighted * 0.1)


def test_training_losses_reject_bad_inputs(diffusion):
    x0 = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match='learned-range'):
        diffusion.training_losses(lambda x_t, t: x_t, x0, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r't must lie in \[0, 999\]'):
        diffusion.training_losses(lambda x_t, t: torch.cat([x_t, x_t], 1), x0, torch.tensor([1, 1000]))
    with pytest.raises(ValueError, match='t must have shape'):
        diffusion.q_sample(x0, torch.tensor([1, 2, 3]), x0)


# ---------------------------------------------------------------------------------------------------------------
# Known positions (forecasting): not diffused, not in the loss

KNOWN = torch.tensor([True, False, True])[None, None, :, None]          # (1, 1, T'=3, 1): steps 0 and 2 known


def test_loss_ignores_the_output_at_known_positions(diffusion):
    x0, noise, t = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4), torch.tensor([0, 700])
    base = torch.randn(2, 4, 3, 4)

    def model_with(offset):
        return lambda x_t, t: base + offset

    reference = diffusion.training_losses(model_with(0.0), x0, t, noise=noise, known_mask=KNOWN)
    at_known = torch.zeros_like(base)
    at_known[:, :, [0, 2]] = 7.0                                          # eps and v, at the known steps only
    changed = diffusion.training_losses(model_with(at_known), x0, t, noise=noise, known_mask=KNOWN)
    for key in ('loss', 'mse', 'vb'):
        torch.testing.assert_close(changed[key], reference[key])
    at_unknown = torch.zeros_like(base)
    at_unknown[:, :, 1] = 7.0
    moved = diffusion.training_losses(model_with(at_unknown), x0, t, noise=noise, known_mask=KNOWN)
    assert not torch.allclose(moved['mse'], reference['mse']) and not torch.allclose(moved['vb'], reference['vb'])


def test_known_positions_are_clean_and_the_mse_is_averaged_over_the_unknown_ones(diffusion):
    x0, t = torch.rand(2, 2, 3, 4) * 2 - 1, torch.tensor([10, 999])
    noise = torch.full_like(x0, 1.5)
    seen = {}

    def model(x_t, t):
        seen['x_t'] = x_t
        eps = torch.full_like(x_t, 1.0)
        eps[:, :, [0, 2]] = 100.0                                        # a huge error where known
        return torch.cat([eps, torch.zeros_like(x_t)], 1)

    losses = diffusion.training_losses(model, x0, t, noise=noise, known_mask=KNOWN)
    torch.testing.assert_close(losses['mse'], torch.full((2,), 0.25))      # (1.5 - 1.0)^2 on step 1 only
    torch.testing.assert_close(seen['x_t'][:, :, [0, 2]], x0[:, :, [0, 2]])
    torch.testing.assert_close(seen['x_t'][:, :, 1], diffusion.q_sample(x0, t, noise)[:, :, 1])


def test_nothing_known_is_the_plain_loss(diffusion):
    x0, noise, t = torch.randn(3, 2, 3, 4), torch.randn(3, 2, 3, 4), torch.tensor([0, 5, 999])
    model = lambda x_t, t: torch.cat([x_t * 0.3, torch.tanh(x_t)], 1)       # noqa: E731
    plain = diffusion.training_losses(model, x0, t, noise=noise)
    masked = diffusion.training_losses(model, x0, t, noise=noise, known_mask=torch.zeros(1, 1, 3, 1, dtype=torch.bool))
    for key in ('loss', 'mse', 'vb'):
        torch.testing.assert_close(masked[key], plain[key])


def test_known_mask_must_be_a_broadcastable_bool(diffusion):
    model = lambda x_t, t: torch.cat([x_t, x_t], 1)                           # noqa: E731
    with pytest.raises(ValueError, match='known_mask must be a bool tensor broadcastable'):
        diffusion.training_losses(model, torch.zeros(2, 2, 3, 4), torch.tensor([1, 2]), known_mask=KNOWN.float())
    with pytest.raises(ValueError, match='known_mask must be a bool tensor broadcastable'):
        diffusion.training_losses(model, torch.zeros(2, 2, 3, 4), torch.tensor([1, 2]),
                                  known_mask=torch.ones(2, 2, 4, 4, dtype=torch.bool))
