"""What the faithful OccSora models cost: step time, peak memory, throughput and MFU, in one run (DESIGN §9).

    python -m utils.benchmark [--quick] [--device cpu|cuda] [--out out/benchmark.json]

Measures, in this order: the fp32 / bf16 (and TF32 on CUDA) matmul peak; the demo models' train steps (what
`make demo` trains); the faithful tokenizer's train step (forward + tokenizer_loss + backward) per memory flag
(eager fp32, bf16 autocast, activation checkpointing, both; where bf16 matmuls are slow, the bf16 steps' memory is
counted with their matmuls, convolutions and attention run in fp32 (LiveTensorBytes, emulate_bf16), not timed); the
faithful DiT's train step at batch 2 and its MFU (eager, and torch.compile in the full run); seconds per sampled clip per sampler; step02's encoding
throughput. The full run measures the tokenizer on full-grid clips of T = 8, 16 and 32 (a clip whose memory
estimate from the smaller ones exceeds the memory available is skipped); --quick on a T = 8 clip cropped to
QUICK_CROP (as the train_crop flag trains), and it starts no measurement after QUICK_BUDGET_S seconds.

Each measurement runs in a process of its own (forked from a server that imported the models once), so that its
peak memory is its own: the increase, warm-up included, over the memory in use when its first step starts
(torch.cuda.max_memory_allocated on CUDA; the peak resident set on the CPU, reset through /proc/self/clear_refs).
The tokenizer's training memory at the paper's batch 2, T = 32 is extrapolated from them (extrapolate_memory).
The table goes to stdout; every number, with its device, dtype, shape and repeat count, to JSON.
"""
import argparse
import contextlib
import json
import math
import multiprocessing
import os
import statistics
import time
import traceback
import weakref

import numpy as np
import torch
import torch.nn.functional as F
from mmengine.config import Config
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.flop_counter import FlopCounterMode, flop_registry
from tqdm import tqdm

from dataset.constants import GRID_SHAPE
from model.diffusion import GaussianDiffusion
from model.dit import build_dit, dit_config_args
from model.losses import tokenizer_loss
from model.sampling import SCHEDULERS, sample_latents
from model.tokenizer import build_tokenizer

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER_CONFIG, DEMO_TOKENIZER_CONFIG = 'config/train_vqvae.py', 'config/demo_vqvae.py'
DIT_CONFIG, DEMO_DIT_CONFIG = 'config/train_dit.py', 'config/demo_dit.py'
DIT_BATCH = 2                     # per GPU: upstream's global batch 16 on 8 GPUs
PAPER_TOKENIZER_BATCH = 2         # the paper's VQ-VAE batch per GPU, for the memory estimate
FIT_FRAMES = (8, 16)              # the full run's clips before the faithful length: the memory fit's points
QUICK_CROP = (64, 64)             # --quick's (X, Y) window for the faithful tokenizer, as the demo's train_crop
QUICK_SAMPLERS = ('ddim',)        # --quick's samplers: every one evaluates the network once per step
QUICK_BUDGET_S = 100              # with start-up and report, --quick stays within 2 minutes
LONG_STEP_S = 20.0                # a first step this long is the measurement: no warm-up, no repeats
TRAJ_CHANNELS = 2                 # (x, y) per frame: the default 'traj_xy' condition
USUAL_SAMPLING_STEPS = (1000, 250, 50, 25)   # upstream DDPM, DiT's DDPM, DDIM, DPM-Solver++
BF16_MIN_RELATIVE_SPEED = 0.5     # below half the fp32 matmul speed, bf16 autocast can only slow a step down
GPU_REFERENCE_BYTES = 24 * 2 ** 30           # the question: does a 24 GB card suffice?
MEMORY_HEADROOM_BYTES = 2 * 2 ** 30         # left free for everything else on the machine
GRADIENT_BYTES_PER_PARAM = 4      # fp32 gradients, allocated inside every measured step
STATE_BYTES_PER_PARAM = 16        # fp32 weights and gradients and the two AdamW moments, held in training
# Imported by the fork server. Not this module: run as `python -m utils.benchmark`, every child executes it as
# its main module, which runpy warns about when it is imported already.
PRELOADED_MODULES = ['model.diffusion', 'model.dit', 'model.losses', 'model.sampling', 'model.tokenizer',
                     'mmengine.config']

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


def _synchronize(device):
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
                _synchronize(device)
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


def _proc_bytes(path, field):
    """A 'Field: <n> kB' line of a /proc file, in bytes."""
    with open(path) as lines:
        return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(field + ':'))


