"""torchrun-or-single-process helpers (DiT / nanoGPT style): the same script runs as `python x.py` on one
CPU or GPU and as `torchrun --nproc_per_node=N x.py` (gloo on CPU, nccl on GPU)."""
import os

import torch
import torch.distributed as dist


def setup_distributed():
    """Initialise the process group when launched by torchrun. Returns (rank, world_size, device)."""
    if 'RANK' not in os.environ:
        return 0, 1, torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    backend = 'nccl' if torch.cuda.is_available() else 'gloo'
    local_rank = int(os.environ['LOCAL_RANK'])
    if backend == 'nccl':
        torch.cuda.set_device(local_rank)
        device = torch.device('cuda', local_rank)
    else:
        device = torch.device('cpu')
    dist.init_process_group(backend, device_id=device if backend == 'nccl' else None)
    return dist.get_rank(), dist.get_world_size(), device


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def cleanup_distributed():
    if is_distributed():
        dist.destroy_process_group()


def all_reduce_mean(value, device):
    """Mean of a Python float over all processes (the float itself when not distributed)."""
    if not is_distributed():
        return float(value)
    tensor = torch.tensor(float(value), device=device, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.item() / dist.get_world_size()


def unwrap(model):
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
