"""Every config file loads, agrees with dataset/constants.py, accepts --cfg-options overrides, and builds its model as
its training script does (the faithful ones with upstream's parameter counts)."""
import argparse
import glob
import os

import pytest
import torch
from mmengine.config import Config

from dataset.constants import GRID_SHAPE, NUM_CLASSES
from model.dit import DIT_MODELS, build_dit, dit_config_args
from model.tokenizer import build_tokenizer
from utils.config import add_config_args, load_config

CONFIG_DIR = os.path.join(os.path.dirname(__file__), '..', 'config')
CONFIGS = sorted(glob.glob(os.path.join(CONFIG_DIR, '*.py')))
TOKENIZER_CONFIGS = sorted(glob.glob(os.path.join(CONFIG_DIR, '*vqvae*.py')))
DIT_CONFIGS = sorted(glob.glob(os.path.join(CONFIG_DIR, '*_dit.py')))


def test_there_are_configs():
    assert {os.path.basename(c) for c in CONFIGS} >= {'train_vqvae.py'}


@pytest.mark.parametrize('path', CONFIGS, ids=os.path.basename)
def test_config_loads_and_agrees_with_the_dataset_facts(path):
    cfg = Config.fromfile(path)
    if 'dataset' in cfg:
        assert cfg.num_classes == NUM_CLASSES and cfg.grid_height == GRID_SHAPE[2]
        assert cfg.dataset.common.num_frames == cfg.num_frames
    if 'model' in cfg and 'class_embed_dim' in cfg.model:
        assert cfg.model.num_classes == NUM_CLASSES and cfg.model.grid_height == GRID_SHAPE[2]


def test_cfg_options_override_nested_keys():
    parser = add_config_args(argparse.ArgumentParser(), os.path.join(CONFIG_DIR, 'train_vqvae.py'))
    args = parser.parse_args(['--cfg-options', 'max_epochs=2', 'model.hidden_channels=64',
                              'dataset.train.times=1'])
    cfg = load_config(args)
    assert cfg.max_epochs == 2 and cfg.model.hidden_channels == 64 and cfg.dataset.train.times == 1
    assert cfg.model.codebook_size == 512 and cfg.dataset.train.mode == 'random'


def build_config_tokenizer(path):
    """The tokenizer of a stage-1 config as train_1.py builds it, on the meta device (shapes, no weights)."""
    with torch.device('meta'):
        return build_tokenizer(Config.fromfile(path).model)


def build_config_dit(path, **overrides):
    """The DiT of a stage-2 config as train_2.py builds it (dit_config_args + the shapes step02 writes to
    meta.json), for the latent of its stage-1 config (train_dit.py: train_vqvae.py, demo_dit.py: demo_vqvae.py),
    on the meta device."""
    cfg = Config.fromfile(path)
    cfg.merge_from_dict(overrides)
    tokenizer_cfg = Config.fromfile(path.replace('_dit.py', '_vqvae.py'))
    latent_shape = build_config_tokenizer(path.replace('_dit.py', '_vqvae.py')).latent_shape(tokenizer_cfg.num_frames)
    with torch.device('meta'):
        return build_dit(**dit_config_args(cfg), latent_shape=latent_shape,
                         cond_shape=(tokenizer_cfg.num_frames, 2))               # traj_xy: (x, y) per frame


def parameter_count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize('path', TOKENIZER_CONFIGS, ids=os.path.basename)
def test_every_tokenizer_config_builds(path):
    cfg = Config.fromfile(path)
    tokenizer = build_config_tokenizer(path)
    latent_shape = tokenizer.latent_shape(cfg.num_frames)
    assert latent_shape[0] == cfg.model.latent_channels
    assert latent_shape[1:] == tuple(size // factor for size, factor in zip((cfg.num_frames, *GRID_SHAPE[:2]),
                                                                             cfg.model.downsample))


def test_faithful_tokenizer_has_upstreams_parameter_count():
    assert parameter_count(build_config_tokenizer(os.path.join(CONFIG_DIR, 'train_vqvae.py'))) == 137_369_744


@pytest.mark.parametrize('path', DIT_CONFIGS, ids=os.path.basename)
def test_every_dit_config_builds_for_its_tokenizers_latent(path):
    cfg = Config.fromfile(path)
    dit = build_config_dit(path)
    preset = {**DIT_MODELS[cfg.model], **cfg.model_overrides}                   # the config's preset, overridden
    assert dit.known_prefix == cfg.known_prefix.enabled and dit.class_dropout_prob == cfg.class_dropout_prob
    assert len(dit.blocks) == preset['depth'] and dit.pos_embed.shape[2] == preset['hidden_size']


def test_faithful_dit_has_upstreams_parameter_count():
    path = os.path.join(CONFIG_DIR, 'train_dit.py')
    assert parameter_count(build_config_dit(path, class_dropout_prob=0.0)) == 36_819_200
    # condition dropout adds the learned null trajectory: one 256-wide embedding
    assert parameter_count(build_config_dit(path)) == 36_819_200 + 256


def test_demo_dit_fits_the_demo_tokenizers_latent():
    # the two demo configs are used together by `make demo`: the DiT's patch must divide the tokenizer's latent
    tokenizer_cfg = Config.fromfile(os.path.join(CONFIG_DIR, 'demo_vqvae.py'))
    latent_shape = build_config_tokenizer(os.path.join(CONFIG_DIR, 'demo_vqvae.py')).latent_shape(
        tokenizer_cfg.num_frames)
    assert latent_shape == (16, 4, 100, 100)
    dit = build_config_dit(os.path.join(CONFIG_DIR, 'demo_dit.py'))
    assert dit.pos_embed.shape[1] == 4 * 10 * 10


@pytest.mark.parametrize('new_root', ['/mnt/occ3d/', '/mnt/occ3d'])
def test_cfg_options_data_root_moves_the_dataset_paths(new_root):
    """The configs compute their paths from data_root when read; overriding data_root must move them too (with or
    without the trailing '/'), and a path given in the same options wins."""
    parser = add_config_args(argparse.ArgumentParser(), os.path.join(CONFIG_DIR, 'showcase_vqvae.py'))
    cfg = load_config(parser.parse_args(['--cfg-options', f'data_root={new_root}',
                                         'dataset.val_pkl=/elsewhere/val.pkl']))
    assert cfg.data_root == '/mnt/occ3d/'
    assert cfg.dataset.train_pkl == '/mnt/occ3d/nuscenes_infos_train_temporal_v3_scene.pkl'
    assert cfg.dataset.common.gts_root == '/mnt/occ3d/nuscenes/gts'
    assert cfg.dataset.val_pkl == '/elsewhere/val.pkl'
    assert cfg.dataset.train.times == 50 and cfg.dataset.common.conditions == ('traj_xy',)   # the rest unchanged