def _memory(device, peak=False):
    """Bytes in use now, or at the peak since the last _reset_peak: CUDA allocations, or the CPU resident set."""
    if device.type == 'cuda':
        return (torch.cuda.max_memory_allocated if peak else torch.cuda.memory_allocated)(device)
    return _proc_bytes('/proc/self/status', 'VmHWM' if peak else 'VmRSS')


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
    peak_increase_bytes, memory_method, warmup, repeats[, tensor_peak_increase_bytes])."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f'need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}')
    tensors = LiveTensorBytes(emulate_bf16) if count_tensors and device.type == 'cpu' else None
    _synchronize(device)
    in_use, method = _memory(device), _reset_peak(device)
    timings = []
    with tensors or contextlib.nullcontext():
        for i in range(warmup + repeats):
            tic = time.perf_counter()
            step()
            _synchronize(device)
            timings.append(time.perf_counter() - tic)
            if i == 0 and timings[0] > long_step_s:
                warmup, repeats = 0, 1
                break
    timings = timings[warmup:]
    record = {'seconds': statistics.median(timings), 'seconds_min': min(timings), 'seconds_all': timings,
              'in_use_bytes': in_use, 'peak_increase_bytes': max(_memory(device, peak=True) - in_use, 0),
              'memory_method': method, 'warmup': warmup, 'repeats': repeats}
    return record if tensors is None else {**record, 'tensor_peak_increase_bytes': tensors.peak}


def step_peak(record):
    """The peak increase comparable to a GPU's: live tensor bytes where tracked, else the measured peak."""
    return record.get('tensor_peak_increase_bytes', record['peak_increase_bytes'])


# ---------------------------------------------------------------------------------------------------------------
# Measurements (each returns a JSON-ready dict)
# ---------------------------------------------------------------------------------------------------------------

def tokenizer_step(model_cfg, num_frames, loss_cfg=None, grid_shape=GRID_SHAPE, batch_size=1, bf16=False,
                   checkpointing=False, train=True, device='cpu', warmup=1, repeats=3, seed=0, emulate_bf16=False):
    """train=True: one stage-1 train step as train_1.py takes it, without the optimiser (forward, bf16 autocast
    optional, + tokenizer_loss + backward). train=False: step02's tokenizer.encode (eval mode, no gradients),
    with clips_per_second. On a (batch_size, num_frames, *grid_shape) clip of uniformly random class ids (every
    class present: Lovasz-softmax's worst case). emulate_bf16 (CPU): count the bf16 step's tensors with its
    matmuls, convolutions and attention run in fp32 (LiveTensorBytes); its time and resident set are then not
    those of the bf16 step."""
    device = torch.device(device)
    torch.manual_seed(seed)
    model = build_tokenizer({**model_cfg, 'activation_checkpointing': checkpointing}).to(device).train(train)
    occupancy = torch.randint(0, model.num_classes, (batch_size, num_frames, *grid_shape), device=device)

    def train_step():
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            logits, vq_loss, _ = model(occupancy)
        loss, _ = tokenizer_loss(logits, occupancy, vq_loss, **(loss_cfg or {}))
        del logits                                 # as train_1.py: the backward pass does not need them
        loss.backward()
        model.zero_grad(set_to_none=True)          # no gradient is held between steps: it counts in the step peak

    def encode_step():
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            model.encode(occupancy)

    record = {'device': str(device), 'dtype': 'bf16 autocast' if bf16 else 'fp32', 'activation_checkpointing':
              checkpointing, 'shape': list(occupancy.shape), 'parameters': sum(p.numel() for p in model.parameters()),
              **time_steps(train_step if train else encode_step, device, warmup, repeats, count_tensors=True,
                           emulate_bf16=emulate_bf16),
              **({'bf16_emulated': True} if emulate_bf16 else {})}
    return record if train else {**record, 'clips_per_second': batch_size / record['seconds']}


def dit_flops_per_step(name, latent_shape, cond_shape, batch_size, overrides=None):
    """FLOPs of one DiT forward + backward, counted on the meta device (no compute; the diffusion loss and AdamW
    are element-wise and count 0)."""
    with torch.device('meta'):
        model = build_dit(name, latent_shape, cond_shape, **(overrides or {})).train()
        x, traj = torch.randn(batch_size, *latent_shape), torch.randn(batch_size, *cond_shape)
        t = torch.zeros(batch_size, dtype=torch.long)
    return count_flops(lambda: model(x, t, traj).sum().backward())


