"""End-to-end tests of train_1.py (stage 1): one process, torchrun on 2 CPU processes, a run stopped twice
with --max-steps and resumed from latest.pth that repeats the uninterrupted run exactly, and the compile flag."""
import os

import pytest
import torch

from tests.pipeline import CODEBOOK_SIZE, TOKENIZER_EPOCHS, read_jsonl, run_script, run_torchrun, temp_files
from utils.checkpoint import load_checkpoint

STEPS_PER_EPOCH = 2              # one random clip per train scene, batch 1
TRAIN_KEYS = {'split', 'epoch', 'step', 'lr', 'grad_norm', 'loss', 'ce', 'lovasz', 'vq'}
VAL_KEYS = {'split', 'epoch', 'step', 'iou', 'miou', 'iou_per_frame', 'miou_per_frame', 'class_iou',
            'used_codes', 'perplexity'}


def records(work_dir, split):
    return [r for r in read_jsonl(os.path.join(work_dir, 'metrics.jsonl')) if r['split'] == split]


def test_single_process_run_writes_its_files(tokenizer_run):
    files = set(os.listdir(tokenizer_run))
    expected = {'config.py', 'log.txt', 'metrics.jsonl', 'latest.pth'} | {
        f'epoch_{k}.pth' for k in range(1, TOKENIZER_EPOCHS + 1)}
    assert expected <= files
    assert temp_files(tokenizer_run) == []

    train, val = records(tokenizer_run, 'train'), records(tokenizer_run, 'val')
    total_steps = TOKENIZER_EPOCHS * STEPS_PER_EPOCH
    assert [r['step'] for r in train] == list(range(1, total_steps + 1))            # print_freq = 1
    assert all(TRAIN_KEYS <= set(r) for r in train)
    assert [(r['epoch'], r['step']) for r in val] == [(k, k * STEPS_PER_EPOCH) for k in range(1, TOKENIZER_EPOCHS + 1)]
    for r in val:
        assert VAL_KEYS <= set(r)
        assert 0 <= r['iou'] <= 100 and 1 <= r['used_codes'] <= CODEBOOK_SIZE
        assert 1 <= r['perplexity'] <= r['used_codes'] + 1e-9
        assert len(r['iou_per_frame']) == 2
    # the warm-up lasts one step, then the cosine goes down to min_lr at the last step
    assert train[-1]['lr'] < train[0]['lr']

    latest = load_checkpoint(os.path.join(tokenizer_run, 'latest.pth'))
    last_epoch = load_checkpoint(os.path.join(tokenizer_run, f'epoch_{TOKENIZER_EPOCHS}.pth'))
    assert latest['step'] == last_epoch['step'] == total_steps
    assert all(torch.equal(latest['model'][k], last_epoch['model'][k]) for k in latest['model'])
    assert latest['model_config']['codebook_size'] == CODEBOOK_SIZE
    log = open(os.path.join(tokenizer_run, 'log.txt')).read()
    assert 'world size 1' in log and f'done at step {total_steps}' in log


def test_stopped_and_resumed_run_repeats_the_uninterrupted_one(tokenizer_config, tokenizer_run, tmp_path):
    """Stop inside epoch 2 (step 3), then exactly at its end (step 4), then run to the end: every train loss
    (random crops, dead-code restarts and the sampler position all resume) and every validation equals the
    uninterrupted run's, and the epoch that ended at --max-steps still got its checkpoint and validation."""
    work_dir = str(tmp_path / 'resumed')
    for max_steps in (3, 4, 0):
        result = run_script('train_1.py', '--py-config', tokenizer_config, '--work-dir', work_dir,
                            '--max-steps', max_steps)
    assert 'resumed from' in result.stdout and 'step 4, epoch 2, batch 0' in result.stdout

    reference, resumed = records(tokenizer_run, 'train'), records(work_dir, 'train')
    assert [r['step'] for r in resumed] == [r['step'] for r in reference]
    for ours, theirs in zip(resumed, reference):
        for key in ('loss', 'ce', 'lovasz', 'vq', 'lr', 'grad_norm'):
            assert abs(ours[key] - theirs[key]) <= 1e-6 * max(1.0, abs(theirs[key])), (ours['step'], key)
    strip = ('seconds_per_iter', 'train_minutes')
    assert [{k: v for k, v in r.items() if k not in strip} for r in records(work_dir, 'val')] == \
        [{k: v for k, v in r.items() if k not in strip} for r in records(tokenizer_run, 'val')]
    for k in range(1, TOKENIZER_EPOCHS + 1):
        assert os.path.isfile(os.path.join(work_dir, f'epoch_{k}.pth'))
    assert temp_files(work_dir) == []


