"""The benchmark's run: its plan (what is measured, in which order, with which configs), each measurement in a
process of its own, the checks against the performance targets."""
import math
import multiprocessing
import os
import time
import traceback

import torch
from mmengine.config import Config
from tqdm import tqdm

from dataset.constants import GRID_SHAPE
from evaluation.benchmark.measure import gib, matmul_peaks, proc_bytes, step_peak
from evaluation.benchmark.steps import (DIT_BATCH, GPU_REFERENCE_BYTES, GRADIENT_BYTES_PER_PARAM, dit_train_step,
                                        dtype_label, extrapolate_memory, full_grid, same_flags, sampling_cost,
                                        tokenizer_memory_estimates, tokenizer_step)
from model.dit import dit_config_args
from model.sampling import SCHEDULERS
from model.tokenizer import build_tokenizer

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKENIZER_CONFIG, DEMO_TOKENIZER_CONFIG = 'config/train_vqvae.py', 'config/demo_vqvae.py'
DIT_CONFIG, DEMO_DIT_CONFIG = 'config/train_dit.py', 'config/demo_dit.py'
PAPER_TOKENIZER_BATCH = 2         # the paper's VQ-VAE batch per GPU, for the memory estimate
FIT_FRAMES = (8, 16)              # the full run's clips before the faithful length: the memory fit's points
QUICK_CROP = (64, 64)             # --quick's (X, Y) window for the faithful tokenizer, as the demo's train_crop
QUICK_SAMPLERS = ('ddim',)        # --quick's samplers: every one evaluates the network once per step
QUICK_BUDGET_S = 100              # with start-up and report, --quick stays within 2 minutes
TRAJ_CHANNELS = 2                 # (x, y) per frame: the default 'traj_xy' condition
BF16_MIN_RELATIVE_SPEED = 0.5     # below half the fp32 matmul speed, bf16 autocast can only slow a step down
MEMORY_HEADROOM_BYTES = 2 * 2 ** 30         # left free for everything else on the machine
DIT_BF16_MEMORY_TARGET = 0.75     # the stage-2 issue: a bf16 DiT train step's peak at most 3/4 of the fp32 one's
SECTIONS = ('demo', 'tokenizer_train_step', 'dit_train_step', 'encoding', 'sampling')   # --only's choices
CPU_FLAGS = ('avx2', 'avx512f', 'avx512_bf16', 'amx_tile', 'amx_bf16')   # what a CPU's bf16 matmul speed rests on
# Imported once by the fork server that every measurement's process is forked from (this module imports the models)
PRELOADED_MODULES = ['evaluation.benchmark.run']


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


def cpu_flags():
    """{flag: whether /proc/cpuinfo lists it} for CPU_FLAGS: native bf16 (avx512_bf16) and AMX tiles (amx_*)."""
    with open('/proc/cpuinfo') as cpuinfo:
        listed = next((line.split(':', 1)[1].split() for line in cpuinfo if line.startswith('flags')), [])
    return {flag: flag in listed for flag in CPU_FLAGS}


def machine_info(device):
    """Device name and memory, the host CPU's bf16 flags, torch version, threads and the load average (noisy
    neighbours skew timings)."""
    device = torch.device(device)
    if device.type == 'cuda':
        name, memory = torch.cuda.get_device_name(device), torch.cuda.get_device_properties(device).total_memory
    else:
        with open('/proc/cpuinfo') as cpuinfo:
            name = next((line.split(':', 1)[1].strip() for line in cpuinfo if line.startswith('model name')), 'CPU')
        memory = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    return {'device': str(device), 'name': name, 'memory_bytes': memory, 'cpu_flags': cpu_flags(),
            'torch': torch.__version__, 'threads': torch.get_num_threads(), 'cuda_available': torch.cuda.is_available(),
            'load_average_start': os.getloadavg()[0]}


