"""Loaders of our checkpoints (train_1.py: load_tokenizer, train_2.py: load_dit) and of what a trained DiT needs to
turn noise into occupancy, from its checkpoint alone.

The stages talk through files: a train_2.py checkpoint records its token dir (``data_path``), whose meta.json names
the tokenizer checkpoint (``tokenizer.checkpoint``, relative to the token dir), whose stored config names the
dataset. ``load_pipeline`` follows that chain once for sample.py and the evaluation alike:

    checkpoint -> DiT (EMA weights) -> token dir -> meta.json -> tokenizer -> LatentCodec (latent scaling)
"""
import dataclasses
import os
import warnings

from mmengine.config import Config

from dataset.tokens import LatentCodec, load_meta
from model.dit import DiT, build_dit
from model.tokenizer import OccTokenizer, build_tokenizer
from utils.checkpoint import file_sha256, load_checkpoint


def load_tokenizer(checkpoint_path, device='cpu'):
    """The tokenizer of a train_1.py checkpoint, rebuilt from the model config stored in it, loaded strictly and
    in eval mode; returns (tokenizer, checkpoint dict)."""
    checkpoint = load_checkpoint(checkpoint_path, ('model', 'model_config', 'step'))
    tokenizer = build_tokenizer(checkpoint['model_config'])
    tokenizer.load_state_dict(checkpoint['model'])
    return tokenizer.to(device).eval(), checkpoint


def load_dit(ckpt, no_ema=False, device='cpu'):
    """(DiT in eval mode, checkpoint) of a train_2.py checkpoint, EMA weights unless ``no_ema``."""
    checkpoint = load_checkpoint(ckpt, ('model', 'ema', 'model_args', 'args', 'data_path'))
    model = build_dit(**checkpoint['model_args'])
    model.load_state_dict(checkpoint['model' if no_ema else 'ema'])
    return model.to(device).eval(), checkpoint


def tokenizer_dataset_config(tokenizer_checkpoint, override=None):
    """The dataset config: the file ``override``, or the config train_1.py stored in its checkpoint as plain data
    (a dict of numbers, strings, lists and dicts; never Python text, which mmengine would execute)."""
    if override:
        return Config.fromfile(override)
    config = tokenizer_checkpoint.get('config')
    if not isinstance(config, dict):
        raise ValueError("the tokenizer checkpoint holds no 'config' dict naming its dataset (checkpoints of older "
                         'versions store it as Python text, which is not executed): pass --py-config')
    return Config(config)


@dataclasses.dataclass
class Pipeline:
    """A trained DiT with everything its samples need: see ``load_pipeline``."""
    dit: DiT                       # eval mode, on ``device``
    checkpoint: dict               # the train_2.py checkpoint: model_args, args (its command line), data_path, ...
    token_dir: str
    meta: dict                     # the token dir's meta.json
    tokenizer: OccTokenizer        # eval mode, on ``device``
    tokenizer_checkpoint: dict     # the train_1.py checkpoint: model_config, config (its dataset), step
    codec: LatentCodec             # DiT space <-> the tokenizer's latents, as train_2.py scaled them

    @property
    def train_args(self):
        """train_2.py's arguments: condition, latent_scaling, diffusion, ..."""
        return self.checkpoint['args']

    def dataset_config(self, override=None):
        """The config of the dataset the tokenizer was trained on (or the file ``override``)."""
        return tokenizer_dataset_config(self.tokenizer_checkpoint, override)


def load_pipeline(ckpt, data_path=None, no_ema=False, device='cpu', allow_tokenizer_mismatch=False):
    """The Pipeline of train_2.py checkpoint ``ckpt``: its DiT (EMA weights unless ``no_ema``), its token dir
    (``data_path`` overrides the one recorded in the checkpoint), meta.json, the tokenizer meta.json names, and the
    codec with the checkpoint's latent scaling.

    The tokenizer file must be the one the tokens were made with (meta.json's sha256): another one (say, train_1.py
    trained on and overwrote its latest.pth) decodes the DiT's latents into something else. That is an error, or a
    warning with ``allow_tokenizer_mismatch``."""
    dit, checkpoint = load_dit(ckpt, no_ema, device)
    token_dir = data_path or checkpoint['data_path']
    meta = load_meta(token_dir)
    tokenizer_path = os.path.normpath(os.path.join(token_dir, meta['tokenizer']['checkpoint']))
    if os.path.isfile(tokenizer_path) and file_sha256(tokenizer_path) != meta['tokenizer']['sha256']:
        message = (f'{tokenizer_path} is not the tokenizer checkpoint the tokens in {token_dir} were made with '
                   f'(sha256 {meta["tokenizer"]["sha256"][:12]}... in meta.json)')
        if not allow_tokenizer_mismatch:
            raise ValueError(message + '; re-run step02.py and train_2.py, or pass --allow-tokenizer-mismatch')
        warnings.warn(message)
    tokenizer, tokenizer_checkpoint = load_tokenizer(tokenizer_path, device)
    codec = LatentCodec(token_dir, checkpoint['args']['latent_scaling'], device)
    return Pipeline(dit=dit, checkpoint=checkpoint, token_dir=token_dir, meta=meta, tokenizer=tokenizer,
                    tokenizer_checkpoint=tokenizer_checkpoint, codec=codec)
