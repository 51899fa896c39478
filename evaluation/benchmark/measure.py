"""The benchmark's instruments: FLOP counts (the CPU attention kernel included), the matmul peak, step timing and
peak memory (the resident set or CUDA's allocator, and live tensor bytes, with bf16 emulated in fp32 where bf16
kernels are slow)."""
import contextlib
import math
import statistics
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.flop_counter import FlopCounterMode, flop_registry

LONG_STEP_S = 20.0                # a first step this long is the measurement: no warm-up, no repeats

aten = torch.ops.aten


# ---------------------------------------------------------------------------------------------------------------
# FLOPs, matmul peak, timing and memory
# ---------------------------------------------------------------------------------------------------------------

def _attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    """FLOPs of softmax(q k^T) v: q (..., L, D), k (..., S, D), v (..., S, Dv) -> 2 (...) L S (D + Dv)."""
    *batch, length, head_dim = query_shape
    return 2 * math.prod(batch) * length * key_shape[-2] * (head_dim + value_shape[-1])


def _attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    """Twice the forward (gradients of q, k, v and of the scores), as torch counts its CUDA attention kernels."""
    return 2 * _attention_flops(query_shape, key_shape, value_shape)


# torch's FLOP registry covers the CUDA attention kernels but not the one SDPA runs on the CPU
CPU_ATTENTION_FLOPS = {aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops,
                       aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward_flops}


def count_flops(function, *args, **kwargs):
    """FLOPs of function(*args, **kwargs) as FlopCounterMode counts them: matmuls, convolutions and attention
    (2 per multiply-add); element-wise ops count 0."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        function(*args, **kwargs)
    return counter.get_total_flops()


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def matmul_peak(dtype=torch.float32, device='cpu', max_size=4096, repeats=3, max_seconds=1.0, allow_tf32=False):
    """Best GFLOP/s of (n, n) @ (n, n) for n = 256, 512, ... up to max_size. A size is not tried when the previous
    one predicts (n^3) a product over ``max_seconds``, nor repeated when its first product takes longer: CPUs
    without native bf16 fall off a cliff. Returns dict(gflops, shape, dtype, device, repeats, allow_tf32)."""
    device = torch.device(device)
    if max_size < 256 or repeats < 1:
        raise ValueError(f'matmul_peak needs max_size >= 256 and repeats >= 1, got {max_size}, {repeats}')
    previous_tf32, torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32, allow_tf32
    best, best_size, size, seconds = 0.0, None, 256, 0.0
    try:
        while size <= max_size and (best_size is None or seconds * 8 <= max_seconds):
            a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
            timings = []
            for i in range(1 + repeats):
                tic = time.perf_counter()
                torch.mm(a, b)
                synchronize(device)
                timings.append(time.perf_counter() - tic)
                if i == 0 and timings[0] > max_seconds:
                    break                                   # too slow to repeat: its one timing stands
            seconds = min(timings[1:] or timings)
            if 2 * size ** 3 / seconds / 1e9 > best:
                best, best_size = 2 * size ** 3 / seconds / 1e9, size
            size *= 2
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous_tf32
    return {'gflops': best, 'shape': [best_size, best_size], 'dtype': str(dtype).removeprefix('torch.'),
            'device': str(device), 'repeats': repeats, 'allow_tf32': allow_tf32}


def matmul_peaks(device='cpu', max_size=4096, repeats=3):
    """matmul_peak for fp32 and bf16, plus TF32 on CUDA (what train_2.py's matmuls run in) -> {'peaks': [...]}."""
    peaks = [matmul_peak(dtype, device, max_size, repeats) for dtype in (torch.float32, torch.bfloat16)]
    if torch.device(device).type == 'cuda':
        peaks.append({**matmul_peak(torch.float32, device, max_size, repeats, allow_tf32=True), 'dtype': 'tf32'})
    return {'peaks': peaks}


def proc_bytes(path, field):
    """A 'Field: <n> kB' line of a /proc file, in bytes."""
    with open(path) as lines:
        return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(field + ':'))


def _memory(device, peak=False):
    """Bytes in use now, or at the peak since the last _reset_peak: CUDA allocations, or the CPU resident set."""
    if device.type == 'cuda':
        return (torch.cuda.max_memory_allocated if peak else torch.cuda.memory_allocated)(device)
    return proc_bytes('/proc/self/status', 'VmHWM' if peak else 'VmRSS')


def _reset_peak(device):
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
        return 'torch.cuda.max_memory_allocated'
    with open('/proc/self/clear_refs', 'w') as clear_refs:
        clear_refs.write('5')                                # "5": the peak RSS restarts from the current RSS
    return 'peak resident set (VmHWM after /proc/self/clear_refs)'