def attention_kernel(batch_size, heads, tokens, head_dim, device='cpu', warmup=1, repeats=2):
    """One self-attention call alone, forward + backward (F.scaled_dot_product_attention, as the DiT's blocks), on
    random (batch_size, heads, tokens, head_dim) q, k, v -> dict(seconds, flops, gflops)."""
    device = torch.device(device)
    q, k, v = (torch.randn(batch_size, heads, tokens, head_dim, device=device, requires_grad=True) for _ in range(3))

    def step():
        F.scaled_dot_product_attention(q, k, v).sum().backward()

    seconds = time_steps(step, device, warmup, repeats)['seconds']
    flops = count_flops(step)
    return {'shape': [batch_size, heads, tokens, head_dim], 'seconds': seconds, 'flops': flops,
            'gflops': flops / seconds / 1e9}


def mfu_bound(attention_share, attention_gflops, peak_gflops):
    """The MFU a step reaches when its attention runs at ``attention_gflops``, its other FLOPs at the peak and its
    element-wise ops take no time: the most a faster rest of the step could give with this attention kernel."""
    return 1.0 / (attention_share * peak_gflops / attention_gflops + 1.0 - attention_share)


def dit_train_step(name, latent_shape, cond_shape, batch_size=DIT_BATCH, overrides=None, lr=1e-5, peak_gflops=None,
                   allow_tf32=False, compile=False, device='cpu', warmup=1, repeats=3, seed=0):
    """One stage-2 train step as train_2.py takes it (EMA update left out): GaussianDiffusion.training_losses on
    random latents, steps and trajectories + backward + AdamW. With ``peak_gflops`` adds MFU = achieved FLOP/s
    / peak, and the attention kernel's share of the FLOPs, its own FLOP/s (attention_kernel) and mfu_bound.
    compile: torch.compile the DiT in place, as train_2.py's compile flag; the first step, which compiles, is run
    and timed before the measured ones (compile_seconds)."""
    device = torch.device(device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allow_tf32   # train_2 sets both
    torch.manual_seed(seed)
    model = build_dit(name, latent_shape, cond_shape, **(overrides or {})).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    diffusion = GaussianDiffusion()
    x, traj = torch.randn(batch_size, *latent_shape, device=device), torch.randn(batch_size, *cond_shape, device=device)
    t = torch.randint(0, diffusion.num_timesteps, (batch_size,), device=device)

    def step():
        diffusion.training_losses(model, x, t, model_kwargs={'traj': traj})['loss'].mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    record = {'model': name, 'device': str(device), 'dtype': 'tf32' if allow_tf32 else 'fp32',
              'shape': [batch_size, *latent_shape], 'parameters': sum(p.numel() for p in model.parameters())}
    if compile:
        model.compile()
        record['compile_seconds'] = time_steps(step, device, warmup=0, repeats=1)['seconds']
    record.update(time_steps(step, device, warmup, repeats))
    flops = dit_flops_per_step(name, latent_shape, cond_shape, batch_size, overrides)
    record.update(flops_per_step=flops, achieved_gflops=flops / record['seconds'] / 1e9)
    if peak_gflops:
        block = model.blocks[0].attn
        attention = attention_kernel(batch_size, block.num_heads, model.pos_embed.shape[1], block.head_dim, device)
        share = len(model.blocks) * attention['flops'] / flops
        record.update(peak_gflops=peak_gflops, mfu=record['achieved_gflops'] / peak_gflops, attention=attention,
                      attention_flop_share=share, mfu_bound=mfu_bound(share, attention['gflops'], peak_gflops))
    return record


def sampling_cost(name, latent_shape, cond_shape, num_steps=3, samplers=SCHEDULERS, overrides=None, device='cpu',
                  seed=0):
    """Seconds to sample one clip with each sampler at ``num_steps`` (model.sampling.sample_latents, one
    trajectory, no guidance: CFG doubles the batch), per step and scaled to USUAL_SAMPLING_STEPS."""
    device = torch.device(device)
    torch.manual_seed(seed)
    model = build_dit(name, latent_shape, cond_shape, **(overrides or {})).to(device).eval()
    traj = torch.randn(1, *cond_shape, device=device)
    record = {'model': name, 'device': str(device), 'dtype': 'fp32', 'shape': [1, *latent_shape],
              'num_steps': num_steps, 'samplers': {}}
    for sampler in samplers:
        tic = time.perf_counter()
        sample_latents(lambda x, t: model(x, t, traj), (1, *latent_shape), sampler, num_steps,
                       generator=torch.Generator(device).manual_seed(seed), device=device, progress=False)
        _synchronize(device)
        per_step = (time.perf_counter() - tic) / num_steps
        record['samplers'][sampler] = {'seconds_per_step': per_step,
                                       'seconds_per_clip': {str(n): per_step * n for n in USUAL_SAMPLING_STEPS}}
    return record


# ---------------------------------------------------------------------------------------------------------------
# Memory extrapolation
# ---------------------------------------------------------------------------------------------------------------

def extrapolate_memory(points, voxels, parameters):
    """A tokenizer's training memory for a batch of ``voxels`` = B * T * X * Y * Z voxels, from measured steps.

    points: [(voxels, peak_increase_bytes)] of train steps without optimiser of a ``parameters``-parameter model.
    A step's increase is its activations plus its fp32 gradients (GRADIENT_BYTES_PER_PARAM). Activations grow
    linearly in the voxels: a + b * voxels, least squares over two or more sizes, or in proportion to one (a = 0,
    an upper bound when scaling up). Training also holds weights, gradients and AdamW's two moments
    (STATE_BYTES_PER_PARAM). Returns dict(activation_bytes, total_bytes, intercept_bytes, bytes_per_voxel,
    points, voxels, method)."""
    if not points:
        raise ValueError('extrapolate_memory needs at least one (voxels, bytes) measurement')
    sizes = np.array([p[0] for p in points], dtype=np.float64)
    activations = np.array([p[1] for p in points], dtype=np.float64) - GRADIENT_BYTES_PER_PARAM * parameters
    if len(set(sizes.tolist())) >= 2:
        slope, intercept = np.polyfit(sizes, activations, 1)
        method = f'least squares a + b * voxels over {len(points)} measured steps'
    else:
        slope, intercept = activations[0] / sizes[0], 0.0
        method = 'in proportion to the voxels of one measured step (an upper bound)'
    predicted = float(intercept + slope * voxels)
    return {'activation_bytes': predicted, 'total_bytes': predicted + STATE_BYTES_PER_PARAM * parameters,
            'intercept_bytes': float(intercept), 'bytes_per_voxel': float(slope),
            'points': [list(p) for p in points], 'voxels': voxels,
            'method': f'activations (step peak - {GRADIENT_BYTES_PER_PARAM} B/param of gradients) {method}, + '
                      f'{STATE_BYTES_PER_PARAM} B/param for weights, gradients and AdamW moments'}


def _same_flags(records, dtype, checkpointing):
    return [r for r in records if 'seconds' in r and (r['dtype'], r['activation_checkpointing']) == (dtype,
                                                                                                     checkpointing)]


def _full_grid(records):
    """The measured records of full-grid clips: on a crop, the weights' gradients at the end of the backward pass,
    not the activations, set the peak, so a crop's peak does not scale with the voxels."""
    return [r for r in records if 'seconds' in r and tuple(r['shape'][2:]) == GRID_SHAPE]


def tokenizer_memory_estimates(records, batch_size, num_frames, grid_shape=GRID_SHAPE):
    """extrapolate_memory to a (batch_size, num_frames, *grid_shape) batch for each (dtype, checkpointing)
    combination measured on full-grid clips."""
    estimates, records = [], _full_grid(records)
    for dtype, checkpointing in sorted({(r['dtype'], r['activation_checkpointing']) for r in records}):
        same = _same_flags(records, dtype, checkpointing)
        estimate = extrapolate_memory([(math.prod(r['shape']), step_peak(r)) for r in same],
                                      math.prod((batch_size, num_frames, *grid_shape)), same[0]['parameters'])
        estimates.append({'dtype': dtype, 'activation_checkpointing': checkpointing, 'batch_size': batch_size,
                          'num_frames': num_frames, **estimate, 'fits': estimate['total_bytes'] <= GPU_REFERENCE_BYTES})
    return estimates


# ---------------------------------------------------------------------------------------------------------------
# Isolation: one process per measurement
# ---------------------------------------------------------------------------------------------------------------

def _isolated_worker(connection, function, kwargs):
    try:
        result = ('ok', function(**kwargs))
    except torch.OutOfMemoryError as error:
        result = ('ok', {'skipped': f'out of memory: {str(error).splitlines()[0]}'})
    except Exception:
        result = ('error', traceback.format_exc())
    connection.send(result)
    connection.close()


def run_isolated(function, timeout=None, **kwargs):
    """function(**kwargs) in a process of its own, forked from a server that preloaded PRELOADED_MODULES (a
    fresh interpreter spends seconds importing torch, timm and diffusers); it starts with no CUDA context and no
    OpenMP threads of this process.

    Returns the function's dict, or {'skipped': why} when it runs past ``timeout`` seconds, runs out of CUDA
    memory or dies (e.g. killed for memory). Any other exception is raised here with the child's traceback."""
    if 'forkserver' in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context('forkserver')
        context.set_forkserver_preload(PRELOADED_MODULES)
    else:
        context = multiprocessing.get_context('spawn')
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_isolated_worker, args=(sender, function, kwargs), daemon=True)
    process.start()
    sender.close()
    try:
        status, value = receiver.recv() if receiver.poll(timeout) else (
            'timeout', f'did not finish within the time left ({timeout:.0f} s)')
    except EOFError:
        status, value = 'died', None
    finally:
        receiver.close()
    process.join(timeout=10 if status == 'ok' else 0)            # a child that has answered is exiting
    if process.is_alive():
        process.kill()
        process.join()
    if status == 'error':
        raise RuntimeError(f'{function.__name__}({kwargs}) failed in its subprocess:\n{value}')
    if status == 'died':
        return {'skipped': f'its process died with exit code {process.exitcode} (killed for memory?)'}
    return {'skipped': value} if status == 'timeout' else value


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------

