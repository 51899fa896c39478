"""Command-line plumbing shared by the scripts that read an mmengine python config."""
import argparse

from mmengine.config import Config, DictAction


def add_config_args(parser, default_config):
    """``--py-config`` (upstream's flag) and ``--cfg-options key=value ...`` (mmengine's override syntax)."""
    parser.add_argument('--py-config', default=default_config, help='mmengine python config file')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default={},
                        help='override config keys, e.g. --cfg-options max_epochs=2 model.hidden_channels=64')
    return parser


def load_config(args):
    """The config named by ``args.py_config`` with ``args.cfg_options`` merged in."""
    cfg = Config.fromfile(args.py_config)
    cfg.merge_from_dict(args.cfg_options)
    return cfg


def config_parser(description, default_config='config/train_vqvae.py'):
    """An ArgumentParser with the config arguments and upstream's ``--work-dir``."""
    parser = argparse.ArgumentParser(description=description)
    add_config_args(parser, default_config)
    parser.add_argument('--work-dir', default='out/vqvae', help='run directory of the tokenizer')
    return parser
