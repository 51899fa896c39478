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
