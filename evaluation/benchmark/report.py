"""The benchmark's report: the JSON of a run as the text table that `python -m evaluation.benchmark` prints."""
import math

from evaluation.benchmark.measure import gib
from evaluation.benchmark.steps import USUAL_SAMPLING_STEPS

STEP_SECTIONS = {'demo': 'demo train steps (what `make demo` trains)',
                 'tokenizer_train_step': 'faithful tokenizer train step: forward + tokenizer_loss + backward',
                 'dit_train_step': 'faithful DiT train step: training_losses + backward + AdamW (fp32 weights and '
                                   'optimiser state in every dtype)',
                 'encoding': 'step02 encoding: tokenizer.encode, eval, no gradients'}


def _step_row(record):
    """The table cells of one measured or skipped step record."""
    head = [record['label'], record['dtype'], 'yes' if record.get('activation_checkpointing') else '',
            'x'.join(map(str, record['shape']))]
    if 'skipped' in record:
        return head + ['-'] * 6 + ['skipped: ' + record['skipped']]
    notes = [f"{record['achieved_gflops']:.1f} GFLOP/s, MFU {100 * record['mfu']:.1f} %; attention "
             f"{100 * record['attention_flop_share']:.0f} % of the FLOPs at {record['attention']['gflops']:.1f} "
             f"GFLOP/s: MFU <= {100 * record['mfu_bound']:.1f} %"] if 'mfu' in record else []
    notes += [f"{record['clips_per_second']:.3f} clips/s"] if 'clips_per_second' in record else []
    notes += [f"first step (compiling) {record['compile_seconds']:.1f} s"] if 'compile_seconds' in record else []
    tensors = record.get('tensor_peak_increase_bytes')
    if record.get('bf16_emulated'):            # its time and resident set are those of the fp32 kernels
        return head + ['-', '-', '-', '-', gib(tensors), f"{record['warmup']}+{record['repeats']}",
                       'bf16 kernels emulated in fp32: memory only']
    return head + [f"{record['seconds']:.3f}", f"{record['seconds_min']:.3f}", gib(record['peak_bytes']),
                   gib(record['peak_increase_bytes']), '-' if tensors is None else gib(tensors),
                   f"{record['warmup']}+{record['repeats']}", ', '.join(notes)]


def _aligned(rows):
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ['  '.join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def _cpu_flags_line(flags):
    """'CPU flags: avx2 yes, ..., amx_bf16 no (no AMX)' from machine_info's cpu_flags."""
    amx = any(value for flag, value in flags.items() if flag.startswith('amx'))
    return ('CPU flags: ' + ', '.join(f"{flag} {'yes' if value else 'no'}" for flag, value in flags.items())
            + (' (AMX)' if amx else ' (no AMX)'))


def format_table(results):
    """The human-readable report of run_benchmark's results."""
    machine = results['machine']
    lines = [f"{machine['device']}: {machine['name']}, {machine['threads']} threads, {gib(machine['memory_bytes'])} "
             f"GiB; torch {machine['torch']}; 1-min load average {machine['load_average_start']:.2f} at start, "
             f"{machine.get('load_average_end', math.nan):.2f} at end"
             + ('' if machine['cuda_available'] else '; no GPU here: GPU memory is estimated from CPU measurements'),
             _cpu_flags_line(machine['cpu_flags']),
             'matmul peak: ' + '; '.join(
                 f"{p['dtype']} {p['gflops']:.1f} GFLOP/s (n = {p['shape'][0]}, best of {p['repeats']})"
                 if 'gflops' in p else f"skipped: {p['skipped']}" for p in results['matmul_peak'])]
    rows, titles = [['measurement', 'dtype', 'ckpt', 'shape', 's/step', 'min s', 'peak GiB', 'peak+GiB', 'tensors+GiB',
                     'warm+reps', 'notes']], {}
    for section, title in STEP_SECTIONS.items():
        titles[len(rows)] = f'-- {title}'
        rows += [_step_row(record) for record in results.get(section, [])]
    lines += [line for i, row_line in enumerate(_aligned(rows))
              for line in ([titles[i]] if i in titles else []) + [row_line]]
    for record in results.get('sampling', []):
        if 'skipped' in record:
            lines.append(f"-- sampling ({record['label']}, {record['dtype']}): skipped: {record['skipped']}")
            continue
        lines.append(f"-- sampling {record['label']} ({'x'.join(map(str, record['shape']))}), {record['dtype']}, no "
                     f"guidance, timed over {record['num_steps']} step(s), seconds per clip at:")
        lines += _aligned([['sampler', 's/step'] + [f'{n} steps' for n in USUAL_SAMPLING_STEPS]] + [
            [name, f"{cost['seconds_per_step']:.3f}", *(f'{s:.1f}' for s in cost['seconds_per_clip'].values())]
            for name, cost in record['samplers'].items()])
    lines += ['-- targets'] + [f"[{'met' if c['met'] else 'NOT met'}] {c['target']}: {c['value']}"
                               for c in results.get('targets', [])]
    methods = sorted({e['method'] for e in results.get('tokenizer_memory_estimate', [])})
    lines += [f'memory estimate: {method}' for method in methods] or [
        'memory estimate: none (it needs train steps on full-grid clips: run without --quick)']
    lines += ['peak GiB: the peak memory of the measurement\'s process (warm-up included): the peak resident set on '
              'CPU, torch.cuda.max_memory_allocated on CUDA. peak+GiB: that peak over what was in use before the first '
              'step (weights, inputs; on CPU the whole process). tensors+GiB (CPU): the peak of live tensor bytes '
              '(LiveTensorBytes), what CUDA would count; the targets and the memory estimate use it.',
              'MFU: achieved FLOP/s (FLOPs counted by torch.utils.flop_counter.FlopCounterMode) / the measured matmul '
              'peak of the step\'s dtype (fp32, TF32 or bf16). MFU <= x: the MFU with the attention kernel as '
              'measured alone, every other FLOP at the peak and element-wise ops free (mfu_bound).',
              f"total {results['seconds_total']:.0f} s"]
    return '\n'.join(lines)