def _config(path):
    return Config.fromfile(os.path.join(REPO_ROOT, path))


def _dit_overrides(dit_cfg):
    """build_dit's keyword arguments besides name and shapes, as train_2.py takes them from the stage-2 config."""
    args = dit_config_args(dit_cfg)
    del args['name']
    return args


def _latent_shape(model_cfg, num_frames):
    with torch.device('meta'):                                  # the real method, no weights allocated
        return build_tokenizer(model_cfg).latent_shape(num_frames)


def machine_info(device):
    """Device name and memory, torch version, threads and the load average (noisy neighbours skew timings)."""
    device = torch.device(device)
    if device.type == 'cuda':
        name, memory = torch.cuda.get_device_name(device), torch.cuda.get_device_properties(device).total_memory
    else:
        with open('/proc/cpuinfo') as cpuinfo:
            name = next((line.split(':', 1)[1].strip() for line in cpuinfo if line.startswith('model name')), 'CPU')
        memory = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    return {'device': str(device), 'name': name, 'memory_bytes': memory, 'torch': torch.__version__,
            'threads': torch.get_num_threads(), 'cuda_available': torch.cuda.is_available(),
            'load_average_start': os.getloadavg()[0]}


def benchmark_plan(device, quick, fp32_peak, tf32_peak=None):
    """[(section, label, function, kwargs)] in running order: the cheap and the headline numbers first, for
    --quick's time budget. The faithful tokenizer with every (bf16, checkpointing) combination (run_benchmark
    emulates bf16 on CPUs where bf16 matmuls are slow). --quick: one step per measurement, the tokenizer at T = 8 on a
    QUICK_CROP window, QUICK_SAMPLERS; the full run: 1 warm-up + 3 steps (LONG_STEP_S), full-grid clips of
    FIT_FRAMES and the faithful length, every sampler."""
    timing = dict(device=device, warmup=0, repeats=1) if quick else dict(device=device, warmup=1, repeats=3)
    faithful, demo, dit, demo_dit = map(_config, (TOKENIZER_CONFIG, DEMO_TOKENIZER_CONFIG, DIT_CONFIG,
                                                  DEMO_DIT_CONFIG))
    faithful_model, demo_model = faithful.model.to_dict(), demo.model.to_dict()
    dit_shapes = dict(latent_shape=_latent_shape(faithful_model, faithful.num_frames),
                      cond_shape=(faithful.num_frames, TRAJ_CHANNELS))
    on_cuda = torch.device(device).type == 'cuda'          # train_2 runs its matmuls in TF32 there
    dit_peak = dict(peak_gflops=tf32_peak if on_cuda else fp32_peak, allow_tf32=on_cuda)
    clips = [(FIT_FRAMES[0], QUICK_CROP)] if quick else [(f, GRID_SHAPE[:2]) for f in (*FIT_FRAMES,
                                                                                       faithful.num_frames)]
    flags = [(False, False), (True, False), (False, True), (True, True)]          # (bf16, checkpointing)

    def tokenizer_steps(frames, crop):
        where = '' if tuple(crop) == GRID_SHAPE[:2] else f', {crop[0]} x {crop[1]} crop'
        return [('tokenizer_train_step', f'faithful tokenizer, T = {frames}{where}', tokenizer_step,
                 dict(model_cfg=faithful_model, num_frames=frames, loss_cfg=faithful.loss.to_dict(),
                      grid_shape=(*crop, GRID_SHAPE[2]), bf16=bf16, checkpointing=checkpointing, **timing))
                for bf16, checkpointing in flags]

    return [
        ('demo', f'demo tokenizer ({DEMO_TOKENIZER_CONFIG})', tokenizer_step,
         dict(model_cfg=demo_model, num_frames=demo.num_frames, loss_cfg=demo.loss.to_dict(),
              grid_shape=(*(demo.train_crop or GRID_SHAPE[:2]), GRID_SHAPE[2]),     # train_1 trains on crops
              batch_size=demo.batch_size, bf16=demo.bf16, **timing)),
        ('demo', f'{demo_dit.model} ({DEMO_DIT_CONFIG})', dit_train_step,
         dict(name=demo_dit.model, latent_shape=_latent_shape(demo_model, demo.num_frames),
              cond_shape=(demo.num_frames, TRAJ_CHANNELS), batch_size=demo_dit.global_batch_size, lr=demo_dit.lr,
              overrides=_dit_overrides(demo_dit), **dit_peak, **timing)),
        *tokenizer_steps(*clips[0]),
        *[('dit_train_step', f'{dit.model}, batch {DIT_BATCH}' + (', torch.compile' if compile else ''),
           dit_train_step, dict(name=dit.model, batch_size=DIT_BATCH, lr=dit.lr, overrides=_dit_overrides(dit),
                                compile=compile, **dit_peak, **dit_shapes, **timing))
          for compile in ((False,) if quick else (False, True))],
        ('encoding', f'tokenizer.encode, T = {clips[-1][0]}', tokenizer_step,
         dict(model_cfg=faithful_model, num_frames=clips[-1][0], train=False, **timing)),
        ('sampling', f'{dit.model}, 1 clip', sampling_cost,
         dict(name=dit.model, num_steps=1 if quick else 3, samplers=QUICK_SAMPLERS if quick else SCHEDULERS,
              overrides=_dit_overrides(dit), device=device, **dit_shapes)),
        *[step for clip in clips[1:] for step in tokenizer_steps(*clip)],
    ]


