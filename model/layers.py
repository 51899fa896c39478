"""3D building blocks of the 4D VQ-VAE tokenizer, after VideoGPT (Yan et al. 2021, arXiv 2104.10157), which
upstream OccSora uses unchanged (upstream's `model/VAE/vae_2d_resnet.py`).

All convolutional blocks work on (B, C, T, H, W) tensors. "Same" padding follows VideoGPT: a kernel k with
stride s is padded by k - s in total, the larger half in front, so a stride-2 kernel-4 conv halves every even
length and the transposed conv doubles it back.
"""
import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint


def _same_padding(kernel_size, stride):
    """F.pad amounts (last axis first) that pad each axis by kernel - stride, the larger half in front."""
    padding = []
    for kernel, step in zip(reversed(kernel_size), reversed(stride)):
        total = kernel - step
        padding += [total - total // 2, total // 2]
    return padding


def _symmetric_padding(padding):
    """Per-axis (T, H, W) padding when every axis is padded equally on both sides, else None.

    The convolution's own zero padding then gives the same result as F.pad without a padded copy of the input,
    which the backward pass would keep (at full resolution, the largest activations of the tokenizer)."""
    pairs = [padding[i:i + 2] for i in range(0, len(padding), 2)]
    if any(front != back for front, back in pairs):
        return None
    return tuple(front for front, _ in reversed(pairs))


def _triple(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * 3


class SamePadConv3d(nn.Module):
    """Conv3d whose output length is ceil(L / stride) per axis for even lengths (VideoGPT's SamePadConv3d)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, bias=True):
        super().__init__()
        kernel_size, stride = _triple(kernel_size), _triple(stride)
        self.padding = _same_padding(kernel_size, stride)
        symmetric = _symmetric_padding(self.padding)
        self.pad_input = symmetric is None
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride, bias=bias,
                              padding=symmetric or 0)

    def forward(self, x):
        """x: (B, C_in, T, H, W) -> (B, C_out, T', H', W')."""
        return self.conv(F.pad(x, self.padding) if self.pad_input else x)


class SamePadConvTranspose3d(nn.Module):
    """Transposed conv that multiplies each axis length by its stride (VideoGPT's SamePadConvTranspose3d):
    the input is pre-padded like SamePadConv3d and the transposed conv removes kernel - 1 on each side.

    A pre-padding of p zeros on both sides of an axis only moves the output by stride * p, so with symmetric
    padding the transposed conv removes kernel - 1 - stride * p instead, on the unpadded input: the same result
    without the padded copy."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, bias=True):
        super().__init__()
        kernel_size, stride = _triple(kernel_size), _triple(stride)
        self.padding = _same_padding(kernel_size, stride)
        symmetric = _symmetric_padding(self.padding)
        self.pad_input = symmetric is None
        removed_padding = (0, 0, 0) if self.pad_input else symmetric
        crop = tuple(k - 1 - s * p for k, s, p in zip(kernel_size, stride, removed_padding))
        self.conv = nn.ConvTranspose3d(in_channels, out_channels, kernel_size, stride=stride, bias=bias,
                                       padding=crop)

    def forward(self, x):
        """x: (B, C_in, T, H, W) -> (B, C_out, T * s_t, H * s_h, W * s_w)."""
        return self.conv(F.pad(x, self.padding) if self.pad_input else x)


# ---------------------------------------------------------------------------------------------------------------
# Axial attention
# ---------------------------------------------------------------------------------------------------------------

# einops patterns that fold every axis but one into the batch: (B, T, H, W, heads, d) <-> (batch', heads, L, d)
_AXIS_PATTERNS = {
    't': ('b t h w n d -> (b h w) n t d', '(b h w) n t d -> b t h w (n d)'),
    'h': ('b t h w n d -> (b t w) n h d', '(b t w) n h d -> b t h w (n d)'),
    'w': ('b t h w n d -> (b t h) n w d', '(b t h) n w d -> b t h w (n d)'),
}


class AxialAttention(nn.Module):
    """Multi-head self-attention along one axis ('t', 'h' or 'w') of a channels-last (B, T, H, W, C) tensor.

    As VideoGPT's MultiHeadAttention with axial_dim: q/k/v projections without bias, output projection with
    bias, weights initialised N(0, 1/sqrt(C)), no dropout, softmax scaled by 1/sqrt(C / heads).
    """

    def __init__(self, channels, heads, axis):
        super().__init__()
        if channels % heads:
            raise ValueError(f'attention channels {channels} must be divisible by attention_heads {heads}')
        if axis not in _AXIS_PATTERNS:
            raise ValueError(f"axis must be one of {tuple(_AXIS_PATTERNS)}, got {axis!r}")
        self.heads, self.axis = heads, axis
        self.qkv = nn.Linear(channels, 3 * channels, bias=False)   # rows: q, k, v, each (heads, head_dim)
        self.proj = nn.Linear(channels, channels)
        nn.init.normal_(self.qkv.weight, std=channels ** -0.5)
        nn.init.normal_(self.proj.weight, std=channels ** -0.5)

    def forward(self, x):
        """x: (B, T, H, W, C) -> (B, T, H, W, C)."""
        batch, frames, height, width, _ = x.shape
        q, k, v = rearrange(self.qkv(x), 'b t h w (three n d) -> three b t h w n d', three=3, n=self.heads)
        fold, unfold = _AXIS_PATTERNS[self.axis]
        q, k, v = (rearrange(y, fold) for y in (q, k, v))                      # (B', heads, L, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)                          # scale 1/sqrt(head_dim)
        out = rearrange(out, unfold, b=batch, t=frames, h=height, w=width)     # (B, T, H, W, C)
        return self.proj(out)


class AxialBlock(nn.Module):
    """Sum of three self-attentions, along T, H and W separately (VideoGPT's AxialBlock)."""

    def __init__(self, channels, heads):
        super().__init__()
        self.attentions = nn.ModuleList(AxialAttention(channels, heads, axis) for axis in ('t', 'h', 'w'))

    def forward(self, x):
        """x: (B, C, T, H, W) -> (B, C, T, H, W)."""
        x = rearrange(x, 'b c t h w -> b t h w c')
        out = sum(attention(x) for attention in self.attentions)
        return rearrange(out, 'b t h w c -> b c t h w')


class AttentionResidualBlock(nn.Module):
    """x + [BN -> ReLU -> 3^3 conv C->C/2 -> BN -> ReLU -> 1^3 conv C/2->C -> BN -> ReLU -> AxialBlock]
    (VideoGPT's AttentionResidualBlock; the convs have no bias)."""

    def __init__(self, channels, heads):
        super().__init__()
        if channels % 2:
            raise ValueError(f'hidden_channels must be even (the residual block halves it), got {channels}')
        self.block = nn.Sequential(
            nn.BatchNorm3d(channels), nn.ReLU(),
            SamePadConv3d(channels, channels // 2, 3, bias=False),
            nn.BatchNorm3d(channels // 2), nn.ReLU(),
            SamePadConv3d(channels // 2, channels, 1, bias=False),
            nn.BatchNorm3d(channels), nn.ReLU(),
            AxialBlock(channels, heads),
        )

    def forward(self, x):
        """x: (B, C, T, H, W) -> (B, C, T, H, W)."""
        return x + self.block(x)


# ---------------------------------------------------------------------------------------------------------------
# Activation checkpointing
# ---------------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _keep_batchnorm_statistics(module):
    """Restore the BatchNorm running statistics of ``module`` on exit: the recomputation of a checkpointed block
    must not count its batch a second time in the running mean and variance."""
    buffers = [buffer for m in module.modules() if isinstance(m, (nn.BatchNorm3d, nn.SyncBatchNorm))
               for buffer in m.buffers()]
    saved = [buffer.clone() for buffer in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved):
                buffer.copy_(value)


def checkpointed(function, *args, module):
    """function(*args), keeping only the arguments for the backward pass and recomputing the rest there
    (torch.utils.checkpoint, non-reentrant); ``module`` holds the BatchNorm layers whose running statistics the
    recomputation must not update a second time."""
    return checkpoint(function, *args, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _keep_batchnorm_statistics(module)))


def run_blocks(blocks, x, checkpointing):
    """Apply ``blocks`` in turn, each checkpointed when ``checkpointing`` and gradients are being recorded."""
    for block in blocks:
        x = checkpointed(block, x, module=block) if checkpointing and torch.is_grad_enabled() else block(x)
    return x
