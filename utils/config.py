"""Command-line plumbing shared by the scripts that read an mmengine python config."""
import argparse

from mmengine.config import Config, DictAction


def add_config_args(parser, default_config):
    """``--py-config`` (upstream's flag) and ``--cfg-options key=value ...`` (mmengine's override syntax)."""
    parser.add_argument('--py-config', default=default_config, help='mmengine python config file')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default={},
                        help='override config keys, e.g. --cfg-options max_epochs=2 model.hidden_channels=64')
    return parser


def moved_paths(value, old_root, new_root):
    """``value`` with every string in it (dict values, list and tuple items) that starts with ``old_root`` moved
    under ``new_root``."""
    if isinstance(value, str) and value.startswith(old_root):
        return new_root + value[len(old_root):]
    if isinstance(value, dict):
        return {key: moved_paths(item, old_root, new_root) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(moved_paths(item, old_root, new_root) for item in value)
    return value


def load_config(args):
    """The config named by ``args.py_config`` with ``args.cfg_options`` merged in.

    The configs build their dataset paths as ``data_root + '...'`` when the file is read, so ``data_root=DIR``
    alone would change nothing else: it also moves every path that starts with the config's own data_root under
    DIR (a '/' is added to DIR when the config's root ends with one). A path given in the same --cfg-options wins.
    """
    cfg = Config.fromfile(args.py_config)
    options = dict(args.cfg_options)
    if 'data_root' in options and isinstance(cfg.get('data_root'), str):
        old_root, new_root = cfg.data_root, str(options['data_root'])
        if old_root.endswith('/') and not new_root.endswith('/'):
            new_root += '/'
        cfg = Config(moved_paths(cfg.to_dict(), old_root, new_root), filename=cfg.filename)
        options['data_root'] = new_root
    cfg.merge_from_dict(options)
    return cfg


def config_parser(description, default_config='config/train_vqvae.py'):
    """An ArgumentParser with the config arguments and upstream's ``--work-dir``."""
    parser = argparse.ArgumentParser(description=description)
    add_config_args(parser, default_config)
    parser.add_argument('--work-dir', default='out/vqvae', help='run directory of the tokenizer')
    return parser
