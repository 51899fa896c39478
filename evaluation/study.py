"""The guidance and sampler study of a trained DiT: every setting sampled, decoded and evaluated.

    python -m evaluation.study --ckpt out/demo/results/000-DiT-demo/checkpoints/latest.pt \\
        --features out/demo/features.pt --out-dir out/demo/study

For each setting (sampler, steps, guidance scale) it runs sample.py on ``--num-samples`` val trajectories
(``--traj dataset``, the same trajectories and seed for every setting), times that run, and scores the samples with
evaluation.evaluate against the val split of ``--reference-config``: trajectory adherence with the matched trajectories
and with shuffled ones (each clip scored against another clip's trajectory, the ceiling), Fréchet distance and MMD
on the occupancy features, class-frequency JS divergence and static consistency.
Seconds per sample are the whole sample.py run (loading, sampling, decoding) divided by the number of samples.
Writes every samples file, ``<setting>.json`` with its metrics and ``study.json``, and prints a Markdown table.
"""
import argparse
import json
import os
import subprocess
import sys
import time

from evaluation.evaluate import main as evaluate_main
from utils.checkpoint import atomic_write
from utils.run_log import json_text

SAMPLE_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'sample.py')

# (name, sampler, steps, guidance scale): the guidance sweep at DDIM-50, then the samplers at the middle scale
SETTINGS = (
    ('ddim50-cfg1', 'ddim', 50, 1.0),
    ('ddim50-cfg2', 'ddim', 50, 2.0),
    ('ddim50-cfg4', 'ddim', 50, 4.0),
    ('ddpm1000-cfg2', 'ddpm', 1000, 2.0),
    ('ddpm250-cfg2', 'ddpm', 250, 2.0),
    ('dpm-solver25-cfg2', 'dpm-solver', 25, 2.0),
)
COLUMNS = (('s/sample', 'seconds_per_sample', '{:.1f}'), ('ADE matched (m)', 'adherence_ade_m', '{:.2f}'),
           ('ADE shuffled (m)', 'shuffled_adherence_ade_m', '{:.2f}'), ('Fréchet', 'frechet_distance', '{:.2f}'),
           ('MMD', 'mmd', '{:.4f}'), ('class JS (bits)', 'class_js_divergence', '{:.3f}'),
           ('static consistency', 'static_consistency', '{:.3f}'))


def run_setting(args, name, sampler, steps, cfg_scale):
    """Sample one setting with sample.py in a fresh process; return (samples path, seconds per sample)."""
    samples = os.path.join(args.out_dir, f'{name}.npz')
    command = [sys.executable, SAMPLE_SCRIPT, '--ckpt', args.ckpt, '--traj', 'dataset', '--sampler', sampler,
               '--num-sampling-steps', str(steps), '--cfg-scale', str(cfg_scale), '--num-samples',
               str(args.num_samples), '--seed', str(args.seed), '--out', samples]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    return samples, (time.perf_counter() - start) / args.num_samples


def markdown_table(rows):
    """The study as a Markdown table: one row per setting."""
    lines = ['| setting | ' + ' | '.join(title for title, _, _ in COLUMNS) + ' |',
             '|---|' + '---:|' * len(COLUMNS)]
    for name, result in rows.items():
        cells = [('—' if result.get(key) is None else fmt.format(result[key])) for _, key, fmt in COLUMNS]
        lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description='Sample and evaluate a DiT under several samplers and guidance '
                                                 'scales.')
    parser.add_argument('--ckpt', required=True, help='train_2.py checkpoint')
    parser.add_argument('--features', required=True, help='feature extractor (python -m evaluation.occ_features train)')
    parser.add_argument('--reference-config', default='config/demo_vqvae.py', help='dataset config of the reference')
    parser.add_argument('--out-dir', required=True)
    parser.add_argument('--num-samples', type=int, default=8)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--settings', nargs='+', choices=[s[0] for s in SETTINGS], default=[s[0] for s in SETTINGS],
                        help='run only these settings')
    args = parser.parse_args(argv)
    if args.num_samples < 2:
        raise ValueError(f'--num-samples {args.num_samples}: the shuffled-trajectory ceiling needs at least 2')
    os.makedirs(args.out_dir, exist_ok=True)

    rows = {}
    for name, sampler, steps, cfg_scale in SETTINGS:
        if name not in args.settings:
            continue
        samples, seconds_per_sample = run_setting(args, name, sampler, steps, cfg_scale)
        metrics_path = os.path.join(args.out_dir, f'{name}.json')
        evaluate_main(['--samples', samples, '--reference-config', args.reference_config, '--reference-split', 'val',
                       '--features', args.features, '--out', metrics_path])
        with open(metrics_path) as f:
            result = json.load(f)
        result.update(setting=dict(sampler=sampler, steps=steps, cfg_scale=cfg_scale),
                      seconds_per_sample=seconds_per_sample)
        rows[name] = result
        atomic_write(os.path.join(args.out_dir, 'study.json'),
                     lambda f: f.write(json_text(rows, indent=1).encode()))
    print(markdown_table(rows))


if __name__ == '__main__':
    main()
