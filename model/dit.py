"""The trajectory-conditioned diffusion transformer of OccSora's stage 2 (upstream's `models.py`).

A DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers", 2023) with adaLN-Zero blocks, adapted the
way upstream OccSora adapted it: the latent clip (C, T', H', W') is embedded by two 3x3x3 convolutions into one
token per latent cell (T-major order; with ``patch_size`` p > 1, not upstream, one per p x p cells), a trainable
position table starts as a 1-D sin/cos table, and the conditioning vector is the timestep embedding plus an MLP
embedding of the ego trajectory. The network predicts eps || v, where v sets the learned-range variance (Nichol &
Dhariwal 2021).

Unlike upstream: any batch size and latent size, and classifier-free guidance that works. With
``class_dropout_prob > 0`` the model owns a learned null trajectory embedding that replaces the trajectory of
randomly dropped samples during training and serves the unconditional branch at sampling time.

Known-prefix conditioning (``known_prefix=True``; off = upstream's network and parameter count): some latent time
steps of the clip may be known (forecasting from past frames, rollouts). The network then takes C + 1 extra input
channels: the known clean latents (zero at unknown steps) and a 0/1 mask channel (1 at known steps), concatenated
to x_t before the token embedding. Training draws a known prefix per sample (``draw_prefix_lengths``); sampling
holds the known steps of x_t at their clean values (model/sampling.py).

Trajectory map (``trajectory_map=True``; off = upstream): the trajectory also enters every token, as MAP_CHANNELS
extra input channels that say where each latent cell lies in the first frame's coordinates (model/trajectory_map.py).
Dropped and unconditional samples get an all-zero map, so guidance contrasts the map too.

Static warp (``static_warp='hard'`` or ``'gated'``; off = upstream): the output's clean latents are composed along
the trajectory, each latent step after the first taking the step before moved by the ego motion where it is in view
(as it is, or mixed by a learned gate that lets moving things and new space through); known steps enter as their
known latents, so a forecast starts from the warped copy of its context. Dropped and unconditional samples are left
as predicted.

Presets (``DIT_MODELS``): 'DiT-XL/2' is what upstream trains under that name (width 256, 36,819,200 parameters
at T = 32, not the 1152-wide DiT-XL); the real DiT widths are 'DiT-S', 'DiT-B', 'DiT-L', 'DiT-XL'.
"""
import math
from functools import partial

import torch
from einops import rearrange
from timm.models.vision_transformer import Attention, Mlp
from torch import nn

from model.diffusion import GaussianDiffusion
from model.trajectory_map import MAP_CHANNELS, chain_static_warp, trajectory_map

STATIC_WARPS = (False, 'gated', 'hard')
STATIC_WARP_GATE_BIAS = 4.0     # static_warp's gate starts at sigmoid(4) = 0.98: the moved step before wins
TIMESTEP_FREQUENCIES = 256      # width of the sinusoidal timestep features (DiT)
TRAJ_HIDDEN = 128               # hidden width of upstream's trajectory MLP
MAX_PERIOD = 10000              # longest wavelength of both sinusoidal tables


#################################################################################
#                                   Embedders                                   #
#################################################################################

def sincos_table(positions, dim):
    """1-D sin/cos table: row p is [sin(p w_0), ..., sin(p w_{dim/2-1}), cos(p w_0), ..., cos(p w_{dim/2-1})]
    with w_i = MAX_PERIOD^(-i / (dim/2)), computed in float64.

    positions: (N,) -> (N, dim) float64
    """
    half = dim // 2
    frequencies = MAX_PERIOD ** (-torch.arange(half, dtype=torch.float64) / half)      # (dim/2,)
    angles = positions.to(torch.float64)[:, None] * frequencies[None]                   # (N, dim/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class TimestepEmbedder(nn.Module):
    """Diffusion step -> vector: sinusoidal features ([cos, sin] halves) -> Linear -> SiLU -> Linear.

    t: (B,) integer or fractional steps -> (B, hidden_size)
    """

    def __init__(self, hidden_size, num_frequencies=TIMESTEP_FREQUENCIES):
        super().__init__()
        self.num_frequencies = num_frequencies
        self.mlp = nn.Sequential(nn.Linear(num_frequencies, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def features(self, t):
        """Sinusoidal features of t: (B,) -> (B, num_frequencies) float32."""
        half = self.num_frequencies // 2
        frequencies = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, dtype=torch.float32, device=t.device)
                                / half)                                                  # (F/2,)
        angles = t.float()[:, None] * frequencies[None]                                  # (B, F/2)
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)

    def forward(self, t):
        return self.mlp(self.features(t).to(self.mlp[0].weight.dtype))


