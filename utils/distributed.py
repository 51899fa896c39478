"""torchrun-or-single-process helpers (DiT / nanoGPT style): the same script runs as `python x.py` on one
CPU or GPU and as `torchrun --nproc_per_node=N x.py` (gloo on CPU, nccl on GPU)."""
import os

import torch
import torch.distributed as dist


def default_device():
    """The first CUDA device when there is one, else the CPU: where a single process runs."""
    return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


def setup_distributed():
    """Initialise the process group when launched by torchrun. Returns (rank, world_size, device)."""
    if 'RANK' not in os.environ:
        return 0, 1, default_device()
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


def broadcast_buffers(module, src=0):
    """Copy every buffer of ``module`` (BatchNorm running statistics, ...) from rank ``src`` to all processes; a
    no-op in one process. DDP with broadcast_buffers=False and no SyncBatchNorm (the CPU case) lets each rank's
    running statistics follow its own batches, so ranks would evaluate slightly different networks."""
    if is_distributed():
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src)


def gather_rng_states(world_size):
    """Every process's CPU RNG state (random crops, condition dropout, diffusion noise), by rank, for a checkpoint;
    a collective call: every process must make it."""
    state = torch.get_rng_state()
    if world_size == 1:
        return [state]
    states = [None] * world_size
    dist.all_gather_object(states, state)
    return states


def restore_rng_state(states, rank):
    """Set this process's CPU RNG state from a checkpoint's ``states`` (by rank); a rank the saving run did not have
    (resumed on more processes) takes rank 0's."""
    torch.set_rng_state(states[rank] if rank < len(states) else states[0])


def unwrap(model):
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