def test_learning_curve_class_weights_and_gaussian_latents(tokenizer_config, tmp_path):
    """val_every_steps validates inside the epoch (the curve, with training minutes), class_weight_power weights the
    CE by the train split's class counts, and latent_type='gaussian' trains and validates without a codebook."""
    work_dir = str(tmp_path / 'curve')
    run_script('train_1.py', '--py-config', tokenizer_config, '--work-dir', work_dir, '--cfg-options', 'max_epochs=1',
               'val_every_steps=1', 'class_weight_power=0.5', 'model.latent_type=gaussian')
    val = records(work_dir, 'val')
    assert [r['step'] for r in val] == [1, 2]                  # step 2 ends the epoch: validated once
    assert 0 < val[0]['train_minutes'] < val[1]['train_minutes']
    assert all('used_codes' not in r and 0 <= r['iou'] <= 100 for r in val)
    log = open(os.path.join(work_dir, 'log.txt')).read()
    weights = [float(w) for w in log.split('CE class weights: ')[1].split('\n')[0].split(', ')]
    assert len(weights) == 18 and min(weights) == 1.0 and max(weights) > 2.0
    assert load_checkpoint(os.path.join(work_dir, 'latest.pth'))['model_config']['latent_type'] == 'gaussian'


def test_a_diverging_run_stops_loudly_before_saving(tokenizer_config, tmp_path):
    work_dir = tmp_path / 'diverging'
    result = run_script('train_1.py', '--py-config', tokenizer_config, '--work-dir', work_dir, '--cfg-options',
                        'optimizer.lr=1e30', 'scheduler.warmup_lr=1e30', 'scheduler.min_lr=1e30',
                        expect_success=False)
    assert 'FloatingPointError: non-finite training values at step' in result.stderr
    assert 'grad_norm' in result.stderr and 'lovasz' in result.stderr
    assert not (work_dir / 'latest.pth').exists() and not (work_dir / 'epoch_1.pth').exists()


def test_resume_at_max_steps_trains_no_further(tokenizer_config, tokenizer_run, tmp_path):
    work_dir = tmp_path / 'done'
    work_dir.mkdir()
    (work_dir / 'latest.pth').write_bytes(open(os.path.join(tokenizer_run, 'epoch_1.pth'), 'rb').read())
    result = run_script('train_1.py', '--py-config', tokenizer_config, '--work-dir', work_dir,
                        '--max-steps', STEPS_PER_EPOCH)
    assert f'done at step {STEPS_PER_EPOCH}' in result.stdout
    assert not os.path.exists(work_dir / 'metrics.jsonl')


def test_a_resume_with_a_new_lr_is_refused_or_applied_and_metrics_are_not_repeated(tokenizer_config, tokenizer_run,
                                                                                  tmp_path):
    """The run of tokenizer_run killed after step 6 but resumed from its step-2 checkpoint: a new optimizer.lr is
    refused with its old and new value (print_freq may change); --allow-config-changes applies it to the cosine
    schedule and records it; metrics.jsonl keeps the records up to step 2 and does not repeat step 3."""
    work_dir = tmp_path / 'changed'
    work_dir.mkdir()
    (work_dir / 'latest.pth').write_bytes(open(os.path.join(tokenizer_run, 'epoch_1.pth'), 'rb').read())
    (work_dir / 'metrics.jsonl').write_text(open(os.path.join(tokenizer_run, 'metrics.jsonl')).read())
    command = ('train_1.py', '--py-config', tokenizer_config, '--work-dir', work_dir, '--max-steps', 3,
               '--cfg-options', 'optimizer.lr=0.01', 'print_freq=2')
    refused = run_script(*command, expect_success=False)
    assert 'optimizer.lr 0.05 -> 0.01' in refused.stderr and 'print_freq' not in refused.stderr
    assert load_checkpoint(work_dir / 'latest.pth')['step'] == STEPS_PER_EPOCH

    result = run_script(*command, 'print_freq=1', '--allow-config-changes')
    assert 'config change applied on resume: optimizer.lr 0.05 -> 0.01' in result.stdout
    checkpoint = load_checkpoint(work_dir / 'latest.pth')
    assert checkpoint['step'] == 3 and checkpoint['config']['optimizer']['lr'] == 0.01
    assert checkpoint['optimizer']['param_groups'][0]['initial_lr'] == 0.01
    assert [(r['split'], r['step']) for r in read_jsonl(work_dir / 'metrics.jsonl')] == [
        ('train', 1), ('train', 2), ('val', 2), ('train', 3)]
    # the same cosine position as the uninterrupted run's step 3, rescaled from 0.05 down to min_lr 1e-3 to 0.01
    reference_lr, min_lr = records(tokenizer_run, 'train')[2]['lr'], 1e-3
    expected = min_lr + (reference_lr - min_lr) * (0.01 - min_lr) / (0.05 - min_lr)
    assert records(work_dir, 'train')[-1]['lr'] == pytest.approx(expected, rel=1e-9)