def benchmark_plan(device, quick, fp32_peak, tf32_peak=None, bf16_peak=None):
    """[(section, label, function, kwargs)] in running order: the cheap and the headline numbers first, for
    --quick's time budget. The faithful tokenizer with every (bf16, checkpointing) combination (run_benchmark
    emulates bf16 on CPUs where bf16 matmuls are slow); the faithful DiT's train step, step02's encoding and
    sampling in fp32 and bf16 autocast (the DiT also in TF32 on CUDA, and compiled in the full run, last).
    --quick: one step per measurement, the tokenizer at T = 8 on a QUICK_CROP window, QUICK_SAMPLERS; the full
    run: 1 warm-up + 3 steps (LONG_STEP_S), full-grid clips of FIT_FRAMES and the faithful length, every
    sampler. ``*_peak``: the measured matmul GFLOP/s per dtype, for the MFU."""
    timing = dict(device=device, warmup=0, repeats=1) if quick else dict(device=device, warmup=1, repeats=3)
    faithful, demo, dit, demo_dit = map(_config, (TOKENIZER_CONFIG, DEMO_TOKENIZER_CONFIG, DIT_CONFIG,
                                                  DEMO_DIT_CONFIG))
    faithful_model, demo_model = faithful.model.to_dict(), demo.model.to_dict()
    dit_shapes = dict(latent_shape=_latent_shape(faithful_model, faithful.num_frames),
                      cond_shape=(faithful.num_frames, TRAJ_CHANNELS))
    on_cuda = torch.device(device).type == 'cuda'          # train_2 runs its matmuls in TF32 there
    train_2_dtype = dict(allow_tf32=on_cuda, peak_gflops=tf32_peak if on_cuda else fp32_peak)
    dit_dtypes = [dict(peak_gflops=fp32_peak), dict(bf16=True, allow_tf32=on_cuda, peak_gflops=bf16_peak)] + (
        [train_2_dtype] if on_cuda else [])
    clips = [(FIT_FRAMES[0], QUICK_CROP)] if quick else [(f, GRID_SHAPE[:2]) for f in (*FIT_FRAMES,
                                                                                       faithful.num_frames)]
    flags = [(False, False), (True, False), (False, True), (True, True)]          # (bf16, checkpointing)
    dit_label = f'{dit.model}, batch {DIT_BATCH}'
    dit_step = dict(name=dit.model, batch_size=DIT_BATCH, lr=dit.lr, overrides=_dit_overrides(dit), **dit_shapes)

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
              overrides=_dit_overrides(demo_dit), **train_2_dtype, **timing)),
        *tokenizer_steps(*clips[0]),
        *[('dit_train_step', dit_label, dit_train_step, dict(**dit_step, **dtype, **timing)) for dtype in dit_dtypes],
        *[('encoding', f'tokenizer.encode, T = {clips[-1][0]}', tokenizer_step,
           dict(model_cfg=faithful_model, num_frames=clips[-1][0], train=False, bf16=bf16, **timing))
          for bf16 in (False, True)],
        *[('sampling', f'{dit.model}, 1 clip', sampling_cost,
           dict(name=dit.model, num_steps=1 if quick else 3, samplers=QUICK_SAMPLERS if quick else SCHEDULERS,
                overrides=_dit_overrides(dit), bf16=bf16, device=device, **dit_shapes))
          for bf16 in (False, True)],
        *([] if quick else [('dit_train_step', f'{dit_label}, torch.compile', dit_train_step,
                             dict(**dit_step, compile=True, **train_2_dtype, **timing))]),
        *[step for clip in clips[1:] for step in tokenizer_steps(*clip)],
    ]


def _expected(kwargs):
    """What a planned measurement measures: device, dtype, shape (kept when it is skipped)."""
    if 'model_cfg' in kwargs:
        shape = [kwargs.get('batch_size', 1), kwargs['num_frames'], *kwargs.get('grid_shape', GRID_SHAPE)]
    else:
        shape = [kwargs.get('batch_size', 1), *kwargs['latent_shape']]
    checkpointing = {'activation_checkpointing': kwargs['checkpointing']} if 'checkpointing' in kwargs else {}
    return {'device': kwargs['device'], 'dtype': dtype_label(kwargs.get('bf16'), kwargs.get('allow_tf32')),
            'shape': shape, **checkpointing}


def skip_reason(section, kwargs, results, bf16_fast, device):
    """Why a planned measurement is not run (bf16 without fast bf16 matmuls, unless emulated; a memory estimate
    from the smaller clips over the memory available), or None."""
    if kwargs.get('bf16') and not bf16_fast and not kwargs.get('emulate_bf16'):
        return 'bf16 matmuls are not fast on this device (see matmul peak): autocast could only slow the step down'
    if section != 'tokenizer_train_step':
        return None
    expected = _expected(kwargs)
    same = same_flags(results.get(section, []), expected['dtype'], expected['activation_checkpointing'])
    if not same:
        return None
    parameters = same[0]['parameters']
    estimate = extrapolate_memory([(math.prod(r['shape']), r['peak_increase_bytes']) for r in same],
                                  math.prod(expected['shape']), parameters)
    need = max(r['in_use_bytes'] for r in same) + estimate['activation_bytes'] + GRADIENT_BYTES_PER_PARAM * parameters
    if torch.device(device).type == 'cuda':
        available = torch.cuda.get_device_properties(device).total_memory
    else:
        available = proc_bytes('/proc/meminfo', 'MemAvailable') - MEMORY_HEADROOM_BYTES
    if need > available:
        return f'estimated {gib(need)} GiB (from the smaller clips) exceeds the {gib(available)} GiB available'
    return None


