"""Shared fixtures of the end-to-end tests of the five entry scripts (tests/test_train_1.py, test_stage2.py,
test_sample_render.py): a tiny synthetic world, a tiny tokenizer config, and one run of each stage, built once per
test session and shared by the modules that import them.

Everything is sized for a loaded 2-core CPU: 2-frame clips (the tokenizer down-samples T by 2, H and W by 8, so a
clip is 8 x 1 x 25 x 25 latents of a 16-code book), training on random 64 x 64 crops, a one-block DiT of width 32.
The scripts run as subprocesses from the repository root, so their command lines are what is tested.
"""
import functools
import json
import os
import subprocess
import sys

import pytest

from dataset.synthetic import write_world

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_FRAMES = 2                   # keyframes per clip
TRAIN_SCENES, VAL_SCENES, SCENE_FRAMES = 2, 1, 12
TOKEN_STRIDE = 4                 # step02's sliding-window stride: starts 0, 4, 8 in a 12-frame scene
TOKENIZER_EPOCHS = 3             # 2 steps each: one random clip per train scene, batch 1
LATENT_SHAPE = [8, 1, 25, 25]    # (C, T', H', W') of the tiny tokenizer below
CODEBOOK_SIZE = 16
DIT_STEPS = 4                    # 6 train clips, batch 2: 3 steps per epoch

# A config file that inherits the repository's stage-1 config and shrinks it (written next to the world).
TOKENIZER_CONFIG = """_base_ = [{base!r}]
data_root = {data_root!r}
num_frames = {num_frames}
dataset = dict(
    train_pkl=data_root + 'nuscenes_infos_train_temporal_v3_scene.pkl',
    val_pkl=data_root + 'nuscenes_infos_val_temporal_v3_scene.pkl',
    common=dict(gts_root=data_root + 'nuscenes/gts', num_frames=num_frames),
    train=dict(times=1),
    val=dict(stride=8),
)
model = dict(class_embed_dim=2, hidden_channels=8, num_res_blocks=1, latent_channels={latent_channels},
             codebook_size={codebook_size}, downsample=({num_frames}, 8, 8), dead_code_threshold=1.0)
optimizer = dict(lr=5e-2)        # large, so that a few steps already predict mostly free space
scheduler = dict(warmup_iters=1, min_lr=1e-3)
max_epochs = {epochs}
train_crop = (64, 64)
num_workers = 0
print_freq = 1
"""
# train_2.py flags of the tiny DiT
DIT_ARGS = ['--model', 'DiT-demo', '--global-batch-size', '2', '--log-every', '1', '--ckpt-every', '2',
            '--num-workers', '0', '--cfg-options', 'model_overrides.depth=1', 'model_overrides.hidden_size=32',
            'model_overrides.num_heads=2']


def script_env():
    """The environment of a script run: one BLAS/OpenMP thread per process (several processes share 2 cores, and
    oversubscribed threads made every step several times slower) and no display."""
    return {**os.environ, 'OMP_NUM_THREADS': '1', 'MPLBACKEND': 'Agg', 'ETS_TOOLKIT': 'null'}


def run_script(*args, expect_success=True, timeout=300):
    """``python <args>`` from the repository root; fails the test with the script's output if the exit status is not
    the expected one. Returns the CompletedProcess (stdout and stderr as text)."""
    result = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=script_env(), capture_output=True,
                            text=True, timeout=timeout)
    if (result.returncode == 0) != expect_success:
        pytest.fail(f'{" ".join(map(str, args))} exited with {result.returncode}\n'
                    f'stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}')
    return result


def run_torchrun(*args, nproc=2):
    """``torchrun --standalone --nproc_per_node=nproc <args>`` (gloo on the CPU) from the repository root."""
    return run_script('-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}', *args)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def temp_files(directory):
    """Leftovers of utils.checkpoint.atomic_write (its temp files start with '.tmp-') anywhere under directory."""
    return [os.path.join(root, name) for root, _, names in os.walk(directory) for name in names
            if name.startswith('.tmp-')]


_built = {}     # fixture name -> value of the session's one run


def session_once(build):
    """A session fixture that runs once per session, even when several test modules import it (pytest makes each
    importing module its own copy of a fixture, and each copy would run the script again)."""
    @functools.wraps(build)
    def fixture(*args, **kwargs):
        if build.__name__ not in _built:
            _built[build.__name__] = build(*args, **kwargs)
        return _built[build.__name__]
    return pytest.fixture(scope='session')(fixture)


@session_once
def world(tmp_path_factory):
    """Root of a synthetic world: 2 train + 1 val scenes of 12 frames, in the real Occ3D layout."""
    root = str(tmp_path_factory.mktemp('world'))
    write_world(root, num_scenes=TRAIN_SCENES + VAL_SCENES, num_frames=SCENE_FRAMES, seed=0,
                num_val_scenes=VAL_SCENES)
    return root


@session_once
def tokenizer_config(world, tmp_path_factory):
    """Path of the tiny stage-1 config (a `_base_` child of config/train_vqvae.py) reading ``world``."""
    path = tmp_path_factory.mktemp('configs') / 'tiny_vqvae.py'
    path.write_text(TOKENIZER_CONFIG.format(
        base=os.path.join(REPO, 'config', 'train_vqvae.py'), data_root=world + os.sep, num_frames=NUM_FRAMES,
        latent_channels=LATENT_SHAPE[0], codebook_size=CODEBOOK_SIZE, epochs=TOKENIZER_EPOCHS))
    return str(path)


@session_once
def tokenizer_run(tokenizer_config, tmp_path_factory):
    """Work dir of one uninterrupted single-process train_1.py run (3 epochs, 6 steps)."""
    work_dir = str(tmp_path_factory.mktemp('vqvae'))
    run_script('train_1.py', '--py-config', tokenizer_config, '--work-dir', work_dir)
    return work_dir


@session_once
def token_dir(tokenizer_config, tokenizer_run):
    """<tokenizer_run>/tokens written by step02.py from the run's latest.pth, stride TOKEN_STRIDE."""
    run_script('step02.py', '--py-config', tokenizer_config, '--work-dir', tokenizer_run,
               '--stride', TOKEN_STRIDE)
    return os.path.join(tokenizer_run, 'tokens')


@session_once
def dit_run(token_dir, tmp_path_factory):
    """Experiment dir of one uninterrupted single-process train_2.py run of DIT_STEPS steps (condition dropout 0.1)."""
    results_dir = tmp_path_factory.mktemp('dit_results')
    run_script('train_2.py', '--data-path', token_dir, '--results-dir', results_dir, '--max-steps', DIT_STEPS,
               *DIT_ARGS)
    return str(results_dir / '000-DiT-demo')


@session_once
def dit_run_without_dropout(token_dir, tmp_path_factory):
    """Experiment dir of a 2-process torchrun train_2.py run of 3 steps, trained with class_dropout_prob=0 (upstream's
    setting: no null trajectory, so no classifier-free guidance)."""
    results_dir = tmp_path_factory.mktemp('dit_results_ddp')
    run_torchrun('train_2.py', '--data-path', token_dir, '--results-dir', results_dir, '--max-steps', 3,
                 *DIT_ARGS, 'class_dropout_prob=0.0')
    return str(results_dir / '000-DiT-demo')
