"""Learning curves of stage-1 runs: the validation records of train_1.py's metrics.jsonl (written every
``val_every_steps`` steps and at the end of each epoch) as a Markdown table, and optionally as a plot of IoU and
mIoU against training minutes, so that recipes are compared by their curves rather than by one end point.

    python -m evaluation.learning_curves out/demo/vqvae                          # one run: its curve
    python -m evaluation.learning_curves RUN_A RUN_B --names a b --plot curves.png

Each argument is a train_1.py work dir (or its metrics.jsonl). Per validation: step, training minutes (validation
and checkpointing excluded), IoU, mIoU and the weakest classes among those that hold at least ``--min-share`` of
the occupied ground-truth voxels of the last validation (older records without those shares: among the classes
that were scored).
"""
import argparse
import json
import os


def read_validations(run):
    """The 'val' records of a work dir's metrics.jsonl (or of the file itself), in order; a clear error otherwise."""
    path = os.path.join(run, 'metrics.jsonl') if os.path.isdir(run) else run
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path}: no metrics.jsonl (is {run} a train_1.py work dir?)')
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    validations = [r for r in records if r.get('split') == 'val']
    if not validations:
        raise ValueError(f'{path}: no validation record')
    return validations


def weakest_classes(record, classes, count=3):
    """The ``count`` lowest (IoU, name) pairs of ``record['class_iou']`` among ``classes`` (absent ones count 0)."""
    return sorted((record['class_iou'].get(name) or 0.0, name) for name in classes)[:count]


def curve_rows(name, validations, frequent):
    """Markdown rows 'run | step | minutes | IoU | mIoU | weakest frequent classes' of one run."""
    rows = []
    for record in validations:
        minutes = record.get('train_minutes')
        weakest = ', '.join(f'{cls} {iou:.1f}' for iou, cls in weakest_classes(record, frequent))
        rows.append(f'| {name} | {record["step"]} | {"-" if minutes is None else f"{minutes:.1f}"} | '
                    f'{record["iou"]:.1f} | {record["miou"]:.1f} | {weakest} |')
    return rows


def plot_curves(curves, path):
    """IoU and mIoU against training minutes (step where minutes were not logged), one line per run."""
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, validations in curves:
        x = [r.get('train_minutes', r['step']) for r in validations]
        axes[0].plot(x, [r['iou'] for r in validations], marker='o', label=name)
        axes[1].plot(x, [r['miou'] for r in validations], marker='o', label=name)
    for axis, metric in zip(axes, ('val IoU (%)', 'val mIoU (%)')):
        axis.set_xlabel('training minutes (steps for runs that did not log them)')
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=90)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('runs', nargs='+', help='train_1.py work dirs or metrics.jsonl files')
    parser.add_argument('--names', nargs='+', help='row labels (default: the work dir names)')
    parser.add_argument('--min-share', type=float, default=0.01,
                        help='weakest classes are chosen among those with at least this share of the occupied voxels')
    parser.add_argument('--plot', help='write the curves to this image file')
    args = parser.parse_args()
    names = args.names or [os.path.basename(os.path.normpath(run)) for run in args.runs]
    if len(names) != len(args.runs):
        parser.error(f'{len(names)} names for {len(args.runs)} runs')
    curves = [(name, read_validations(run)) for name, run in zip(names, args.runs)]
    print('| run | step | minutes | IoU | mIoU | weakest frequent classes |')
    print('|---|---:|---:|---:|---:|---|')
    for name, validations in curves:
        shares = validations[-1].get('class_share')          # absent from records written before it was logged
        frequent = [c for c, share in shares.items() if share >= args.min_share] if shares else \
            [c for c, iou in validations[-1]['class_iou'].items() if iou is not None]
        print('\n'.join(curve_rows(name, validations, frequent)))
    if args.plot:
        plot_curves(curves, args.plot)
        print(f'wrote {args.plot}')


if __name__ == '__main__':
    main()
