"""bf16 autocast for the forward passes of train_2.py, sample.py and step02.py: torch.autocast with bfloat16 on the
device's type (CUDA or CPU). Only the forward passes run under it; weights, gradients, optimiser state, EMA and the
diffusion tables stay fp32, so checkpoints are fp32 whichever precision wrote or reads them. Off, nothing changes:
the same fp32 code path as without the flag."""
import contextlib

import torch

PRECISIONS = ('fp32', 'bf16')     # the choices of the scripts' --precision flags


def bf16_autocast(device, enabled=True):
    """torch.autocast(device type, bfloat16) when ``enabled``, else a context that does nothing.

    device: a torch.device or its name ('cuda', 'cuda:1', 'cpu')."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def autocast_forward(model, device, enabled):
    """``model`` itself when not ``enabled``; else model(*args, **kwargs) run under bf16 autocast, its output
    returned in fp32 so that the losses, guidance and sampler arithmetic after it stay fp32.

    model: any callable returning one tensor, e.g. the DiT (or its DDP wrapper) or a sampler's model_fn(x, t)."""
    if not enabled:
        return model

    def forward(*args, **kwargs):
        with bf16_autocast(device):
            return model(*args, **kwargs).float()
    return forward


def check_bf16_training(device, latent_frames, data_path):
    """Refuse bf16 training of the DiT on a CPU on latents of T' = 2 (``latent_frames``) from ``data_path``: in torch
    2.14 (oneDNN 3.12) the CPU bf16 weight gradient of a padded, 3-wide Conv3d over a time depth of 2 (the DiT's
    token embedding there) is garbage, NaN or 1e30-sized, while depths 1 and 3-8 and fp32 are right
    (docs/performance.md)."""
    if torch.device(device).type == 'cpu' and latent_frames == 2:
        raise ValueError(f'bf16=True cannot train on a CPU on the tokens in {data_path}: their T\' = 2 hits a torch '
                         'bug (garbage bf16 Conv3d weight gradients at time depth 2); train in fp32 or on a GPU')