def _expected(kwargs):
    """What a planned measurement measures: device, dtype, shape (kept when it is skipped)."""
    if 'model_cfg' in kwargs:
        shape = [kwargs.get('batch_size', 1), kwargs['num_frames'], *kwargs.get('grid_shape', GRID_SHAPE)]
    else:
        shape = [kwargs.get('batch_size', 1), *kwargs['latent_shape']]
    return {'device': kwargs['device'], 'dtype': 'bf16 autocast' if kwargs.get('bf16') else 'fp32', 'shape': shape,
            **({'activation_checkpointing': kwargs['checkpointing']} if 'checkpointing' in kwargs else {})}


def skip_reason(section, kwargs, results, bf16_fast, device):
    """Why a planned measurement is not run (bf16 without fast bf16 matmuls, unless emulated; a memory estimate
    from the smaller clips over the memory available), or None."""
    if kwargs.get('bf16') and not bf16_fast and not kwargs.get('emulate_bf16'):
        return 'bf16 matmuls are not fast on this device (see matmul peak): autocast could only slow the step down'
    if section != 'tokenizer_train_step':
        return None
    expected = _expected(kwargs)
    same = _same_flags(results.get(section, []), expected['dtype'], expected['activation_checkpointing'])
    if not same:
        return None
    parameters = same[0]['parameters']
    estimate = extrapolate_memory([(math.prod(r['shape']), r['peak_increase_bytes']) for r in same],
                                  math.prod(expected['shape']), parameters)
    need = max(r['in_use_bytes'] for r in same) + estimate['activation_bytes'] + GRADIENT_BYTES_PER_PARAM * parameters
    if torch.device(device).type == 'cuda':
        available = torch.cuda.get_device_properties(device).total_memory
    else:
        available = _proc_bytes('/proc/meminfo', 'MemAvailable') - MEMORY_HEADROOM_BYTES
    if need > available:
        return f'estimated {_gib(need)} GiB (from the smaller clips) exceeds the {_gib(available)} GiB available'
    return None


