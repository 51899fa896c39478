"""Shared fixtures: a tiny dataset written in the real Occ3D + info-pickle layout, and the end-to-end runs of the
entry scripts on a tiny synthetic world (session-scoped: each stage runs once per test session, sizes in
tests/pipeline.py)."""
import os
import pickle

import numpy as np
import pytest
from pyquaternion import Quaternion

from dataset.constants import FREE_CLASS, GRID_SHAPE
from dataset.poses import driving_command, future_deltas, lidar_to_global
from dataset.synthetic import write_world
from tests.pipeline import (CODEBOOK_SIZE, DIT_ARGS, DIT_STEPS, LATENT_SHAPE, NUM_FRAMES, REPO, SCENE_FRAMES,
                            TOKEN_STRIDE, TOKENIZER_CONFIG, TOKENIZER_EPOCHS, TRAIN_SCENES, VAL_SCENES, run_script,
                            run_torchrun)

REAL_FRAME_DIR = os.path.join(os.path.dirname(__file__), 'data', 'occ3d_sample')
REAL_FRAME_TOKEN = '29796060110c4163b07f06eff4af0753'
LIDAR2EGO_ROTATION = list(Quaternion(axis=[0, 0, 1], angle=-np.pi / 2).elements)   # nuScenes LIDAR_TOP


def make_frames(scene_name, num_frames, speed=1.0, yaw_rate=0.0):
    """Frame dicts of an ego driving at ``speed`` m/frame with ``yaw_rate`` rad/frame from the origin."""
    frames, x, y, yaw = [], 0.0, 0.0, 0.0
    for i in range(num_frames):
        frames.append({
            'token': f'{scene_name}_{i:04d}', 'scene_name': scene_name,
            'frame_idx': i, 'timestamp': 500000 * i,
            'ego2global_translation': [x, y, 0.0],
            'ego2global_rotation': list(Quaternion(axis=[0, 0, 1], angle=yaw).elements),
            'lidar2ego_translation': [0.94, 0.0, 1.84], 'lidar2ego_rotation': LIDAR2EGO_ROTATION, 'cams': {}})
        x, y, yaw = x + speed * np.cos(yaw), y + speed * np.sin(yaw), yaw + yaw_rate
    deltas, masks = future_deltas(lidar_to_global(frames))
    commands = driving_command(deltas, masks)
    for frame, delta, mask, command in zip(frames, deltas, masks, commands):
        frame.update(gt_ego_fut_trajs=delta, gt_ego_fut_masks=mask, pose_mode=command)
    return frames


def write_dataset(root, scenes, seed=0):
    """Write ``scenes`` ({name: frame list}) as gts/<scene>/<token>/labels.npz + one info pkl; frame i of a scene
    holds class (i % 17) in voxel (0, 0, 0) on a background of random ground classes."""
    rng = np.random.default_rng(seed)
    for scene_name, frames in scenes.items():
        for i, frame in enumerate(frames):
            semantics = np.full(GRID_SHAPE, FREE_CLASS, np.uint8)
            semantics[:, :, 2] = rng.integers(11, 15, GRID_SHAPE[:2])
            semantics[0, 0, 0] = i % FREE_CLASS
            directory = os.path.join(root, 'gts', scene_name, frame['token'])
            os.makedirs(directory, exist_ok=True)
            np.savez_compressed(os.path.join(directory, 'labels.npz'), semantics=semantics,
                                mask_lidar=np.ones(GRID_SHAPE, np.uint8),
                                mask_camera=(semantics != FREE_CLASS).astype(np.uint8))
    info_pkl = os.path.join(root, 'infos.pkl')
    with open(info_pkl, 'wb') as f:
        pickle.dump({'infos': scenes, 'metadata': {'version': 'test'}}, f)
    return info_pkl


@pytest.fixture(scope='session')
def tiny_dataset(tmp_path_factory):
    """Two usable scenes (7 and 5 frames; the first turns left) and one of 2 frames, for clips of 4 frames."""
    root = str(tmp_path_factory.mktemp('tiny_occ'))
    scenes = {'scene-a': make_frames('scene-a', 7, speed=2.0, yaw_rate=0.2),
              'scene-b': make_frames('scene-b', 5, speed=1.0),
              'scene-c': make_frames('scene-c', 2)}
    info_pkl = write_dataset(root, scenes)
    return {'info_pkl': info_pkl, 'gts_root': os.path.join(root, 'gts'), 'scenes': scenes}