def _dit_memory_checks(records):
    """The bf16 autocast DiT train step's peak (step_peak) against the fp32 one's of the same shape, eager."""
    eager = [r for r in records if 'seconds' in r and 'compile_seconds' not in r]
    checks = []
    for fp32 in (r for r in eager if r['dtype'] == 'fp32'):
        for bf16 in (r for r in eager if r['dtype'] == 'bf16 autocast' and r['shape'] == fp32['shape']):
            ratio = step_peak(bf16) / step_peak(fp32)
            resident = (f" (peak RSS increase {gib(bf16['peak_increase_bytes'])} / "
                        f"{gib(fp32['peak_increase_bytes'])} GiB)" if 'tensor_peak_increase_bytes' in fp32 else '')
            checks.append({'target': f"DiT train step peak, bf16 autocast <= {100 * DIT_BF16_MEMORY_TARGET:.0f} % of "
                                     f"fp32 ({fp32['label']})",
                           'value': f"{gib(step_peak(bf16))} / {gib(step_peak(fp32))} GiB = {100 * ratio:.0f} %"
                                    + resident, 'met': ratio <= DIT_BF16_MEMORY_TARGET})
    return checks


def target_checks(results):
    """The issue's targets, each dict(target, value, met), where the run measured what they need."""
    checks = [{'target': f"DiT train step MFU >= 50 % of the measured {r['dtype']} matmul peak ({r['label']})",
               'value': f"{100 * r['mfu']:.1f} %", 'met': r['mfu'] >= 0.5}
              for r in results.get('dit_train_step', []) if 'mfu' in r]
    checks += _dit_memory_checks(results.get('dit_train_step', []))
    steps = full_grid(results.get('tokenizer_train_step', []))
    for eager in same_flags(steps, 'fp32', False):
        lean = [r for r in steps if r['shape'] == eager['shape'] and r['activation_checkpointing']]
        for record in sorted(lean, key=lambda r: r['dtype'] == 'fp32')[:1]:      # with bf16 where measured
            ratio = step_peak(record) / step_peak(eager)
            checks.append({'target': f"tokenizer step peak, checkpointing + {record['dtype']} <= 50 % of eager fp32 "
                                     f"({'x'.join(map(str, eager['shape']))})",
                           'value': f"{gib(step_peak(record))} / {gib(step_peak(eager))} "
                                    f"GiB = {100 * ratio:.0f} %", 'met': ratio <= 0.5})
    for e in results.get('tokenizer_memory_estimate', []):
        flags = e['dtype'] + (' + checkpointing' if e['activation_checkpointing'] else '')
        checks.append({'target': f"faithful tokenizer training, batch {e['batch_size']}, T = {e['num_frames']}, {flags}"
                                 f" < {gib(GPU_REFERENCE_BYTES)} GiB (estimate)",
                       'value': f"{gib(e['total_bytes'])} GiB", 'met': e['fits']})
    return checks


def run_benchmark(device='cpu', quick=False, budget_s=None, sections=SECTIONS):
    """Every measurement of the module docstring -> JSON-ready results. ``budget_s``: no measurement starts
    after that many seconds, and a running one is stopped when they are up. ``sections``: the plan's sections to
    run (the matmul peaks are always measured)."""
    start = time.monotonic()

    def time_left():
        return None if budget_s is None else max(budget_s - (time.monotonic() - start), 0.0)

    results = {'machine': machine_info(device), 'settings': {'quick': quick, 'budget_s': budget_s,
                                                             'sections': list(sections)}}
    peaks = run_isolated(matmul_peaks, timeout=time_left(), device=device, repeats=2 if quick else 3,
                         max_size=8192 if torch.device(device).type == 'cuda' else 4096)
    results['matmul_peak'] = peaks.get('peaks', [peaks])
    gflops = {peak['dtype']: peak['gflops'] for peak in results['matmul_peak'] if 'gflops' in peak}
    bf16_fast = gflops.get('bfloat16', 0.0) >= BF16_MIN_RELATIVE_SPEED * gflops.get('float32', math.inf)

    plan = [planned for planned in benchmark_plan(device, quick, gflops.get('float32'), gflops.get('tf32'),
                                                  gflops.get('bfloat16')) if planned[0] in sections]
    for section, label, function, kwargs in tqdm(plan, desc='benchmark', unit='measurement'):
        if (kwargs.get('bf16') and not bf16_fast and function is tokenizer_step and kwargs.get('train', True)
                and torch.device(device).type == 'cpu'):       # train steps: encoding throughput has no emulation
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
