"""Gaussian diffusion for training the DiT: forward process, posterior, learned-range variance, hybrid loss.

The maths of DDPM (Ho, Jain & Abbeel, "Denoising Diffusion Probabilistic Models", 2020) with the learned
variance and hybrid objective of IDDPM (Nichol & Dhariwal, "Improved Denoising Diffusion Probabilistic Models",
2021), as DiT and upstream OccSora train (upstream's `diffusion/gaussian_diffusion.py`): linear betas, eps-prediction,
the model outputs eps || v and v in [-1, 1] interpolates the log-variance between the posterior variance and beta_t,
loss = MSE(eps) + the variational-bound term with a stop-gradient on the mean. Sampling lives in model/sampling.py
(diffusers' schedulers); this module is the training side and the reference the samplers are tested against.

Two flags, off by default (= upstream): ``prediction_type`` 'v_prediction' or 'sample' (x0) instead of eps, and
``min_snr_gamma`` (Min-SNR-gamma loss weighting). With eps-prediction and linear betas, half the training steps have
SNR < 0.1, where the eps error hardly depends on the clean latent, and so hardly on the condition; both flags move the
loss towards the clean latent.

Notation: alpha_t = 1 - beta_t, alpha_bar_t = prod_{s <= t} alpha_s, steps t = 0 .. num_timesteps - 1.
"""
import math

import torch

PREDICTION_TYPES = ('epsilon', 'v_prediction', 'sample')


def linear_betas(num_timesteps=1000, beta_start=1e-4, beta_end=0.02):
    """Linear beta schedule in float64, scaled by 1000 / num_timesteps so that any number of steps spans the
    same noise levels as 1000 (IDDPM §3.2): (num_timesteps,) float64."""
    if num_timesteps < 2:
        raise ValueError(f'num_timesteps must be at least 2, got {num_timesteps}')
    scale = 1000 / num_timesteps
    betas = torch.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=torch.float64)
    if not (betas > 0).all() or not (betas < 1).all():
        raise ValueError(f'betas must lie in (0, 1); beta_start={beta_start}, beta_end={beta_end} scaled by '
                         f'1000/num_timesteps={scale:g} give [{betas[0]:g}, {betas[-1]:g}]')
    return betas


def mean_flat(x):
    """Mean over every axis but the batch axis: (B, ...) -> (B,)."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def weighted_mean_flat(x, weights=None):
    """Per-sample mean of x (B, ...) over the positions where weights (same shape, 0/1) is 1; plain mean_flat
    without weights. A sample whose weights are all 0 gets 0. -> (B,)"""
    if weights is None:
        return mean_flat(x)
    dims = tuple(range(1, x.ndim))
    return (x * weights).sum(dim=dims) / weights.sum(dim=dims).clamp(min=1)


def broadcasts_to(shape, target):
    """Whether a tensor of ``shape`` broadcasts to exactly ``target`` (both tuples of sizes)."""
    try:
        return torch.broadcast_shapes(tuple(shape), tuple(target)) == tuple(target)
    except RuntimeError:
        return False


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) element-wise, in nats (tensors broadcast)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def standard_normal_cdf(x):
    """Phi(x) of N(0, 1), element-wise, exact (erf). Upstream's `diffusion/gaussian_diffusion.py` uses the tanh
    approximation; the two give decoder NLLs (the VLB term at t = 0) 0.16 % apart, and the same loss elsewhere."""
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log P(x) under N(means, exp(log_scales)^2) integrated over the 8-bit bin of x (Ho et al. 2020, eq. 13):
    data in [-1, 1] in 256 bins of width 2/255; the two edge bins reach to -inf and +inf. Probabilities are
    clamped at 1e-12 as in IDDPM, which bounds each term at about 27.6 nats.

    x, means, log_scales: broadcastable tensors -> element-wise log-likelihood in nats
    """
    centred = x - means
    inv_std = torch.exp(-log_scales)
    cdf_upper = standard_normal_cdf(inv_std * (centred + 1.0 / 255))
    cdf_lower = standard_normal_cdf(inv_std * (centred - 1.0 / 255))
    log_cdf_upper = torch.log(cdf_upper.clamp(min=1e-12))                   # lowest bin: (-inf, upper edge]
    log_one_minus_cdf_lower = torch.log((1.0 - cdf_lower).clamp(min=1e-12))  # highest bin: [lower edge, inf)
    log_bin = torch.log((cdf_upper - cdf_lower).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_one_minus_cdf_lower, log_bin))


