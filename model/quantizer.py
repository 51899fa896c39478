"""The latent bottlenecks of the tokenizer. The vector quantizer of the 4D VQ-VAE (van den Oord et al. 2017, arXiv
1711.00937) is upstream OccSora's ``VectorQuantizer`` with ``use_voxel=True`` (``model/VAE/vae_2d_resnet.py``,
wzzheng/OccSora@9f8d1f0), plus two flags that are off by default:

- ``ema=True``: the codebook follows an exponential moving average of the latents assigned to each code
  (Razavi et al. 2019, arXiv 1906.00446, with Laplace smoothing of the counts) instead of a gradient;
- ``dead_code_threshold > 0``: during training, codes whose moving-average usage (assignments per step) falls
  below the threshold are re-initialised to random latents of the current batch (Jukebox, arXiv 2005.00341).

Call it as ``z_q, indices, loss = vq(z)``; ``lookup(indices)`` gives the same ``z_q`` from the indices alone.
``GaussianLatent`` (flag) replaces it by continuous latents with a KL term.
"""

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

LAPLACE_EPS = 1e-5   # additive smoothing of the EMA code counts, so that an unused code never divides by zero


def _all_reduce_sum(tensor):
    """Sum ``tensor`` in place over all processes when torch.distributed is initialised."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


class VectorQuantizer(nn.Module):
    """1^3 conv -> nearest of ``codebook_size`` codes (squared L2) -> 1^3 conv, with a straight-through gradient.

    Loss = codebook_weight * mean((sg[z] - e)^2) + commitment_weight * mean((z - sg[e])^2), z being the
    quant_conv output and e its nearest code. With both weights 1 this is upstream's legacy form
    mean((sg[z_q] - z)^2) + beta * mean((z_q - sg[z])^2), beta = 1. With ``ema`` the codebook term is dropped
    (the codebook gets no gradient).
    """

    def __init__(self, codebook_size, latent_channels, codebook_weight=1.0, commitment_weight=1.0, ema=False,
                 ema_decay=0.99, dead_code_threshold=0.0):
        super().__init__()
        if codebook_size < 1 or latent_channels < 1:
            raise ValueError(f'codebook_size and latent_channels must be positive, got {codebook_size}, '
                             f'{latent_channels}')
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f'ema_decay must lie in [0, 1), got {ema_decay}')
        if dead_code_threshold < 0:
            raise ValueError(f'dead_code_threshold must be >= 0, got {dead_code_threshold}')
        self.codebook_size, self.latent_channels = codebook_size, latent_channels
        self.codebook_weight, self.commitment_weight = codebook_weight, commitment_weight
        self.ema, self.ema_decay, self.dead_code_threshold = ema, ema_decay, dead_code_threshold

        self.quant_conv = nn.Conv3d(latent_channels, latent_channels, 1)
        self.codebook = nn.Embedding(codebook_size, latent_channels)
        nn.init.uniform_(self.codebook.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        self.post_quant_conv = nn.Conv3d(latent_channels, latent_channels, 1)

        # Moving-average statistics exist only when a flag needs them, so the faithful state dict stays upstream's.
        # They start as if every code had been assigned once, at its initial position: the EMA codebook then
        # starts exactly at the initial codebook instead of dividing a decayed sum by a near-zero count.
        if ema or dead_code_threshold > 0:
            self.register_buffer('cluster_size', torch.ones(codebook_size))          # (K,) assignments per step
        if ema:
            self.codebook.weight.requires_grad_(False)
            self.register_buffer('embed_sum', self.codebook.weight.detach().clone())  # (K, C)

    # -----------------------------------------------------------------------------------------------------------
    def forward(self, z):
        """z: (B, C, T', H', W') pre-quant-conv latent.

        Returns z_q (B, C, T', H', W') post-quant-conv quantised latent (what the decoder consumes), indices
        (B, T', H', W') int64 and the scalar loss. In training mode the EMA / dead-code flags update the codebook.
        """
        if z.dim() != 5 or z.shape[1] != self.latent_channels:
            raise ValueError(f'VectorQuantizer expects z of shape (B, {self.latent_channels}, T, H, W), '
                             f'got {tuple(z.shape)}')
        # Distances, argmin and the codebook updates stay in fp32 under bf16 autocast.
        with torch.autocast(z.device.type, enabled=False):
            z = self.quant_conv(z.float())
            batch, _, frames, height, width = z.shape
            flat = rearrange(z, 'b c t h w -> (b t h w) c')                     # (N, C)
            indices = self.nearest_codes(flat)                                  # (N,)
            codes = self.codebook(indices)                                      # (N, C)

            commitment = F.mse_loss(flat, codes.detach())
            loss = self.commitment_weight * commitment
            if not self.ema:
                loss = loss + self.codebook_weight * F.mse_loss(codes, flat.detach())
            if self.training:
                self._update_codebook(flat.detach(), indices)

            # Straight-through estimator: the gradient reaches z unchanged. Written as e + (z - sg[z]) rather than
            # upstream's z + sg[e - z]: same gradient, but the value is exactly e, so lookup(indices) reproduces it.
            quantized = codes.detach() + (flat - flat.detach())
            quantized = rearrange(quantized, '(b t h w) c -> b c t h w', b=batch, t=frames, h=height, w=width)
            z_q = self.post_quant_conv(quantized)
        indices = rearrange(indices, '(b t h w) -> b t h w', b=batch, t=frames, h=height, w=width)
        return z_q, indices, loss

    @torch.no_grad()
    def nearest_codes(self, flat):
        """flat: (N, C) -> (N,) int64 index of the nearest code in squared L2 (|e|^2 - 2 z.e, |z|^2 dropped)."""
        codebook = self.codebook.weight
        distances = torch.addmm(codebook.pow(2).sum(1)[None], flat, codebook.t(), alpha=-2.0)   # (N, K)
        return distances.argmin(dim=1)

    def lookup(self, indices):
        """indices: (B, T', H', W') integer -> z_q (B, C, T', H', W'), through the codebook and post_quant_conv."""
        if indices.dim() != 4 or indices.dtype.is_floating_point:
            raise ValueError(f'lookup expects integer indices of shape (B, T, H, W), got {tuple(indices.shape)} '
                             f'{indices.dtype}')
        codes = rearrange(self.codebook(indices.long()), 'b t h w c -> b c t h w')
        return self.post_quant_conv(codes)

    def codebook_vectors(self):
        """(codebook_size, latent_channels): post_quant_conv applied to every code (the table stage 2 uses)."""
        weight = self.post_quant_conv.weight.flatten(1)                         # (C_out, C_in)
        return F.linear(self.codebook.weight, weight, self.post_quant_conv.bias)

    # -----------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _update_codebook(self, flat, indices):
        """EMA codebook update and dead-code restart for one training batch; flat (N, C), indices (N,)."""
        if not (self.ema or self.dead_code_threshold > 0):
            return
        counts = _all_reduce_sum(torch.bincount(indices, minlength=self.codebook_size).type_as(flat))   # (K,)
        self.cluster_size.lerp_(counts, 1.0 - self.ema_decay)
        if self.ema:
            sums = _all_reduce_sum(torch.zeros_like(self.embed_sum).index_add_(0, indices, flat))      # (K, C)
            self.embed_sum.lerp_(sums, 1.0 - self.ema_decay)
            total = self.cluster_size.sum()
            smoothed = (self.cluster_size + LAPLACE_EPS) / (total + self.codebook_size * LAPLACE_EPS) * total
            self.codebook.weight.copy_(self.embed_sum / smoothed[:, None])
        if self.dead_code_threshold > 0:
            self._restart_dead_codes(flat)

    @torch.no_grad()
    def _restart_dead_codes(self, flat):
        """Move codes used less than ``dead_code_threshold`` times per step (EMA) onto random latents of the batch.
        Rank 0 draws them and broadcasts, so every process keeps the same codebook."""
        dead = self.cluster_size < self.dead_code_threshold                     # (K,) same on every process
        num_dead = int(dead.sum())
        if num_dead == 0:
            return
        samples = flat[torch.randint(len(flat), (num_dead,), device=flat.device)]   # (num_dead, C)
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(samples, src=0)
        self.codebook.weight[dead] = samples
        # A restarted code counts as just reaching the threshold: it is restarted again unless it gets used.
        self.cluster_size[dead] = self.dead_code_threshold
        if self.ema:
            self.embed_sum[dead] = samples * self.dead_code_threshold


class GaussianLatent(nn.Module):
    """Continuous latent bottleneck (flag ``latent_type='gaussian'``; a VAE, as DOME and UniScene use for
    occupancy): 1^3 conv -> per-channel mean and log-variance -> a sample (training) or the mean (eval) -> 1^3 conv.

    Called like the quantizer, ``z, indices, loss = latent(z)``, with indices None and
    loss = kl_weight * mean over elements of KL(N(mean, var) || N(0, 1)).
    """

    def __init__(self, latent_channels, kl_weight=1e-3):
        super().__init__()
        if latent_channels < 1 or kl_weight < 0:
            raise ValueError(f'latent_channels must be positive and kl_weight >= 0, got {latent_channels}, '
                             f'{kl_weight}')
        self.latent_channels, self.kl_weight = latent_channels, kl_weight
        self.quant_conv = nn.Conv3d(latent_channels, 2 * latent_channels, 1)
        self.post_quant_conv = nn.Conv3d(latent_channels, latent_channels, 1)

    def forward(self, z):
        """z: (B, C, T', H', W') -> (z (B, C, T', H', W') post-quant-conv latent, None, scalar KL loss)."""
        if z.dim() != 5 or z.shape[1] != self.latent_channels:
            raise ValueError(f'GaussianLatent expects z of shape (B, {self.latent_channels}, T, H, W), '
                             f'got {tuple(z.shape)}')
        with torch.autocast(z.device.type, enabled=False):
            mean, log_var = self.quant_conv(z.float()).chunk(2, dim=1)           # (B, C, T', H', W') each
            log_var = log_var.clamp(-30.0, 20.0)
            kl = 0.5 * (mean.pow(2) + log_var.exp() - 1.0 - log_var).mean()
            sample = mean + torch.randn_like(mean) * (0.5 * log_var).exp() if self.training else mean
            return self.post_quant_conv(sample), None, self.kl_weight * kl
