"""The 4D VQ-VAE occupancy tokenizer of OccSora (stage 1), layer by layer as upstream's
`model/VAE/vae_2d_resnet.py` (wzzheng/OccSora@9f8d1f0).

A clip of semantic occupancy (B, T, X, Y, Z) is embedded through a class table, its height axis is folded into
channels (channel = z * class_embed_dim + e), and a VideoGPT 3D VQ-VAE (Yan et al. 2021) compresses the resulting
(B, Z * E, T, X, Y) volume by ``downsample`` per axis into a grid of codebook indices. The decoder mirrors the
encoder; its output is unfolded back to (B, T, X, Y, Z, E) and scored against the *same* class table (weight
tying, inherited from OccWorld), giving logits (B, T, X, Y, Z, num_classes).

Faithful default: 137,369,744 parameters; a 32 x 200 x 200 x 16 clip becomes 4 x 25 x 25 indices into 512 codes
of 128 channels. Unlike upstream, any batch size works.
"""
import inspect
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from dataset.constants import GRID_SHAPE, NUM_CLASSES
from model.layers import AttentionResidualBlock, SamePadConv3d, SamePadConvTranspose3d, checkpointed, run_blocks
from model.quantizer import GaussianLatent, VectorQuantizer

KERNEL_SIZE = 4   # of every stride-2 (transposed) conv, as VideoGPT


def downsampling_strides(downsample):
    """Per-conv (T, H, W) strides for per-axis factors ``downsample`` (powers of 2), as VideoGPT: there are
    log2(max factor) convs, each of stride 2 on the axes that still need down-sampling and 1 elsewhere.
    (8, 8, 8) -> [(2, 2, 2)] * 3; (4, 8, 8) -> [(2, 2, 2), (2, 2, 2), (1, 2, 2)]."""
    if len(downsample) != 3 or any(int(f) != f or f < 1 or (int(f) & (int(f) - 1)) for f in downsample):
        raise ValueError(f'downsample must be three powers of 2 (T, H, W factors), got {tuple(downsample)}')
    if max(downsample) < 2:
        raise ValueError(f'downsample must reduce at least one axis, got {tuple(downsample)}')
    remaining = [int(math.log2(f)) for f in downsample]
    strides = []
    for _ in range(max(remaining)):
        strides.append(tuple(2 if r > 0 else 1 for r in remaining))
        remaining = [r - 1 for r in remaining]
    return strides


class Encoder(nn.Module):
    """Class embedding with the height folded into channels, then the VideoGPT encoder: [k4 stride-2 conv + ReLU]
    per down-sampling step -> k3 conv -> residual blocks with axial attention -> BN -> ReLU.

    forward(occupancy (B, T, X, Y, Z) int64, class_table (num_classes, E)) -> (B, hidden, T', X', Y'). The class
    table is an argument because the tokenizer ties it to the decoder's classifier. With activation checkpointing
    the embedding and the down-sampling convs form one recomputed segment, so the backward pass keeps the integer
    occupancy instead of the full-resolution (B, Z * E, T, X, Y) input; each residual block is another segment.
    """

    def __init__(self, folded_channels, hidden_channels, num_res_blocks, attention_heads, downsample,
                 activation_checkpointing=False):
        super().__init__()
        self.activation_checkpointing = activation_checkpointing
        self.down = nn.ModuleList(
            SamePadConv3d(folded_channels if i == 0 else hidden_channels, hidden_channels, KERNEL_SIZE, stride)
            for i, stride in enumerate(downsampling_strides(downsample)))
        self.conv_last = SamePadConv3d(hidden_channels, hidden_channels, 3)
        self.res_blocks = nn.ModuleList(
            AttentionResidualBlock(hidden_channels, attention_heads) for _ in range(num_res_blocks))
        self.norm = nn.BatchNorm3d(hidden_channels)

    def forward(self, occupancy, class_table):
        checkpointing = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        if checkpointing:
            x = checkpointed(self.embed_and_downsample, occupancy, class_table, module=self.down)
        else:
            x = self.embed_and_downsample(occupancy, class_table)
        x = run_blocks(self.res_blocks, x, checkpointing)
        return F.relu(self.norm(x))

    def embed_and_downsample(self, occupancy, class_table):
        """(B, T, X, Y, Z) int64 -> (B, hidden, T', X', Y') before the residual blocks."""
        # (B, T, X, Y, Z, E) embedding, height folded, z major; contiguous (as F.pad's copy made it before the convs
        # padded themselves): the folded view has channels-last strides, in which oneDNN ran this full-resolution
        # conv slower. No name holds the embedding, so it is freed once copied. x: (B, Z * E, T, X, Y)
        x = rearrange(F.embedding(occupancy, class_table), 'b t x y z e -> b (z e) t x y').contiguous()
        for conv in self.down:
            x = F.relu(conv(x))
        return self.conv_last(x)


