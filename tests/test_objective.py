"""The stage-2 objective flags (model/diffusion.py prediction_type, min_snr_gamma): targets, Min-SNR weights, and
every sampler against an exact predictor of each parameterisation (the samplers read the same flag)."""
import pytest
import torch

from model.diffusion import PREDICTION_TYPES, GaussianDiffusion
from model.sampling import SCHEDULERS, make_scheduler, sample_latents


def exact_prediction(diffusion, x0, noise, t):
    """What a perfect model outputs for (x0, noise) at steps t, in ``diffusion``'s parameterisation."""
    return diffusion.target(x0, noise, t)


@pytest.mark.parametrize('prediction_type', PREDICTION_TYPES)
def test_exact_prediction_has_zero_mse_and_recovers_x0(prediction_type):
    diffusion = GaussianDiffusion(prediction_type=prediction_type)
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 2, 2, 3, 3, generator=generator), torch.randn(4, 2, 2, 3, 3, generator=generator)
    t = torch.tensor([0, 10, 500, 999])

    def model(x_t, t):
        return torch.cat([exact_prediction(diffusion, x0, noise, t), torch.zeros_like(x0)], 1)

    losses = diffusion.training_losses(model, x0, t, noise=noise)
    torch.testing.assert_close(losses['mse'], torch.zeros(4), rtol=0, atol=1e-10)
    x_t = diffusion.q_sample(x0, t, noise)
    torch.testing.assert_close(diffusion.predicted_x0(exact_prediction(diffusion, x0, noise, t), x_t, t), x0,
                               rtol=1e-4, atol=1e-4)


def test_faithful_objective_is_the_eps_mse():
    diffusion = GaussianDiffusion()
    generator = torch.Generator().manual_seed(1)
    x0, noise, eps = (torch.randn(3, 2, 1, 2, 2, generator=generator) for _ in range(3))
    t = torch.tensor([3, 400, 900])
    losses = diffusion.training_losses(lambda x_t, t: torch.cat([eps, torch.zeros_like(eps)], 1), x0, t, noise=noise)
    assert torch.equal(losses['mse'], ((noise - eps) ** 2).mean(dim=(1, 2, 3, 4)))


def test_min_snr_weights_the_x0_error_alike_in_every_parameterisation():
    # a prediction whose implied x0 is off by d costs min(SNR, gamma) * mean(d^2), whatever is predicted
    generator = torch.Generator().manual_seed(2)
    x0, noise, error = (torch.randn(4, 2, 1, 3, 3, generator=generator) for _ in range(3))
    t = torch.tensor([5, 100, 300, 800])
    costs = {}
    for prediction_type in PREDICTION_TYPES:
        diffusion = GaussianDiffusion(prediction_type=prediction_type, min_snr_gamma=5.0)
        x_t = diffusion.q_sample(x0.double(), t, noise.double())
        # the output whose predicted x0 is x0 + error: solve predicted_x0 (linear in the output) for it
        zero = diffusion.predicted_x0(torch.zeros_like(x_t), x_t, t)
        unit = diffusion.predicted_x0(torch.ones_like(x_t), x_t, t) - zero
        output = (x0.double() + error.double() - zero) / unit
        losses = diffusion.training_losses(lambda x, t: torch.cat([output, torch.zeros_like(output)], 1),
                                           x0.double(), t, noise=noise.double())
        costs[prediction_type] = losses['mse']
    alphas_cumprod = GaussianDiffusion().alphas_cumprod[t]
    expected = (alphas_cumprod / (1 - alphas_cumprod)).clamp(max=5.0) * (error.double() ** 2).mean(dim=(1, 2, 3, 4))
    for prediction_type, cost in costs.items():
        torch.testing.assert_close(cost, expected, rtol=1e-6, atol=1e-9, msg=prediction_type)


def test_bad_objective_flags_raise():
    with pytest.raises(ValueError, match='prediction_type'):
        GaussianDiffusion(prediction_type='x0')
    with pytest.raises(ValueError, match='min_snr_gamma'):
        GaussianDiffusion(min_snr_gamma=0.0)


def point_mass_predictor(diffusion, a):
    """The exact model of data that are the constant a, in ``diffusion``'s parameterisation (variance value 0)."""
    def model_fn(x, t):
        x = x.double()
        alpha_bar = diffusion.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
        noise = (x - alpha_bar.sqrt() * a) / (1 - alpha_bar).sqrt()
        prediction = diffusion.target(torch.full_like(x, a), noise, t)
        return torch.cat([prediction, torch.zeros_like(prediction)], 1).float()
    return model_fn


@pytest.mark.parametrize('prediction_type', ['v_prediction', 'sample'])
@pytest.mark.parametrize('name', SCHEDULERS)
def test_samplers_follow_the_training_parameterisation(prediction_type, name):
    diffusion = GaussianDiffusion(prediction_type=prediction_type)
    x0 = sample_latents(point_mass_predictor(diffusion, -0.6), (2, 2, 2, 3, 3), name, 10, progress=False,
                        generator=torch.Generator().manual_seed(0), schedule=dict(prediction_type=prediction_type,
                                                                                   min_snr_gamma=5.0))
    torch.testing.assert_close(x0, torch.full_like(x0, -0.6), rtol=0, atol=1e-3)
    assert make_scheduler(name, prediction_type=prediction_type).config.prediction_type == prediction_type