@pytest.fixture(scope='session')
def world(tmp_path_factory):
    """Root of a synthetic world: 2 train + 1 val scenes of 12 frames, in the real Occ3D layout."""
    root = str(tmp_path_factory.mktemp('world'))
    write_world(root, num_scenes=TRAIN_SCENES + VAL_SCENES, num_frames=SCENE_FRAMES, seed=0,
                num_val_scenes=VAL_SCENES)
    return root


@pytest.fixture(scope='session')
def counterfactual_world(tmp_path_factory):
    """Root of a counterfactual synthetic world: starts 0 (train) and 1 (val), each as a straight, a left and a right
    scene of 12 frames."""
    root = str(tmp_path_factory.mktemp('counterfactual_world'))
    write_world(root, num_scenes=2, num_frames=12, seed=0, num_val_scenes=1, counterfactual=True)
    return root


@pytest.fixture(scope='session')
def tokenizer_config(world, tmp_path_factory):
    """Path of the tiny stage-1 config (a `_base_` child of config/train_vqvae.py) reading ``world``."""
    path = tmp_path_factory.mktemp('configs') / 'tiny_vqvae.py'
    path.write_text(TOKENIZER_CONFIG.format(
        base=os.path.join(REPO, 'config', 'train_vqvae.py'), data_root=world + os.sep, num_frames=NUM_FRAMES,
        latent_channels=LATENT_SHAPE[0], codebook_size=CODEBOOK_SIZE, epochs=TOKENIZER_EPOCHS))
    return str(path)


@pytest.fixture(scope='session')
def tokenizer_run(tokenizer_config, tmp_path_factory):
    """Work dir of one uninterrupted single-process train_1.py run (3 epochs, 6 steps)."""
    work_dir = str(tmp_path_factory.mktemp('vqvae'))
    run_script('train_1.py', '--py-config', tokenizer_config, '--work-dir', work_dir)
    return work_dir


@pytest.fixture(scope='session')
def gaussian_tokenizer_run(tokenizer_config, tmp_path_factory):
    """Work dir of a one-epoch train_1.py run of the tiny config with continuous latents (latent_type='gaussian')."""
    work_dir = str(tmp_path_factory.mktemp('gaussian_vqvae'))
    run_script('train_1.py', '--py-config', tokenizer_config, '--work-dir', work_dir, '--cfg-options', 'max_epochs=1',
               'model.latent_type=gaussian')
    return work_dir


@pytest.fixture(scope='session')
def token_dir(tokenizer_config, tokenizer_run):
    """<tokenizer_run>/tokens written by step02.py from the run's latest.pth, stride TOKEN_STRIDE."""
    run_script('step02.py', '--py-config', tokenizer_config, '--work-dir', tokenizer_run,
               '--stride', TOKEN_STRIDE)
    return os.path.join(tokenizer_run, 'tokens')


@pytest.fixture(scope='session')
def dit_run(token_dir, tmp_path_factory):
    """Experiment dir of one uninterrupted single-process train_2.py run of DIT_STEPS steps (condition dropout 0.1)."""
    results_dir = tmp_path_factory.mktemp('dit_results')
    run_script('train_2.py', '--data-path', token_dir, '--results-dir', results_dir, '--max-steps', DIT_STEPS,
               *DIT_ARGS)
    return str(results_dir / '000-DiT-demo')


@pytest.fixture(scope='session')
def dit_run_without_dropout(token_dir, tmp_path_factory):
    """Experiment dir of a 2-process torchrun train_2.py run of 3 steps, trained with class_dropout_prob=0 (upstream's
    setting: no null trajectory, so no classifier-free guidance)."""
    results_dir = tmp_path_factory.mktemp('dit_results_ddp')
    run_torchrun('train_2.py', '--data-path', token_dir, '--results-dir', results_dir, '--max-steps', 3,
                 *DIT_ARGS, 'class_dropout_prob=0.0')
    return str(results_dir / '000-DiT-demo')