def _bf16_kernel_in_fp32(func, args, kwargs):
    """func's outputs as its kernel on bf16 inputs returns them (dtype and shape from the op's meta kernel),
    computed from the inputs upcast to fp32."""
    def to_meta(x):
        return x.to('meta') if isinstance(x, torch.Tensor) else x

    def to_fp32(x):
        return x.float() if isinstance(x, torch.Tensor) and x.dtype == torch.bfloat16 else x

    expected = func(*tree_map(to_meta, args), **tree_map(to_meta, kwargs))
    out = func(*tree_map(to_fp32, args), **tree_map(to_fp32, kwargs))
    return tree_map(lambda o, e: o.to(e.dtype) if isinstance(o, torch.Tensor) else o, out, expected)


def _is_bf16_flop_op(func, args, kwargs):
    """A matmul, convolution or attention (an op FlopCounterMode counts) with a bf16 input."""
    return ((func.overloadpacket in flop_registry or func.overloadpacket in CPU_ATTENTION_FLOPS)
            and any(isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16 for t in tree_leaves((args, kwargs))))


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of the tensor storages that ops create under it while they are alive: ``peak`` is what
    torch.cuda.max_memory_allocated would add on a GPU, without the allocator's rounding and caching. The resident
    set of a CPU process also holds the memory its allocator keeps after a free.

    emulate_bf16: run the bf16 matmuls, convolutions and attention in fp32 and round their outputs to the dtypes
    their bf16 kernels return. Every op outputs the tensors it would (the internal fp32 copies are not counted,
    like a kernel's workspace), so the count is that of the bf16 step, at fp32 speed: for CPUs whose bf16 kernels
    are too slow to run a step. Their time is not a bf16 time."""

    def __init__(self, emulate_bf16=False):
        super().__init__()
        self.emulate_bf16 = emulate_bf16
        self.current = self.peak = 0
        self._alive = set()                                  # data pointers of the storages being counted

    def _free(self, pointer, num_bytes):
        self._alive.discard(pointer)
        self.current -= num_bytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.emulate_bf16 and _is_bf16_flop_op(func, args, kwargs):
            out = _bf16_kernel_in_fp32(func, args, kwargs)
        else:
            out = func(*args, **kwargs)
        # an output on an input's storage (a view, an in-place or out= result, a detached weight) allocated nothing
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            pointer, num_bytes = storage.data_ptr(), storage.nbytes()
            if num_bytes and pointer not in self._alive and pointer not in inputs:
                self._alive.add(pointer)
                self.current += num_bytes
                self.peak = max(self.peak, self.current)
                weakref.finalize(storage, self._free, pointer, num_bytes)
        return out


def time_steps(step, device, warmup, repeats, long_step_s=LONG_STEP_S, count_tensors=False, emulate_bf16=False):
    """Run step() ``warmup`` times, then ``repeats`` timed times; the memory peak covers them all (a training
    process's one-off allocations count). A first step longer than ``long_step_s`` is the only timing: one-off
    costs are then negligible, and the full run stays short. With ``count_tensors`` on the CPU, also the peak of
    LiveTensorBytes (tensor_peak_increase_bytes), with its ``emulate_bf16``.

    Returns dict(seconds (median), seconds_min, seconds_all, in_use_bytes (before the first step),
    peak_increase_bytes, peak_bytes (the peak itself: torch.cuda.max_memory_allocated, or the CPU's peak resident
    set), memory_method, warmup, repeats[, tensor_peak_increase_bytes])."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f'need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}')
    tensors = LiveTensorBytes(emulate_bf16) if count_tensors and device.type == 'cpu' else None
    synchronize(device)
    in_use, method = _memory(device), _reset_peak(device)
    timings = []
    with tensors or contextlib.nullcontext():
        for i in range(warmup + repeats):
            tic = time.perf_counter()
            step()
            synchronize(device)
            timings.append(time.perf_counter() - tic)
            if i == 0 and timings[0] > long_step_s:
                warmup, repeats = 0, 1
                break
    timings, peak = timings[warmup:], _memory(device, peak=True)
    record = {'seconds': statistics.median(timings), 'seconds_min': min(timings), 'seconds_all': timings,
              'in_use_bytes': in_use, 'peak_increase_bytes': max(peak - in_use, 0), 'peak_bytes': peak,
              'memory_method': method, 'warmup': warmup, 'repeats': repeats}
    return record if tensors is None else {**record, 'tensor_peak_increase_bytes': tensors.peak}


def step_peak(record):
    """The peak increase comparable to a GPU's: live tensor bytes where tracked, else the measured peak."""
    return record.get('tensor_peak_increase_bytes', record['peak_increase_bytes'])


def gib(num_bytes):
    """Bytes in GiB, two decimals, for the report."""
    return f'{num_bytes / 2 ** 30:.2f}'