def target_checks(results):
    """The issue's targets, each dict(target, value, met), where the run measured what they need."""
    checks = [{'target': f"DiT train step MFU >= 50 % of the measured matmul peak ({r['label']})",
               'value': f"{100 * r['mfu']:.1f} %", 'met': r['mfu'] >= 0.5}
              for r in results.get('dit_train_step', []) if 'mfu' in r]
    steps = _full_grid(results.get('tokenizer_train_step', []))
    for eager in _same_flags(steps, 'fp32', False):
        lean = [r for r in steps if r['shape'] == eager['shape'] and r['activation_checkpointing']]
        for record in sorted(lean, key=lambda r: r['dtype'] == 'fp32')[:1]:      # with bf16 where measured
            ratio = step_peak(record) / step_peak(eager)
            checks.append({'target': f"tokenizer step peak, checkpointing + {record['dtype']} <= 50 % of eager fp32 "
                                     f"({'x'.join(map(str, eager['shape']))})",
                           'value': f"{_gib(step_peak(record))} / {_gib(step_peak(eager))} "
                                    f"GiB = {100 * ratio:.0f} %", 'met': ratio <= 0.5})
    for e in results.get('tokenizer_memory_estimate', []):
        flags = e['dtype'] + (' + checkpointing' if e['activation_checkpointing'] else '')
        checks.append({'target': f"faithful tokenizer training, batch {e['batch_size']}, T = {e['num_frames']}, {flags}"
                                 f" < {_gib(GPU_REFERENCE_BYTES)} GiB (estimate)",
                       'value': f"{_gib(e['total_bytes'])} GiB", 'met': e['fits']})
    return checks


