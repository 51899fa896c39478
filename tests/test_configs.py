"""Every config file loads, agrees with dataset/constants.py, and accepts --cfg-options overrides."""
import argparse
import glob
import os

import pytest
from mmengine.config import Config

from dataset.constants import GRID_SHAPE, NUM_CLASSES
from utils.config import add_config_args, load_config

CONFIG_DIR = os.path.join(os.path.dirname(__file__), '..', 'config')
CONFIGS = sorted(glob.glob(os.path.join(CONFIG_DIR, '*.py')))


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


def test_demo_dit_fits_the_demo_tokenizers_latent():
    # the two demo configs are used together by `make demo`: the DiT's patch must divide the tokenizer's latent
    from model.dit import build_dit, dit_config_args
    from model.tokenizer import build_tokenizer

    tokenizer_cfg = Config.fromfile(os.path.join(CONFIG_DIR, 'demo_vqvae.py'))
    dit_cfg = Config.fromfile(os.path.join(CONFIG_DIR, 'demo_dit.py'))
    latent_shape = build_tokenizer(tokenizer_cfg.model).latent_shape(tokenizer_cfg.num_frames)
    assert latent_shape == (16, 2, 50, 50)
    dit = build_dit(**dit_config_args(dit_cfg), latent_shape=latent_shape,
                    cond_shape=(tokenizer_cfg.num_frames, 2))                     # traj_xy: (x, y) per frame
    assert dit.pos_embed.shape[1] == 2 * 25 * 25
