"""The benchmark's measurements, each a JSON-ready dict: a tokenizer train or encode step, a DiT train step and its
MFU, the attention kernel alone, a sampler's cost per step; and the tokenizer's training memory extrapolated to
clips too large to measure."""
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from dataset.constants import GRID_SHAPE
from evaluation.benchmark.measure import count_flops, step_peak, synchronize, time_steps
from model.diffusion import GaussianDiffusion
from model.dit import build_dit
from model.losses import tokenizer_loss
from model.sampling import SCHEDULERS, sample_latents
from model.tokenizer import build_tokenizer
from utils.precision import autocast_forward

DIT_BATCH = 2                     # per GPU: upstream's global batch 16 on 8 GPUs
USUAL_SAMPLING_STEPS = (1000, 250, 50, 25)   # upstream DDPM, DiT's DDPM, DDIM, DPM-Solver++
GPU_REFERENCE_BYTES = 24 * 2 ** 30           # the question: does a 24 GB card suffice?
GRADIENT_BYTES_PER_PARAM = 4      # fp32 gradients, allocated inside every measured step
STATE_BYTES_PER_PARAM = 16        # fp32 weights and gradients and the two AdamW moments, held in training


# ---------------------------------------------------------------------------------------------------------------
# Measurements (each returns a JSON-ready dict)
# ---------------------------------------------------------------------------------------------------------------

