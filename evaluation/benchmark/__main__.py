"""What the faithful OccSora models cost: step time, peak memory, throughput and MFU, in one run.

    python -m evaluation.benchmark [--quick] [--device cpu|cuda] [--out out/benchmark.json]
    python -m evaluation.benchmark --only dit_train_step sampling encoding     # stage 2, fp32 against bf16

Measures, in this order: the fp32 / bf16 (and TF32 on CUDA) matmul peak; the demo models' train steps (what
`make demo` trains); the faithful tokenizer's train step (forward + tokenizer_loss + backward) per memory flag
(eager fp32, bf16 autocast, activation checkpointing, both; where bf16 matmuls are slow, the bf16 steps' memory is
counted with their matmuls, convolutions and attention run in fp32 (LiveTensorBytes, emulate_bf16), not timed); the
faithful DiT's train step at batch 2, its peak memory and MFU in fp32 and bf16 autocast (and TF32 on CUDA); step02's
encoding throughput and the seconds per sampled clip per sampler, each in fp32 and bf16 autocast (bf16 rows are
skipped where bf16 matmuls are slow); the DiT's step with torch.compile (full run). The full run measures the
tokenizer on full-grid clips of T = 8, 16 and 32 (a clip whose memory estimate from the smaller ones exceeds the
memory available is skipped); --quick on a T = 8 clip cropped to QUICK_CROP (as the train_crop flag trains), and it
starts no measurement after QUICK_BUDGET_S seconds. The report names the CPU and its bf16 flags (avx512_bf16, AMX).

The code is split by concern: measure.py (FLOPs, timing, memory), steps.py (the measurements), run.py (the plan,
the process per measurement, the targets), report.py (the table). Each measurement runs in a process of its own
(forked from a server that imported the models once), so that its peak memory is its own: the increase, warm-up
included, over the memory in use when its first step starts (torch.cuda.max_memory_allocated on CUDA; the peak
resident set on the CPU, reset through /proc/self/clear_refs).
The tokenizer's training memory at the paper's batch 2, T = 32 is extrapolated from them (extrapolate_memory).
The table goes to stdout; every number, with its device, dtype, shape and repeat count, to JSON.
"""
import argparse
import json
import os

import torch

from evaluation.benchmark.report import format_table
from evaluation.benchmark.run import FIT_FRAMES, QUICK_BUDGET_S, QUICK_CROP, SECTIONS, run_benchmark
from utils.distributed import default_device


def main():
    parser = argparse.ArgumentParser(prog='python -m evaluation.benchmark',
                                     description='Benchmark the faithful OccSora models: step time, peak memory, '
                                                 'throughput and MFU; prints a table and writes JSON.')
    parser.add_argument('--quick', action='store_true',
                        help=f'one step per measurement, the tokenizer at T = {FIT_FRAMES[0]} on a {QUICK_CROP[0]} x '
                             f'{QUICK_CROP[1]} crop, no measurement started after {QUICK_BUDGET_S} s')
    parser.add_argument('--device', choices=('cpu', 'cuda'), default=default_device().type)
    parser.add_argument('--out', default='out/benchmark.json', help='JSON file for every number')
    parser.add_argument('--budget-s', type=float, default=None,
                        help=f'start no measurement after this many seconds ({QUICK_BUDGET_S} with --quick)')
    parser.add_argument('--only', nargs='+', choices=SECTIONS, default=SECTIONS, metavar='SECTION',
                        help=f'run only these sections of the plan ({", ".join(SECTIONS)}); the matmul peaks always')
    args = parser.parse_args()
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda: torch sees no CUDA device here')
    results = run_benchmark(args.device, args.quick, args.budget_s or (QUICK_BUDGET_S if args.quick else None),
                            args.only)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:                  # first: a long run's numbers outlive any error in the report
        json.dump(results, f, indent=1)
    print(format_table(results))
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
