"""Stage-2 data: the token files written by step02.py and the one place latents are scaled for the DiT.

A token dir holds meta.json, codebook_vectors.npy and {train,val}/<scene>_<start>.npz (see step02.py). The DiT
trains on continuous latents rebuilt from the indices through the codebook table (or read as they are, from a
tokenizer with continuous latents: meta.json's latent_type 'continuous'), standardised per channel
with the train-split statistics in meta.json ('standardize', default) or multiplied by 0.1 as upstream did
('upstream', as upstream's `train_2.py` divides by 10).
"""
import glob
import json
import os

import numpy as np
import torch
from torch.utils.data import Dataset

UPSTREAM_LATENT_SCALE = 0.1       # upstream train_2.py: x = x / 10
LATENT_SCALINGS = ('standardize', 'upstream')


def load_meta(token_dir):
    """meta.json of a token dir, with a clear error when the dir is not one."""
    path = os.path.join(token_dir, 'meta.json')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path} not found: --data-path must be a token dir written by step02.py')
    with open(path) as f:
        return json.load(f)


class LatentCodec:
    """Maps tokens (codebook indices, or continuous latents) to the DiT's input space and DiT outputs back to
    tokenizer latents.

    to_model:   tokens, indices (B, T', H', W') int or latents (B, C, T', H', W') float -> x (B, C, T', H', W'),
                scaled
    from_model: x (B, C, T', H', W') scaled -> z (B, C, T', H', W') in the tokenizer's post-quant space
    """

    def __init__(self, token_dir, scaling='standardize', device='cpu'):
        if scaling not in LATENT_SCALINGS:
            raise ValueError(f'latent scaling must be one of {LATENT_SCALINGS}, got {scaling!r}')
        meta = load_meta(token_dir)
        self.discrete = meta.get('latent_type', 'discrete') == 'discrete'
        self.vectors = torch.from_numpy(np.load(os.path.join(token_dir, 'codebook_vectors.npy'))).to(device) \
            if self.discrete else None                                                                # (K, C)
        channels = meta['latent_shape'][0]
        if scaling == 'standardize':
            self.mean = torch.tensor(meta['latent_mean'], dtype=torch.float32, device=device)
            self.std = torch.tensor(meta['latent_std'], dtype=torch.float32, device=device).clamp(min=1e-6)
        else:
            self.mean = torch.zeros(channels, device=device)
            self.std = torch.full((channels,), 1 / UPSTREAM_LATENT_SCALE, device=device)

    def lookup(self, indices):
        """Post-quant latents of ``indices`` (B, T', H', W'): (B, C, T', H', W')."""
        return self.vectors[indices].permute(0, 4, 1, 2, 3)

    def to_model(self, tokens):
        latents = tokens if tokens.is_floating_point() else self.lookup(tokens)
        return (latents - self.mean.view(1, -1, 1, 1, 1)) / self.std.view(1, -1, 1, 1, 1)

    def from_model(self, x):
        return x * self.std.view(1, -1, 1, 1, 1) + self.mean.view(1, -1, 1, 1, 1)

    def nearest_indices(self, z):
        """Snap latents z (B, C, T', H', W') to the nearest codebook vector: indices (B, T', H', W')."""
        if not self.discrete:
            raise ValueError('snapping to the codebook needs a tokenizer with discrete latents; this token dir holds '
                             'continuous ones')
        flat = z.permute(0, 2, 3, 4, 1).reshape(-1, z.shape[1])                              # (N, C)
        indices = torch.cdist(flat, self.vectors).argmin(dim=1)
        return indices.view(z.shape[0], *z.shape[2:])


class TokenDataset(Dataset):
    """Items of one split of a token dir: (tokens, condition (T, 2) float32 scaled), the tokens being indices
    (T', H', W') int64, or latents (C, T', H', W') float32 for a tokenizer with continuous latents.

    The condition is divided by meta.json's `conditions.scale[condition]` for that variant (RMS over the train split for
    trajectories, 1 for the command bits), so the DiT sees numbers of order one whatever the clip length.
    """

    def __init__(self, token_dir, split='train', condition='traj_xy'):
        self.meta = load_meta(token_dir)
        if condition not in self.meta['conditions']['names']:
            raise ValueError(f"condition {condition!r} is not in {token_dir}/meta.json "
                             f"(has {self.meta['conditions']['names']})")
        self.files = sorted(glob.glob(os.path.join(token_dir, split, '*.npz')))
        if not self.files:
            raise FileNotFoundError(f'no token files in {os.path.join(token_dir, split)}')
        self.condition = condition
        self.scale = float(self.meta['conditions']['scale'][condition])

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        with np.load(self.files[index]) as clip:
            if 'latents' in clip:
                tokens = torch.from_numpy(clip['latents'].astype(np.float32))                 # (C, T', H', W')
            else:
                tokens = torch.from_numpy(clip['indices'].astype(np.int64))                   # (T', H', W')
            condition = torch.from_numpy(clip[self.condition] / self.scale).float()          # (T, 2)
        return tokens, condition