class Decoder(nn.Module):
    """VideoGPT decoder: residual blocks -> BN -> ReLU -> k4 stride-2 transposed convs with ReLU between (none after
    the last; the strides come in the encoder's order, as VideoGPT), then the (B, Z * E, T, X, Y) output unfolded to
    (B, T, X, Y, Z, E) and scored against the class table.

    forward(x (B, hidden, T', X', Y'), class_table (num_classes, E)) -> logits (B, T, X, Y, Z, num_classes). With
    activation checkpointing everything after the residual blocks is one recomputed segment, so the
    full-resolution features are not kept for the backward pass.
    """

    def __init__(self, hidden_channels, folded_channels, grid_height, num_res_blocks, attention_heads, downsample,
                 activation_checkpointing=False):
        super().__init__()
        self.activation_checkpointing, self.grid_height = activation_checkpointing, grid_height
        self.res_blocks = nn.ModuleList(
            AttentionResidualBlock(hidden_channels, attention_heads) for _ in range(num_res_blocks))
        self.norm = nn.BatchNorm3d(hidden_channels)
        strides = downsampling_strides(downsample)
        self.up = nn.ModuleList(
            SamePadConvTranspose3d(hidden_channels, folded_channels if i == len(strides) - 1 else hidden_channels,
                                   KERNEL_SIZE, stride)
            for i, stride in enumerate(strides))

    def forward(self, x, class_table):
        checkpointing = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        x = run_blocks(self.res_blocks, x, checkpointing)
        if checkpointing:
            return checkpointed(self.upsample_and_classify, x, class_table, module=self.norm)
        return self.upsample_and_classify(x, class_table)

    def upsample_and_classify(self, x, class_table):
        """(B, hidden, T', X', Y') after the residual blocks -> logits (B, T, X, Y, Z, num_classes)."""
        x = F.relu(self.norm(x))
        for i, conv in enumerate(self.up):
            x = conv(x)
            if i < len(self.up) - 1:
                x = F.relu(x)
        features = rearrange(x, 'b (z e) t x y -> b t x y z e', z=self.grid_height)   # (B, T, X, Y, Z, E)
        return torch.einsum('btxyze,ce->btxyzc', features, class_table)