class GaussianDiffusion:
    """The diffusion process the DiT is trained on.

    Args:
        num_timesteps: number of diffusion steps T.
        beta_start, beta_end: ends of the linear beta schedule for 1000 steps (scaled for other T).
        prediction_type: what the first output half predicts: 'epsilon' (upstream, DDPM), 'v_prediction'
            (v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0, Salimans & Ho 2022) or 'sample' (x0); the names are
            diffusers' so that the samplers read the same value.
        min_snr_gamma: None (upstream: the plain MSE) or gamma of Min-SNR-gamma loss weighting (Hang et al. 2023):
            the MSE of each sample is weighted by min(SNR_t, gamma) / SNR_t for eps, / (SNR_t + 1) for v and by
            min(SNR_t, gamma) for x0, i.e. min(SNR_t, gamma) times the x0 error in every parameterisation.
    All per-step tables are float64 tensors of shape (T,); values are gathered per sample and cast to the
    data's dtype and device.
    """

    def __init__(self, num_timesteps=1000, beta_start=1e-4, beta_end=0.02, prediction_type='epsilon',
                 min_snr_gamma=None):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f'prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}')
        if min_snr_gamma is not None and not min_snr_gamma > 0:
            raise ValueError(f'min_snr_gamma must be positive or None, got {min_snr_gamma}')
        self.prediction_type, self.min_snr_gamma = prediction_type, min_snr_gamma
        self.num_timesteps = num_timesteps
        self.betas = linear_betas(num_timesteps, beta_start, beta_end)
        alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = torch.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = torch.sqrt(1.0 - self.alphas_cumprod)
        self.log_betas = torch.log(self.betas)

        one_minus_alphas_cumprod = 1.0 - self.alphas_cumprod
        # q(x_{t-1} | x_t, x0) = N(coef_x0 * x0 + coef_xt * x_t, posterior_variance)   (Ho et al. eq. 6-7)
        self.posterior_variance = self.betas * (1.0 - self.alphas_cumprod_prev) / one_minus_alphas_cumprod
        # the posterior variance is 0 at t = 0; its log there takes the t = 1 value (IDDPM), which only the
        # variance interpolation sees: the t = 0 term of the bound is the decoder NLL, not a KL
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]))
        self.posterior_mean_coef_x0 = self.betas * torch.sqrt(self.alphas_cumprod_prev) / one_minus_alphas_cumprod
        self.posterior_mean_coef_xt = (1.0 - self.alphas_cumprod_prev) * torch.sqrt(alphas) / one_minus_alphas_cumprod

    def _gather(self, table, t, like):
        """table[t] shaped to broadcast over ``like``: (T,), t (B,), like (B, ...) -> (B, 1, ..., 1)."""
        if tuple(t.shape) != (like.shape[0],):
            raise ValueError(f't must have shape (B,) = ({like.shape[0]},), got {tuple(t.shape)}')
        values = table.to(t.device)[t].to(like.dtype)
        return values.view(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0, t, noise):
        """Sample x_t ~ q(x_t | x0) = N(sqrt(alpha_bar_t) x0, (1 - alpha_bar_t) I) with the given noise.

        x0, noise: (B, ...), t: (B,) -> (B, ...)
        """
        return (self._gather(self.sqrt_alphas_cumprod, t, x0) * x0
                + self._gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise)

    def q_posterior_mean_variance(self, x0, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x0).

        x0, x_t: (B, ...), t: (B,) -> (mean (B, ...), variance (B, 1, ...), log_variance (B, 1, ...))
        """
        mean = (self._gather(self.posterior_mean_coef_x0, t, x_t) * x0
                + self._gather(self.posterior_mean_coef_xt, t, x_t) * x_t)
        return (mean, self._gather(self.posterior_variance, t, x_t),
                self._gather(self.posterior_log_variance_clipped, t, x_t))

    def predicted_x0(self, prediction, x_t, t):
        """The clean latent implied by the first output half (eps, v or x0 as ``prediction_type`` says).

        prediction, x_t: (B, C, ...), t: (B,) -> (B, C, ...)
        """
        if self.prediction_type == 'sample':
            return prediction
        alpha = self._gather(self.sqrt_alphas_cumprod, t, x_t)
        sigma = self._gather(self.sqrt_one_minus_alphas_cumprod, t, x_t)
        if self.prediction_type == 'v_prediction':
            return alpha * x_t - sigma * prediction
        return (x_t - sigma * prediction) / alpha                                       # q_sample solved for x0

    def prediction_from_x0(self, x0, x_t, t):
        """The first output half that implies the clean latent ``x0`` at x_t (the inverse of predicted_x0):
        x0 itself, eps = (x_t - alpha x0) / sigma or v = (alpha x_t - x0) / sigma. x0, x_t: (B, C, ...), t: (B,)"""
        if self.prediction_type == 'sample':
            return x0
        alpha = self._gather(self.sqrt_alphas_cumprod, t, x_t)
        sigma = self._gather(self.sqrt_one_minus_alphas_cumprod, t, x_t)
        if self.prediction_type == 'v_prediction':
            return (alpha * x_t - x0) / sigma
        return (x_t - alpha * x0) / sigma

    def target(self, x0, noise, t):
        """What the first output half is trained to predict: eps, v or x0. x0, noise: (B, C, ...), t: (B,)"""
        if self.prediction_type == 'epsilon':
            return noise
        if self.prediction_type == 'sample':
            return x0
        return (self._gather(self.sqrt_alphas_cumprod, t, x0) * noise
                - self._gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0)

    def loss_weights(self, t):
        """Per-sample MSE weights: 1, or Min-SNR-gamma's (class docstring). t: (B,) -> (B,) float64"""
        if self.min_snr_gamma is None:
            return torch.ones(t.shape, dtype=torch.float64, device=t.device)
        alphas_cumprod = self.alphas_cumprod.to(t.device)[t]
        snr = alphas_cumprod / (1 - alphas_cumprod)
        clipped = snr.clamp(max=self.min_snr_gamma)
        return {'epsilon': clipped / snr, 'v_prediction': clipped / (snr + 1), 'sample': clipped}[self.prediction_type]

    def p_mean_variance(self, model_output, x_t, t):
        """p(x_{t-1} | x_t) from the model's prediction || v (learned-range variance, IDDPM eq. 15):
        log sigma^2 = frac * log beta_t + (1 - frac) * log posterior_variance_t, frac = (v + 1) / 2; the mean is
        the posterior mean at the predicted x0 (no clipping, as upstream samples).

        model_output: (B, 2C, ...), x_t: (B, C, ...), t: (B,) ->
            dict(mean, variance, log_variance, pred_x0), each (B, C, ...)
        """
        if model_output.shape[0] != x_t.shape[0] or model_output.shape[1] != 2 * x_t.shape[1] \
                or model_output.shape[2:] != x_t.shape[2:]:
            raise ValueError(f'model output must be eps || v of shape (B, 2C, ...) = '
                             f'{(x_t.shape[0], 2 * x_t.shape[1], *x_t.shape[2:])}, got {tuple(model_output.shape)}')
        prediction, var_values = model_output.chunk(2, dim=1)                            # (B, C, ...) each
        frac = (var_values + 1) / 2
        min_log = self._gather(self.posterior_log_variance_clipped, t, x_t)
        max_log = self._gather(self.log_betas, t, x_t)
        log_variance = frac * max_log + (1 - frac) * min_log
        pred_x0 = self.predicted_x0(prediction, x_t, t)
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, x_t, t)
        return {'mean': mean, 'variance': torch.exp(log_variance), 'log_variance': log_variance, 'pred_x0': pred_x0}

    def variational_bound_term(self, model_output, x0, x_t, t, weights=None):
        """The term L_{t} of the variational bound for each sample, in bits per dimension: KL(q(x_{t-1} | x_t, x0)
        || p(x_{t-1} | x_t)) for t > 0, the discretised Gaussian decoder NLL -log p(x0 | x_1) for t == 0.

        model_output: (B, 2C, ...), x0, x_t: (B, C, ...), t: (B,); weights: optional (B, C, ...) 0/1, the
        positions averaged over (None = all) -> (B,)
        """
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x0, x_t, t)
        p = self.p_mean_variance(model_output, x_t, t)
        kl = normal_kl(true_mean, true_log_variance, p['mean'], p['log_variance'])
        decoder_nll = -discretized_gaussian_log_likelihood(x0, means=p['mean'], log_scales=0.5 * p['log_variance'])
        at_zero = (t == 0).view(-1, *([1] * (x0.ndim - 1)))
        return weighted_mean_flat(torch.where(at_zero, decoder_nll, kl), weights) / math.log(2.0)

    def training_losses(self, model, x0, t, model_kwargs=None, noise=None, known_mask=None):
        """IDDPM's hybrid loss for one batch: mse = mean-squared error of the prediction (eps unless
        ``prediction_type`` says otherwise; Min-SNR-weighted with ``min_snr_gamma``); vb = the bound term at t with
        the predicted mean detached, so vb trains only the variance (IDDPM §3.1), weighted by num_timesteps / 1000.

        Known positions (``known_mask``, for forecasting): they are not diffused, x_t holds the clean x0 there,
        as at sampling time (model/sampling.py), and both terms are averaged over the unknown positions only, so
        the model's output at known positions has no effect on the loss. A sample with nothing unknown gets 0.

        Args:
            model: callable model(x_t, t, **model_kwargs) -> (B, 2C, ...) eps || v.
            x0: (B, C, ...) clean latents; t: (B,) steps; noise: (B, C, ...) or None (drawn N(0, I)).
            known_mask: optional bool tensor broadcastable to x0, e.g. (B, 1, T', 1, 1); True = known.
        Returns:
            dict(loss=mse + vb, mse, vb), each (B,).
        """
        if t.min() < 0 or t.max() >= self.num_timesteps:
            raise ValueError(f't must lie in [0, {self.num_timesteps - 1}], got [{t.min()}, {t.max()}]')
        noise = torch.randn_like(x0) if noise is None else noise
        if noise.shape != x0.shape:
            raise ValueError(f'noise must have the shape of x0 {tuple(x0.shape)}, got {tuple(noise.shape)}')
        x_t = self.q_sample(x0, t, noise)
        weights = None
        if known_mask is not None:
            if known_mask.dtype != torch.bool or not broadcasts_to(known_mask.shape, x0.shape):
                raise ValueError(f'known_mask must be a bool tensor broadcastable to x0 {tuple(x0.shape)}, got '
                                 f'{tuple(known_mask.shape)} {known_mask.dtype}')
            known_mask = known_mask.to(x0.device)
            x_t = torch.where(known_mask, x0, x_t)
            weights = (~known_mask).to(x0.dtype).expand_as(x0)                          # (B, C, ...) 1 = unknown
        model_output = model(x_t, t, **(model_kwargs or {}))
        if model_output.shape[1:2] != (2 * x0.shape[1],) or model_output.shape[2:] != x0.shape[2:]:
            raise ValueError(f'the model must output eps || v of shape {(x0.shape[0], 2 * x0.shape[1], *x0.shape[2:])}'
                             f' (learned-range variance), got {tuple(model_output.shape)}')
        prediction, var_values = model_output.chunk(2, dim=1)                            # (B, C, ...) each
        mse = weighted_mean_flat((self.target(x0, noise, t) - prediction) ** 2, weights)
        mse = mse * self.loss_weights(t).to(mse.dtype)
        frozen_mean_output = torch.cat([prediction.detach(), var_values], dim=1)
        vb = self.variational_bound_term(frozen_mean_output, x0, x_t, t, weights) * (self.num_timesteps / 1000.0)
        return {'loss': mse + vb, 'mse': mse, 'vb': vb}