def run_benchmark(device='cpu', quick=False, budget_s=None):
    """Every measurement of the module docstring -> JSON-ready results. ``budget_s``: no measurement starts
    after that many seconds, and a running one is stopped when they are up."""
    start = time.monotonic()

    def time_left():
        return None if budget_s is None else max(budget_s - (time.monotonic() - start), 0.0)

    results = {'machine': machine_info(device), 'settings': {'quick': quick, 'budget_s': budget_s}}
    peaks = run_isolated(matmul_peaks, timeout=time_left(), device=device, repeats=2 if quick else 3,
                         max_size=8192 if torch.device(device).type == 'cuda' else 4096)
    results['matmul_peak'] = peaks.get('peaks', [peaks])
    gflops = {peak['dtype']: peak['gflops'] for peak in results['matmul_peak'] if 'gflops' in peak}
    bf16_fast = gflops.get('bfloat16', 0.0) >= BF16_MIN_RELATIVE_SPEED * gflops.get('float32', math.inf)

    plan = benchmark_plan(device, quick, gflops.get('float32'), gflops.get('tf32'))
    for section, label, function, kwargs in tqdm(plan, desc='benchmark', unit='measurement'):
        if kwargs.get('bf16') and not bf16_fast and function is tokenizer_step and torch.device(device).type == 'cpu':
            kwargs = dict(kwargs, emulate_bf16=True)          # its memory, without a bf16 kernel (LiveTensorBytes)
        reason = skip_reason(section, kwargs, results, bf16_fast, device)
        if reason is None and time_left() == 0:
            reason = f'the time budget of {budget_s:.0f} s is spent'
        record = {'skipped': reason} if reason else run_isolated(function, timeout=time_left(), **kwargs)
        results.setdefault(section, []).append({'label': label, **_expected(kwargs), **record})

    results['tokenizer_memory_estimate'] = tokenizer_memory_estimates(
        results.get('tokenizer_train_step', []), PAPER_TOKENIZER_BATCH, _config(TOKENIZER_CONFIG).num_frames)
    results['targets'] = target_checks(results)
    results['machine']['load_average_end'] = os.getloadavg()[0]
    results['seconds_total'] = time.monotonic() - start
    return results


# ---------------------------------------------------------------------------------------------------------------
# Report and command line
# ---------------------------------------------------------------------------------------------------------------

STEP_SECTIONS = {'demo': 'demo train steps (what `make demo` trains)',
                 'tokenizer_train_step': 'faithful tokenizer train step: forward + tokenizer_loss + backward',
                 'dit_train_step': 'faithful DiT train step: training_losses + backward + AdamW',
                 'encoding': 'step02 encoding: tokenizer.encode, eval, no gradients'}


def _gib(num_bytes):
    return f'{num_bytes / 2 ** 30:.2f}'


def _step_row(record):
    """The table cells of one measured or skipped step record."""
    head = [record['label'], record['dtype'], 'yes' if record.get('activation_checkpointing') else '',
            'x'.join(map(str, record['shape']))]
    if 'skipped' in record:
        return head + ['-'] * 5 + ['skipped: ' + record['skipped']]
    notes = [f"{record['achieved_gflops']:.1f} GFLOP/s, MFU {100 * record['mfu']:.1f} %; attention "
             f"{100 * record['attention_flop_share']:.0f} % of the FLOPs at {record['attention']['gflops']:.1f} "
             f"GFLOP/s: MFU <= {100 * record['mfu_bound']:.1f} %"] if 'mfu' in record else []
    notes += [f"{record['clips_per_second']:.3f} clips/s"] if 'clips_per_second' in record else []
    notes += [f"first step (compiling) {record['compile_seconds']:.1f} s"] if 'compile_seconds' in record else []
    tensors = record.get('tensor_peak_increase_bytes')
    if record.get('bf16_emulated'):            # its time and resident set are those of the fp32 kernels
        return head + ['-', '-', '-', _gib(tensors), f"{record['warmup']}+{record['repeats']}",
                       'bf16 kernels emulated in fp32: memory only']
    return head + [f"{record['seconds']:.3f}", f"{record['seconds_min']:.3f}", _gib(record['peak_increase_bytes']),
                   '-' if tensors is None else _gib(tensors), f"{record['warmup']}+{record['repeats']}",
                   ', '.join(notes)]