class OccTokenizer(nn.Module):
    """4D VQ-VAE for semantic occupancy clips. Constructor arguments are the ``model`` keys of the stage-1 config.

    Args:
        num_classes: size of the class table (input embedding and tied output classifier).
        class_embed_dim: channels per class embedding; grid_height * class_embed_dim network input channels.
        grid_height: Z size of the occupancy grid, folded into channels.
        hidden_channels, num_res_blocks, attention_heads: width, residual blocks per encoder/decoder, heads.
        downsample: (T, H, W) down-sampling factors, powers of 2.
        latent_channels, codebook_size: the quantised latent; see VectorQuantizer for the loss weights and the
            codebook_ema / ema_decay / dead_code_threshold flags.
        latent_type: 'vq' (upstream) or 'gaussian' (flag: continuous latents with a KL term of weight kl_weight,
            see GaussianLatent; the codebook arguments are then unused and indices are None).
        activation_checkpointing: in training, keep only the inputs of three kinds of segment for the backward
            pass and recompute the rest there: embedding + down-sampling convs, each residual block, and
            up-sampling convs + classifier (the full-resolution tensors dominate the memory).
    """

    def __init__(self, num_classes=NUM_CLASSES, class_embed_dim=8, grid_height=GRID_SHAPE[2], hidden_channels=512,
                 num_res_blocks=4, attention_heads=2, downsample=(8, 8, 8), latent_channels=128, codebook_size=512,
                 codebook_weight=1.0, commitment_weight=1.0, codebook_ema=False, ema_decay=0.99,
                 dead_code_threshold=0.0, activation_checkpointing=False, latent_type='vq', kl_weight=1e-3):
        super().__init__()
        if latent_type not in ('vq', 'gaussian'):
            raise ValueError(f"latent_type must be 'vq' or 'gaussian', got {latent_type!r}")
        self.discrete = latent_type == 'vq'
        self.num_classes, self.grid_height, self.class_embed_dim = num_classes, grid_height, class_embed_dim
        self.downsample = tuple(int(f) for f in downsample)
        self.latent_channels = latent_channels
        folded_channels = grid_height * class_embed_dim

        self.class_embedding = nn.Embedding(num_classes, class_embed_dim)        # N(0, 1), tied to the classifier
        self.encoder = Encoder(folded_channels, hidden_channels, num_res_blocks, attention_heads, self.downsample,
                               activation_checkpointing)
        self.pre_vq_conv = SamePadConv3d(hidden_channels, latent_channels, 1)
        if self.discrete:
            self.quantizer = VectorQuantizer(codebook_size, latent_channels, codebook_weight, commitment_weight,
                                             ema=codebook_ema, ema_decay=ema_decay,
                                             dead_code_threshold=dead_code_threshold)
        else:
            self.quantizer = GaussianLatent(latent_channels, kl_weight)
        self.post_vq_conv = SamePadConv3d(latent_channels, hidden_channels, 1)
        self.decoder = Decoder(hidden_channels, folded_channels, grid_height, num_res_blocks, attention_heads,
                               self.downsample, activation_checkpointing)

    def latent_shape(self, num_frames, grid_size=GRID_SHAPE[:2]):
        """(C, T', H', W') of the latent of a clip of ``num_frames`` frames on an (X, Y) = ``grid_size`` grid."""
        sizes = (num_frames, *grid_size)
        for name, size, factor in zip(('T', 'X', 'Y'), sizes, self.downsample):
            if size % factor:
                raise ValueError(f'occupancy axis {name} = {size} is not a multiple of its downsample factor '
                                 f'{factor} (downsample {self.downsample}); the decoder could not restore it')
        return (self.latent_channels, *(size // factor for size, factor in zip(sizes, self.downsample)))

    def encode(self, occupancy):
        """occupancy: (B, T, X, Y, Z) integer class ids (uint8 or int64), Z = grid_height.

        Returns z_q (B, C, T', X', Y') post-quant-conv latent, indices (B, T', X', Y') int64 (None for continuous
        latents), vq_loss (scalar; the KL term for continuous latents).
        """
        self._check_occupancy(occupancy)
        x = self.encoder(occupancy.long(), self.class_embedding.weight)        # (B, hidden, T', X', Y')
        z = self.pre_vq_conv(x)                                                 # (B, C, T', X', Y')
        return self.quantizer(z)

    def decode(self, z_q):
        """z_q: (B, C, T', X', Y') post-quant-conv latent -> logits (B, T, X, Y, Z, num_classes)."""
        if z_q.dim() != 5 or z_q.shape[1] != self.latent_channels:
            raise ValueError(f'decode expects z_q of shape (B, {self.latent_channels}, T, H, W), '
                             f'got {tuple(z_q.shape)}')
        return self.decoder(self.post_vq_conv(z_q), self.class_embedding.weight)

    def decode_indices(self, indices):
        """indices: (B, T', X', Y') codebook indices -> logits (B, T, X, Y, Z, num_classes)."""
        return self.decode(self.quantizer.lookup(indices))

    def forward(self, occupancy):
        """occupancy: (B, T, X, Y, Z) integer -> (logits (B, T, X, Y, Z, num_classes), vq_loss, indices)."""
        z_q, indices, vq_loss = self.encode(occupancy)
        return self.decode(z_q), vq_loss, indices

    def _check_occupancy(self, occupancy):
        if (occupancy.dim() != 5 or occupancy.shape[-1] != self.grid_height
                or occupancy.dtype.is_floating_point or occupancy.dtype.is_complex or occupancy.dtype == torch.bool):
            raise ValueError(f'occupancy must be an integer tensor of shape (B, T, X, Y, {self.grid_height}), '
                             f'got shape {tuple(occupancy.shape)} dtype {occupancy.dtype}')
        self.latent_shape(occupancy.shape[1], occupancy.shape[2:4])
        low, high = torch.aminmax(occupancy)
        if low < 0 or high >= self.num_classes:
            raise ValueError(f'occupancy class ids must lie in [0, {self.num_classes}), got [{int(low)}, {int(high)}]')


def build_tokenizer(model_cfg):
    """OccTokenizer(**model_cfg) for a dict or mmengine ConfigDict; an unknown key is an error that names it."""
    model_cfg = dict(model_cfg)
    accepted = set(inspect.signature(OccTokenizer.__init__).parameters) - {'self'}
    unknown = sorted(set(model_cfg) - accepted)
    if unknown:
        raise TypeError(f'unknown tokenizer config key(s) {unknown}; accepted: {sorted(accepted)}')
    return OccTokenizer(**model_cfg)