def dtype_label(bf16, allow_tf32=False):
    """A record's dtype: 'bf16 autocast', 'tf32' (fp32 with TF32 matmuls, on CUDA) or 'fp32'."""
    return 'bf16 autocast' if bf16 else 'tf32' if allow_tf32 else 'fp32'


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

    record = {'device': str(device), 'dtype': dtype_label(bf16), 'activation_checkpointing':
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


def attention_kernel(batch_size, heads, tokens, head_dim, dtype=torch.float32, device='cpu', warmup=1, repeats=2):
    """One self-attention call alone, forward + backward (F.scaled_dot_product_attention, as the DiT's blocks), on
    random (batch_size, heads, tokens, head_dim) q, k, v of ``dtype`` -> dict(seconds, flops, gflops)."""
    device = torch.device(device)
    q, k, v = (torch.randn(batch_size, heads, tokens, head_dim, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))

    def step():
        F.scaled_dot_product_attention(q, k, v).sum().backward()

    seconds = time_steps(step, device, warmup, repeats)['seconds']
    flops = count_flops(step)
    return {'shape': [batch_size, heads, tokens, head_dim], 'dtype': str(dtype).removeprefix('torch.'),
            'seconds': seconds, 'flops': flops, 'gflops': flops / seconds / 1e9}


def mfu_bound(attention_share, attention_gflops, peak_gflops):
    """The MFU a step reaches when its attention runs at ``attention_gflops``, its other FLOPs at the peak and its
    element-wise ops take no time: the most a faster rest of the step could give with this attention kernel."""
    return 1.0 / (attention_share * peak_gflops / attention_gflops + 1.0 - attention_share)


def dit_train_step(name, latent_shape, cond_shape, batch_size=DIT_BATCH, overrides=None, lr=1e-5, peak_gflops=None,
                   allow_tf32=False, bf16=False, compile=False, device='cpu', warmup=1, repeats=3, seed=0):
    """One stage-2 train step as train_2.py takes it (EMA update left out): GaussianDiffusion.training_losses on
    random latents, steps and trajectories + backward + AdamW; bf16: the forward pass in bf16 autocast, as
    train_2.py's bf16 flag (fp32 weights, gradients and AdamW state). With ``peak_gflops`` (the matmul peak of the
    step's dtype) adds MFU = achieved FLOP/s / peak, and the attention kernel's share of the FLOPs, its own FLOP/s
    (attention_kernel, in bf16 with bf16) and mfu_bound. On the CPU also the live tensor peak (LiveTensorBytes,
    not with compile). compile: torch.compile the DiT in place, as train_2.py's compile flag; the first step,
    which compiles, is run and timed before the measured ones (compile_seconds)."""
    device = torch.device(device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allow_tf32   # train_2 sets both
    torch.manual_seed(seed)
    model = build_dit(name, latent_shape, cond_shape, **(overrides or {})).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    diffusion = GaussianDiffusion()
    x, traj = torch.randn(batch_size, *latent_shape, device=device), torch.randn(batch_size, *cond_shape, device=device)
    t = torch.randint(0, diffusion.num_timesteps, (batch_size,), device=device)

    forward = autocast_forward(model, device, bf16)

    def step():
        diffusion.training_losses(forward, x, t, model_kwargs={'traj': traj})['loss'].mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    record = {'model': name, 'device': str(device), 'dtype': dtype_label(bf16, allow_tf32),
              'shape': [batch_size, *latent_shape], 'parameters': sum(p.numel() for p in model.parameters())}
    if compile:
        model.compile()
        record['compile_seconds'] = time_steps(step, device, warmup=0, repeats=1)['seconds']
    record.update(time_steps(step, device, warmup, repeats, count_tensors=not compile))
    flops = dit_flops_per_step(name, latent_shape, cond_shape, batch_size, overrides)
    record.update(flops_per_step=flops, achieved_gflops=flops / record['seconds'] / 1e9)
    if peak_gflops:
        block = model.blocks[0].attn
        attention = attention_kernel(batch_size, block.num_heads, model.pos_embed.shape[1], block.head_dim,
                                     torch.bfloat16 if bf16 else torch.float32, device)
        share = len(model.blocks) * attention['flops'] / flops
        record.update(peak_gflops=peak_gflops, mfu=record['achieved_gflops'] / peak_gflops, attention=attention,
                      attention_flop_share=share, mfu_bound=mfu_bound(share, attention['gflops'], peak_gflops))
    return record


def sampling_cost(name, latent_shape, cond_shape, num_steps=3, samplers=SCHEDULERS, overrides=None, bf16=False,
                  device='cpu', seed=0):
    """Seconds to sample one clip with each sampler at ``num_steps`` (model.sampling.sample_latents, one
    trajectory, no guidance: CFG doubles the batch), per step and scaled to USUAL_SAMPLING_STEPS; bf16: the DiT's
    forward passes in bf16 autocast, as sample.py --precision bf16."""
    device = torch.device(device)
    torch.manual_seed(seed)
    model = build_dit(name, latent_shape, cond_shape, **(overrides or {})).to(device).eval()
    traj = torch.randn(1, *cond_shape, device=device)
    model_fn = autocast_forward(lambda x, t: model(x, t, traj), device, bf16)
    record = {'model': name, 'device': str(device), 'dtype': dtype_label(bf16), 'shape': [1, *latent_shape],
              'num_steps': num_steps, 'samplers': {}}
    for sampler in samplers:
        tic = time.perf_counter()
        sample_latents(model_fn, (1, *latent_shape), sampler, num_steps,
                       generator=torch.Generator(device).manual_seed(seed), device=device, progress=False)
        synchronize(device)
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


def same_flags(records, dtype, checkpointing):
    return [r for r in records if 'seconds' in r and (r['dtype'], r['activation_checkpointing']) == (dtype,
                                                                                                     checkpointing)]


def full_grid(records):
    """The measured records of full-grid clips: on a crop, the weights' gradients at the end of the backward pass,
    not the activations, set the peak, so a crop's peak does not scale with the voxels."""
    return [r for r in records if 'seconds' in r and tuple(r['shape'][2:]) == GRID_SHAPE]


def tokenizer_memory_estimates(records, batch_size, num_frames, grid_shape=GRID_SHAPE):
    """extrapolate_memory to a (batch_size, num_frames, *grid_shape) batch for each (dtype, checkpointing)
    combination measured on full-grid clips."""
    estimates, records = [], full_grid(records)
    for dtype, checkpointing in sorted({(r['dtype'], r['activation_checkpointing']) for r in records}):
        same = same_flags(records, dtype, checkpointing)
        estimate = extrapolate_memory([(math.prod(r['shape']), step_peak(r)) for r in same],
                                      math.prod((batch_size, num_frames, *grid_shape)), same[0]['parameters'])
        estimates.append({'dtype': dtype, 'activation_checkpointing': checkpointing, 'batch_size': batch_size,
                          'num_frames': num_frames, **estimate, 'fits': estimate['total_bytes'] <= GPU_REFERENCE_BYTES})
    return estimates
