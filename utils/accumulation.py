"""Gradient accumulation for train_2.py: one optimiser step over k micro-batches, so that the global batch is
processes x per-process micro-batch x k, and DDP synchronises the gradients once per optimiser step."""
import contextlib

import torch
from torch.nn.parallel import DistributedDataParallel


def micro_batch_size(global_batch_size, world_size, grad_accum_steps):
    """The per-process micro-batch of a global batch split over ``world_size`` processes and ``grad_accum_steps``
    accumulation steps; a ValueError naming the config keys when it does not divide."""
    if grad_accum_steps < 1:
        raise ValueError(f'grad_accum_steps must be at least 1, got {grad_accum_steps}')
    parts = world_size * grad_accum_steps
    if global_batch_size % parts:
        raise ValueError(f'global_batch_size {global_batch_size} is not divisible by {world_size} process(es) x '
                         f'grad_accum_steps {grad_accum_steps} = {parts}')
    return global_batch_size // parts


def accumulation_groups(loader, grad_accum_steps):
    """The loader's batches in lists of ``grad_accum_steps`` consecutive ones; a last, shorter list is dropped
    (as drop_last drops a short batch), so that every optimiser step sees a whole global batch."""
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == grad_accum_steps:
            yield group
            group = []


def accumulate_gradients(model, micro_batches, losses_of):
    """Backward passes over k micro-batches of b samples each, each of loss.mean() / k: the gradients of one batch
    of their k * b samples (up to float rounding). Under DDP only the last backward synchronises the gradients
    (no_sync for the others, forward included, as DDP requires).

    model: the DiT or its DistributedDataParallel wrapper.
    micro_batches: k items, each one argument tuple of ``losses_of``.
    losses_of: callable(*micro_batch) -> dict of (b,) loss terms with a 'loss' to minimise.
    Returns: dict of every term over the k * b samples, (k * b,) each, detached.
    """
    terms = {}
    for i, micro_batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        skip_sync = isinstance(model, DistributedDataParallel) and not last
        with model.no_sync() if skip_sync else contextlib.nullcontext():
            losses = losses_of(*micro_batch)
            (losses['loss'].mean() / len(micro_batches)).backward()
        for name, value in losses.items():
            terms.setdefault(name, []).append(value.detach())
    return {name: torch.cat(values) for name, values in terms.items()}