class TrajectoryEmbedder(nn.Module):
    """Upstream's trajectory MLP: flattened condition -> Linear 128 -> ReLU -> Linear 128 -> ReLU -> Linear hidden.

    traj: (B, T, cond_channels) -> (B, hidden_size)
    """

    def __init__(self, cond_shape, hidden_size, traj_hidden=TRAJ_HIDDEN):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(math.prod(cond_shape), traj_hidden), nn.ReLU(),
            nn.Linear(traj_hidden, traj_hidden), nn.ReLU(),
            nn.Linear(traj_hidden, hidden_size))

    def forward(self, traj):
        return self.mlp(traj.flatten(1))                                                 # (B, T * cond_channels)


def modulate(x, shift, scale):
    """Adaptive LayerNorm modulation: x (B, N, D), shift and scale (B, D) -> (B, N, D)."""
    return x * (1 + scale[:, None]) + shift[:, None]


#################################################################################
#                                 DiT block                                     #
#################################################################################

class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning: c gives shift, scale and gate of both sub-layers.

    x: (B, N, D), c: (B, D) -> (B, N, D)
    """

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)          # fused SDPA
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=partial(nn.GELU, approximate='tanh'))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) -> LayerNorm -> Linear to the per-token output channels.

    x: (B, N, D), c: (B, D) -> (B, N, out_channels)
    """

    def __init__(self, hidden_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


#################################################################################
#                                  The model                                    #
#################################################################################

class DiT(nn.Module):
    """Trajectory-conditioned DiT over 4-D latents.

    Args:
        latent_shape: (C, T', H', W') of one latent clip, e.g. (128, 4, 25, 25).
        cond_shape: (T, cond_channels) of one trajectory, e.g. (32, 2).
        hidden_size, depth, num_heads, mlp_ratio: transformer width, number of blocks, heads, MLP expansion.
        class_dropout_prob: probability that a training sample's trajectory is replaced by the learned null
            embedding ``null_traj`` (hidden_size,). 0 = upstream: no null embedding, no guidance possible.
        known_prefix: take known latent time steps as C + 1 extra input channels (module docstring); False =
            upstream's C input channels.
        patch_size: one token per patch_size x patch_size latent cells in (H', W'); 1 = upstream (one token per
            cell). The first embedding convolution strides by it and the output layer predicts every cell of the
            patch, so the token count, and the cost of everything after that convolution, shrinks by patch_size^2.
        trajectory_map: also take the trajectory as a per-cell map (model/trajectory_map.py: where each latent cell
            lies in the first frame's coordinates), MAP_CHANNELS more input channels; needs the (T, 2) traj_xy
            condition. False = upstream (the trajectory enters through adaLN only).
        traj_scale: metres per unit of the condition the DiT is given (meta.json's conditions.scale.traj_xy).
        static_warp: compose the predicted clip along the trajectory (model/trajectory_map.py chain_static_warp):
            each latent step after the first is the step before moved by the ego motion where that is in view,
            'hard': taken as it is there (a static world), 'gated': mixed with the step's own prediction by a
            learned per-cell gate (one more output channel). Needs the traj_xy condition and ``schedule``, the
            training diffusion's keyword arguments (its prediction type says how outputs map to clean latents).
            False = upstream.
    """

    def __init__(self, latent_shape, cond_shape, hidden_size, depth, num_heads, mlp_ratio=4.0,
                 class_dropout_prob=0.1, known_prefix=False, patch_size=1, trajectory_map=False, traj_scale=1.0,
                 static_warp=False, schedule=None):
        super().__init__()
        latent_shape, cond_shape = tuple(int(n) for n in latent_shape), tuple(int(n) for n in cond_shape)
        if len(latent_shape) != 4 or min(latent_shape) < 1:
            raise ValueError(f'latent_shape must be (C, T\', H\', W\') of positive sizes, got {latent_shape}')
        if len(cond_shape) != 2 or min(cond_shape) < 1:
            raise ValueError(f'cond_shape must be (T, cond_channels) of positive sizes, got {cond_shape}')
        if hidden_size % 2 or hidden_size % num_heads:
            raise ValueError(f'hidden_size {hidden_size} must be even and divisible by num_heads {num_heads}')
        if not 0.0 <= class_dropout_prob <= 1.0:
            raise ValueError(f'class_dropout_prob must lie in [0, 1], got {class_dropout_prob}')
        latent_channels, frames, height, width = latent_shape
        if patch_size < 1 or height % patch_size or width % patch_size:
            raise ValueError(f'patch_size {patch_size} must be >= 1 and divide the latent H\' x W\' = {height} x '
                             f'{width}')
        self.latent_shape, self.cond_shape, self.patch_size = latent_shape, cond_shape, int(patch_size)
        self.class_dropout_prob, self.known_prefix = class_dropout_prob, bool(known_prefix)
        self.trajectory_map, self.traj_scale = bool(trajectory_map), float(traj_scale)
        if static_warp not in STATIC_WARPS:
            raise ValueError(f'static_warp must be one of {STATIC_WARPS}, got {static_warp!r}')
        self.static_warp = static_warp
        if (self.trajectory_map or self.static_warp) and cond_shape[1] != 2:
            raise ValueError(f'trajectory_map and static_warp need the (T, 2) traj_xy condition, got cond_shape '
                             f'{cond_shape}')
        if self.static_warp and (frames < 2 or cond_shape[0] % frames):
            raise ValueError(f'static_warp needs T\' >= 2 latent steps that divide the {cond_shape[0]} trajectory '
                             f'frames, got T\' = {frames}')
        # the diffusion whose prediction type static_warp converts to clean latents and back (its float64 tables
        # live on the CPU, also when the network is built on another device)
        with torch.device('cpu'):
            self.diffusion = GaussianDiffusion(**(schedule or {})) if self.static_warp else None
        # x_t, then (known_prefix only) the known latents and the mask channel, then (trajectory_map) the map
        in_channels = 2 * latent_channels + 1 if self.known_prefix else latent_channels
        in_channels += MAP_CHANNELS if self.trajectory_map else 0

        # upstream's "patch embedding": two 3^3 convolutions with no activation in between (the first strides by
        # patch_size in H', W', so both run at the token resolution; upstream: 1). A padded 3-wide kernel strided by
        # 3 or more would skip latent cells, so from patch_size 3 on the first one covers each patch exactly instead.
        spatial_kernel, spatial_padding = (3, 1) if patch_size <= 2 else (patch_size, 0)
        self.token_embed = nn.Sequential(
            nn.Conv3d(in_channels, hidden_size, kernel_size=(3, spatial_kernel, spatial_kernel),
                      padding=(1, spatial_padding, spatial_padding), stride=(1, patch_size, patch_size)),
            nn.Conv3d(hidden_size, hidden_size, kernel_size=3, padding=1))
        num_tokens = frames * (height // patch_size) * (width // patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, hidden_size))                # trainable
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.traj_embedder = TrajectoryEmbedder(cond_shape, hidden_size)
        if class_dropout_prob > 0:
            self.null_traj = nn.Parameter(torch.zeros(hidden_size))
        else:
            self.register_parameter('null_traj', None)        # faithful parameter count
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        # eps || variance value (|| static_warp's gate logit) of every cell of the patch
        self.output_channels = 2 * latent_channels + (1 if self.static_warp == 'gated' else 0)
        self.final_layer = FinalLayer(hidden_size, patch_size * patch_size * self.output_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """DiT's initialisation: xavier-uniform Linear layers, sin/cos positions, N(0, 0.02) timestep MLP,
        zero adaLN modulations and output layer (so every block starts as the identity and the output as 0).
        The convolutions keep PyTorch's default initialisation, as upstream."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        # upstream numbers the token positions from 1, not 0
        positions = torch.arange(1, self.pos_embed.shape[1] + 1)
        self.pos_embed.data.copy_(sincos_table(positions, self.pos_embed.shape[2])[None])
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.null_traj is not None:
            nn.init.normal_(self.null_traj, std=0.02)       # as DiT's label-embedding table
        for layer in [block.adaLN_modulation[-1] for block in self.blocks] + [
                self.final_layer.adaLN_modulation[-1], self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def condition_embedding(self, traj, batch_size, force_drop=None):
        """Trajectory embedding, or the null embedding for unconditional / dropped samples, and which samples
        were dropped.

        traj: (B, T, cond_channels) or None; force_drop: (B,) bool or None ->
            (embedding (B, hidden_size), drop (B,) bool: True where the null embedding stands)
        """
        if self.null_traj is None and (traj is None or force_drop is not None):
            raise ValueError('this DiT was built with class_dropout_prob=0 and has no null trajectory embedding: '
                             'pass a trajectory (traj of shape (B, T, cond_channels)) and no force_drop')
        if traj is None:
            return (self.null_traj[None].expand(batch_size, -1),
                    torch.ones(batch_size, dtype=torch.bool, device=self.null_traj.device))
        if tuple(traj.shape) != (batch_size, *self.cond_shape):
            raise ValueError(f'traj must have shape (B, T, cond_channels) = {(batch_size, *self.cond_shape)}, '
                             f'got {tuple(traj.shape)}')
        embedding = self.traj_embedder(traj.to(self.pos_embed.dtype))                   # (B, D)
        if force_drop is not None:
            if tuple(force_drop.shape) != (batch_size,):
                raise ValueError(f'force_drop must be a bool tensor of shape ({batch_size},), '
                                 f'got {tuple(force_drop.shape)}')
            drop = force_drop.to(device=embedding.device, dtype=torch.bool)
        elif self.training and self.class_dropout_prob > 0:
            drop = torch.rand(batch_size, device=embedding.device) < self.class_dropout_prob
        else:
            return embedding, torch.zeros(batch_size, dtype=torch.bool, device=embedding.device)
        # torch.where keeps null_traj in the graph even when no sample is dropped (DDP needs every gradient)
        return torch.where(drop[:, None], self.null_traj[None].to(embedding.dtype), embedding), drop

    def condition_map(self, traj, drop, like):
        """The per-cell trajectory map (model/trajectory_map.py) of ``traj`` in the DiT's condition units (times
        ``traj_scale`` = metres), zero for dropped samples and without a trajectory.

        traj: (B, T, 2) or None; drop: (B,) bool; like: x (B, C, T', H', W') -> (B, MAP_CHANNELS, T', H', W')
        """
        if traj is None:
            return like.new_zeros(like.shape[0], MAP_CHANNELS, *like.shape[2:])
        maps = trajectory_map(traj.float() * self.traj_scale, self.latent_shape).to(like.dtype)
        return torch.where(drop[:, None, None, None, None], torch.zeros_like(maps), maps)

    def network_input(self, x, known=None, known_mask=None):
        """x alone, or (known_prefix) x || known latents zeroed at unknown steps || mask channel.

        x, known: (B, C, T', H', W'); known_mask: (B, T') bool, True = that latent time step is known. Without
        known and known_mask nothing is known. -> (B, C, ...) or (B, 2C + 1, T', H', W')
        """
        if not self.known_prefix:
            if known is not None or known_mask is not None:
                raise ValueError('known / known_mask given, but this DiT was built with known_prefix=False: it has no '
                                 'input channels for known latents (train with known_prefix.enabled=True)')
            return x
        if (known is None) != (known_mask is None):
            raise ValueError('give both known (B, C, T\', H\', W\') latents and known_mask (B, T\') bool, or neither')
        batch_size, frames = x.shape[0], self.latent_shape[1]
        if known is None:
            known = torch.zeros_like(x)
            known_mask = torch.zeros(batch_size, frames, dtype=torch.bool, device=x.device)
        if known.shape != x.shape:
            raise ValueError(f'known must have the shape of x {tuple(x.shape)}, got {tuple(known.shape)}')
        if known_mask.dtype != torch.bool or tuple(known_mask.shape) != (batch_size, frames):
            raise ValueError(f'known_mask must be a bool tensor of shape (B, T\') = ({batch_size}, {frames}), got '
                             f'{tuple(known_mask.shape)} {known_mask.dtype}')
        mask = known_mask.to(x.dtype)[:, None, :, None, None].expand(-1, 1, -1, *x.shape[3:])  # (B, 1, T', H', W')
        return torch.cat([x, known.to(x.dtype) * mask, mask], dim=1)                          # (B, 2C + 1, ...)

    def forward(self, x, t, traj=None, force_drop=None, known=None, known_mask=None):
        """Predict eps || v for a batch of noisy latents.

        Args:
            x: (B, C, T', H', W') noisy latents.
            t: (B,) diffusion steps.
            traj: (B, T, cond_channels) trajectories, or None for the unconditional (null) embedding.
            force_drop: optional (B,) bool; True replaces that sample's trajectory by the null embedding.
            known: optional (B, C, T', H', W') clean latents, read only at the steps known_mask marks (known_prefix).
            known_mask: optional (B, T') bool, True = that latent time step is known (known_prefix).
        Returns:
            (B, 2C, T', H', W'): channels [0, C) the noise prediction, [C, 2C) the variance value v in [-1, 1].
        """
        if x.ndim != 5 or tuple(x.shape[1:]) != self.latent_shape:
            raise ValueError(f'x must have shape (B, *latent_shape) = (B, {", ".join(map(str, self.latent_shape))}), '
                             f'got {tuple(x.shape)}')
        if tuple(t.shape) != (x.shape[0],):
            raise ValueError(f't must have shape (B,) = ({x.shape[0]},), got {tuple(t.shape)}')
        _, frames, height, width = self.latent_shape
        p = self.patch_size
        embedding, drop = self.condition_embedding(traj, x.shape[0], force_drop)        # (B, D), (B,)
        inputs = self.network_input(x, known, known_mask)                                # (B, C_in, T', H', W')
        if self.trajectory_map:
            inputs = torch.cat([inputs, self.condition_map(traj, drop, x)], dim=1)
        tokens = self.token_embed(inputs)                                                # (B, D, T', H'/p, W'/p)
        tokens = rearrange(tokens, 'b d t h w -> b (t h w) d') + self.pos_embed          # (B, N, D), T-major
        c = self.t_embedder(t) + embedding                                               # (B, D)
        for block in self.blocks:
            tokens = block(tokens, c)
        out = self.final_layer(tokens, c)                                                # (B, N, p * p * C_out)
        out = rearrange(out, 'b (t h w) (p q c) -> b c t (h p) (w q)', t=frames, h=height // p, w=width // p,
                        p=p, q=p)                                                        # (B, C_out, T', H', W')
        if self.static_warp:
            out = self.compose_static_warp(out, x, t, traj, drop, known, known_mask)
        return out

    def compose_static_warp(self, out, x, t, traj, drop, known, known_mask):
        """static_warp: the prediction re-expressed after composing its clean latents along the trajectory
        (model/trajectory_map.py chain_static_warp; known steps enter as their known latents), unchanged for
        dropped samples and without a trajectory.

        out: (B, 2C (+ 1), T', H', W') prediction || variance value (|| gate logit) -> (B, 2C, T', H', W')
        """
        latent_channels = self.latent_shape[0]
        prediction, variance = out[:, :latent_channels], out[:, latent_channels:2 * latent_channels]
        if traj is None:
            return torch.cat([prediction, variance], dim=1)
        x0 = self.diffusion.predicted_x0(prediction, x, t)
        if known_mask is not None:
            x0 = torch.where(known_mask[:, None, :, None, None], known.to(x0.dtype), x0)
        if self.static_warp == 'gated':
            gate = torch.sigmoid(out[:, 2 * latent_channels:] + STATIC_WARP_GATE_BIAS)      # (B, 1, T', H', W')
        else:                                                                                 # 'hard'
            gate = torch.ones_like(x0[:, :1])
        composed = chain_static_warp(x0, traj.float() * self.traj_scale, gate)
        warped_prediction = self.diffusion.prediction_from_x0(composed, x, t)
        prediction = torch.where(drop[:, None, None, None, None], prediction, warped_prediction)
        return torch.cat([prediction, variance], dim=1)

    def forward_with_cfg(self, x, t, traj, cfg_scale, known=None, known_mask=None):
        """Classifier-free guidance (Ho & Salimans 2022) in one batched forward of the conditional and the null
        branch: eps = eps_null + cfg_scale * (eps_cond - eps_null) on all C latent channels; the variance half
        is the conditional branch's, unchanged. Both branches see the same known latents: guidance contrasts
        the trajectory only.

        x: (B, C, T', H', W'), t: (B,), traj: (B, T, cond_channels) or None (then the plain unconditional
        output: there is nothing to contrast); known, known_mask as in ``forward`` -> (B, 2C, T', H', W')
        """
        if self.null_traj is None:
            raise ValueError('forward_with_cfg needs a null trajectory embedding, but this DiT was built with '
                             'class_dropout_prob=0 (upstream setting): there is nothing to guide with')
        if traj is None:
            return self.forward(x, t, None, known=known, known_mask=known_mask)
        batch_size = x.shape[0]
        drop = torch.arange(2 * batch_size, device=x.device) >= batch_size              # second half: null
        if known is not None and known_mask is not None:
            known, known_mask = torch.cat([known, known]), torch.cat([known_mask, known_mask])
        out = self.forward(torch.cat([x, x]), torch.cat([t, t]), torch.cat([traj, traj]), force_drop=drop,
                           known=known, known_mask=known_mask)
        cond, null = out.chunk(2)                                                        # (B, 2C, ...) each
        latent_channels = self.latent_shape[0]
        eps_cond, eps_null = cond[:, :latent_channels], null[:, :latent_channels]
        eps = eps_null + cfg_scale * (eps_cond - eps_null)
        return torch.cat([eps, cond[:, latent_channels:]], dim=1)


#################################################################################
#                          Known-prefix conditioning                            #
#################################################################################

def prefix_mask(prefix_lengths, latent_frames):
    """Known-step mask of per-sample prefixes: prefix_lengths (B,) int -> (B, latent_frames) bool, True for the
    first prefix_lengths[b] latent time steps of sample b."""
    steps = torch.arange(latent_frames, device=prefix_lengths.device)
    return steps[None] < prefix_lengths[:, None]


def draw_prefix_lengths(batch_size, latent_frames, prob, device='cpu'):
    """Training prefixes, one per sample: 0 (plain generation) with probability 1 - prob, else uniform in
    [1, latent_frames - 1] (at least one step stays unknown, so every sample has a loss). Draws from the global
    torch RNG, so a resumed run repeats them. -> (B,) int64"""
    if latent_frames < 2:
        raise ValueError(f'a known prefix needs at least 2 latent time steps, the latent has {latent_frames}: '
                         'with one step there is nothing left to forecast')
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f'known_prefix prob must lie in [0, 1], got {prob}')
    has_prefix = torch.rand(batch_size, device=device) < prob
    lengths = torch.randint(1, latent_frames, (batch_size,), device=device)
    return torch.where(has_prefix, lengths, torch.zeros_like(lengths))


#################################################################################
#                                   Presets                                     #
#################################################################################

DIT_MODELS = {
    # what upstream trains as "DiT-XL/2": width 256, the patch size plays no role (one token per latent cell)
    'DiT-XL/2': dict(hidden_size=256, depth=28, num_heads=16, mlp_ratio=4.0),
    # the real DiT widths (Peebles & Xie, Table 1), same tokenisation
    'DiT-S': dict(hidden_size=384, depth=12, num_heads=6, mlp_ratio=4.0),
    'DiT-B': dict(hidden_size=768, depth=12, num_heads=12, mlp_ratio=4.0),
    'DiT-L': dict(hidden_size=1024, depth=24, num_heads=16, mlp_ratio=4.0),
    'DiT-XL': dict(hidden_size=1152, depth=28, num_heads=16, mlp_ratio=4.0),
    # small enough for the CPU demo
    'DiT-demo': dict(hidden_size=128, depth=4, num_heads=4, mlp_ratio=4.0),
}


def dit_config_args(cfg, traj_scale=1.0):
    """The build_dit keyword arguments that a stage-2 config sets (all but the shapes, which come from the token
    dir): preset name, condition dropout, known-prefix flag, the trajectory map and static warp (with
    ``traj_scale``, metres per condition unit, from meta.json, and the diffusion schedule; only when a flag is on)
    and model_overrides."""
    args = {'name': cfg.model, 'class_dropout_prob': cfg.class_dropout_prob,
            'known_prefix': bool(cfg.known_prefix.enabled), **cfg.model_overrides}
    if cfg.get('trajectory_map', False) or cfg.get('static_warp', False):
        args['traj_scale'] = float(traj_scale)
    if cfg.get('trajectory_map', False):
        args['trajectory_map'] = True
    if cfg.get('static_warp', False):
        args.update(static_warp=cfg.static_warp, schedule=dict(cfg.diffusion))
    return args


def build_dit(name, latent_shape, cond_shape, class_dropout_prob=0.1, known_prefix=False, **overrides):
    """Build the preset ``name`` of DIT_MODELS; ``overrides`` replace preset keys (hidden_size, depth, ...).

    latent_shape: (C, T', H', W'); cond_shape: (T, cond_channels); known_prefix: see DiT.
    """
    if name not in DIT_MODELS:
        raise ValueError(f'unknown DiT model {name!r}; choose one of {sorted(DIT_MODELS)}')
    return DiT(latent_shape, cond_shape, class_dropout_prob=class_dropout_prob, known_prefix=known_prefix,
               **{**DIT_MODELS[name], **overrides})