def _aligned(rows):
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ['  '.join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def format_table(results):
    """The human-readable report of run_benchmark's results."""
    machine = results['machine']
    lines = [f"{machine['device']}: {machine['name']}, {machine['threads']} threads, {_gib(machine['memory_bytes'])} "
             f"GiB; torch {machine['torch']}; 1-min load average {machine['load_average_start']:.2f} at start, "
             f"{machine.get('load_average_end', math.nan):.2f} at end"
             + ('' if machine['cuda_available'] else '; no GPU here: GPU memory is estimated from CPU measurements'),
             'matmul peak: ' + '; '.join(
                 f"{p['dtype']} {p['gflops']:.1f} GFLOP/s (n = {p['shape'][0]}, best of {p['repeats']})"
                 if 'gflops' in p else f"skipped: {p['skipped']}" for p in results['matmul_peak'])]
    rows, titles = [['measurement', 'dtype', 'ckpt', 'shape', 's/step', 'min s', 'peak+GiB', 'tensors+GiB', 'warm+reps',
                     'notes']], {}
    for section, title in STEP_SECTIONS.items():
        titles[len(rows)] = f'-- {title}'
        rows += [_step_row(record) for record in results.get(section, [])]
    lines += [line for i, row_line in enumerate(_aligned(rows))
              for line in ([titles[i]] if i in titles else []) + [row_line]]
    for record in results.get('sampling', []):
        if 'skipped' in record:
            lines.append(f"-- sampling ({record['label']}): skipped: {record['skipped']}")
            continue
        lines.append(f"-- sampling {record['label']} ({'x'.join(map(str, record['shape']))}), no guidance, timed over "
                     f"{record['num_steps']} step(s), seconds per clip at:")
        lines += _aligned([['sampler', 's/step'] + [f'{n} steps' for n in USUAL_SAMPLING_STEPS]] + [
            [name, f"{cost['seconds_per_step']:.3f}", *(f'{s:.1f}' for s in cost['seconds_per_clip'].values())]
            for name, cost in record['samplers'].items()])
    lines += ['-- targets'] + [f"[{'met' if c['met'] else 'NOT met'}] {c['target']}: {c['value']}"
                               for c in results.get('targets', [])]
    methods = sorted({e['method'] for e in results.get('tokenizer_memory_estimate', [])})
    lines += [f'memory estimate: {method}' for method in methods] or [
        'memory estimate: none (it needs train steps on full-grid clips: run without --quick)']
    lines += ['peak+GiB: peak memory (warm-up included) over what was in use before the first step (weights, inputs; '
              'on CPU the whole process): the peak resident set on CPU, torch.cuda.max_memory_allocated on CUDA. '
              'tensors+GiB (CPU): the peak of live tensor bytes (LiveTensorBytes), what CUDA would count; the targets '
              'and the memory estimate use it.',
              'MFU: achieved FLOP/s (FLOPs counted by torch.utils.flop_counter.FlopCounterMode) / the measured matmul '
              'peak (fp32 on CPU, TF32 on CUDA, as train_2 runs). MFU <= x: the MFU with the attention kernel as '
              'measured alone, every other FLOP at the peak and element-wise ops free (mfu_bound).',
              f"total {results['seconds_total']:.0f} s"]
    return '\n'.join(lines)


def main():
    parser = argparse.ArgumentParser(description='Benchmark the faithful OccSora models: step time, peak memory, '
                                                 'throughput and MFU; prints a table and writes JSON.')
    parser.add_argument('--quick', action='store_true',
                        help=f'one step per measurement, the tokenizer at T = {FIT_FRAMES[0]} on a {QUICK_CROP[0]} x '
                             f'{QUICK_CROP[1]} crop, no measurement started after {QUICK_BUDGET_S} s')
    parser.add_argument('--device', choices=('cpu', 'cuda'), default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--out', default='out/benchmark.json', help='JSON file for every number')
    parser.add_argument('--budget-s', type=float, default=None,
                        help=f'start no measurement after this many seconds ({QUICK_BUDGET_S} with --quick)')
    args = parser.parse_args()
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda: torch sees no CUDA device here')
    results = run_benchmark(args.device, args.quick, args.budget_s or (QUICK_BUDGET_S if args.quick else None))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:                  # first: a long run's numbers outlive any error in the report
        json.dump(results, f, indent=1)
    print(format_table(results))
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
