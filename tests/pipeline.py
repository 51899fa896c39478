"""Sizes and helpers of the end-to-end tests of the five entry scripts (the session fixtures of tests/conftest.py
build a tiny synthetic world, a tiny tokenizer config and one run of each stage with them).

Everything is sized for a loaded 2-core CPU: 2-frame clips (the tokenizer down-samples T by 2, H and W by 8, so a
clip is 8 x 1 x 25 x 25 latents of a 16-code book), training on random 64 x 64 crops, a one-block DiT of width 32.
The scripts run as subprocesses from the repository root, so their command lines are what is tested.
"""
import json
import os
import subprocess
import sys

import pytest

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