def test_torchrun_two_processes(tokenizer_config, tmp_path):
    work_dir = str(tmp_path / 'ddp')
    run_torchrun('train_1.py', '--py-config', tokenizer_config, '--work-dir', work_dir)
    assert {'config.py', 'log.txt', 'metrics.jsonl', 'latest.pth', 'epoch_1.pth'} <= set(os.listdir(work_dir))
    assert temp_files(work_dir) == []
    # 2 train clips over 2 processes of batch 1: one step per epoch
    assert [r['step'] for r in records(work_dir, 'train')] == list(range(1, TOKENIZER_EPOCHS + 1))
    val = records(work_dir, 'val')
    assert len(val) == TOKENIZER_EPOCHS and all(VAL_KEYS <= set(r) for r in val)
    log = open(os.path.join(work_dir, 'log.txt')).read()
    assert 'world size 2' in log and log.count('done at step') == 1            # rank 0 logs alone
    checkpoint = load_checkpoint(os.path.join(work_dir, 'latest.pth'))
    assert checkpoint['step'] == TOKENIZER_EPOCHS and len(checkpoint['rng']) == 2
    assert not torch.equal(checkpoint['rng'][0], checkpoint['rng'][1])          # each rank's own random stream


def test_validation_does_not_depend_on_the_process_count(tokenizer_config, tmp_path):
    """3 val clips over 2 processes: the padding DistributedSampler counted clip 0 twice; every clip must count
    once, so the 2-process validation equals the same checkpoint validated in one process."""
    from dataset.loader import build_dataset, build_loader
    from mmengine.config import Config
    from model.pipeline import load_tokenizer
    from train_1 import evaluate
    work_dir = str(tmp_path / 'ddp_odd')
    options = ('max_epochs=1', 'dataset.val.stride=5')                   # val starts 0, 5, 10 of a 12-frame scene
    run_torchrun('train_1.py', '--py-config', tokenizer_config, '--work-dir', work_dir, '--cfg-options', *options)
    two_processes = records(work_dir, 'val')[-1]
    cfg = Config.fromfile(tokenizer_config)
    cfg.merge_from_dict({'dataset.val.stride': 5})
    val_set = build_dataset(cfg, 'val')
    assert len(val_set) == 3
    tokenizer, _ = load_tokenizer(os.path.join(work_dir, 'latest.pth'))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                       # as the scripts' processes: the same convolution arithmetic
    try:
        one_process = evaluate(tokenizer, build_loader(val_set, 1, shuffle=False), cfg, torch.device('cpu'), False)
    finally:
        torch.set_num_threads(threads)
    # counting clip 0 twice, as the padding did, moved the IoU by 1 %; rank 1 evaluating with its own BatchNorm
    # statistics (not the checkpoint's) moved the mIoU by 3e-5 and the code perplexity by 50 %
    for key in ('iou', 'miou', 'used_codes', 'perplexity'):
        assert one_process[key] == pytest.approx(two_processes[key], rel=1e-9), key


@pytest.mark.slow
def test_compile_flag_trains_the_same_first_step(tokenizer_config, tokenizer_run, tmp_path):
    """compile=True compiles the encoder and decoder in place: the same state dict keys and, up to the compiled
    kernels' rounding, the same first-step loss as the eager run (compiling takes most of a minute on 2 cores)."""
    work_dir = str(tmp_path / 'compiled')
    run_script('train_1.py', '--py-config', tokenizer_config, '--work-dir', work_dir, '--max-steps', 1,
               '--cfg-options', 'compile=True', timeout=600)
    compiled, reference = records(work_dir, 'train')[0], records(tokenizer_run, 'train')[0]
    assert compiled['step'] == reference['step'] == 1
    for key in ('loss', 'ce', 'lovasz', 'vq'):
        assert abs(compiled[key] - reference[key]) <= 1e-4 * max(1.0, abs(reference[key])), key
    state = load_checkpoint(os.path.join(work_dir, 'latest.pth'))['model']
    assert set(state) == set(load_checkpoint(os.path.join(tokenizer_run, 'latest.pth'))['model'])
