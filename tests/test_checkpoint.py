"""Checkpoints are written atomically and loaded strictly."""
import os

import pytest
import torch

from utils.checkpoint import atomic_save, atomic_write, load_checkpoint


def test_round_trip_and_required_keys(tmp_path):
    path = str(tmp_path / 'ckpt.pt')
    atomic_save({'model': {'w': torch.ones(2)}, 'step': 3}, path)
    assert load_checkpoint(path, ('model', 'step'))['step'] == 3
    with pytest.raises(KeyError, match="lacks key\\(s\\) \\['ema'\\]"):
        load_checkpoint(path, ('model', 'ema'))
    with pytest.raises(FileNotFoundError, match='absent.pt'):
        load_checkpoint(str(tmp_path / 'absent.pt'))


def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path):
    text = tmp_path / 'notes.txt'
    text.write_text('not a checkpoint\n')
    with pytest.raises(ValueError, match='notes.txt: not a readable checkpoint'):
        load_checkpoint(str(text))
    truncated = tmp_path / 'truncated.pt'
    atomic_save({'step': 1, 'model': {'w': torch.ones(1000)}}, str(truncated))
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(ValueError, match='truncated.pt: not a readable checkpoint'):
        load_checkpoint(str(truncated))
    listed = tmp_path / 'list.pt'
    torch.save([1, 2], listed)
    with pytest.raises(ValueError, match=r'list.pt: not a checkpoint of this project \(holds a list'):
        load_checkpoint(str(listed))


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    path = str(tmp_path / 'latest.pt')
    atomic_save({'step': 1}, path)

    def crash_midway(f):
        f.write(b'partial bytes')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, crash_midway)
    assert load_checkpoint(path)['step'] == 1
    assert os.listdir(tmp_path) == ['latest.pt']


def plant(value, command):
    """``value`` with every string inside it (dict values, list and tuple items) replaced by ``command``."""
    if isinstance(value, str):
        return command
    if isinstance(value, dict):
        return {key: plant(item, command) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plant(item, command) for item in value)
    return value


def test_loading_a_checkpoint_never_runs_code_planted_in_it(tokenizer_run, tmp_path):
    """Every string field of a train_1.py checkpoint (and its config as the Python text older versions stored)
    carries a command; building the tokenizer and its dataset config from it must not run it."""
    from model.pipeline import load_tokenizer, tokenizer_dataset_config
    marker = tmp_path / 'ran'
    command = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    checkpoint = load_checkpoint(os.path.join(tokenizer_run, 'latest.pth'))
    assert isinstance(checkpoint['config'], dict)                       # plain data, not Python text
    assert tokenizer_dataset_config(checkpoint).dataset.val_pkl.endswith('nuscenes_infos_val_temporal_v3_scene.pkl')
    planted = {key: plant(value, command) for key, value in checkpoint.items()}
    path = str(tmp_path / 'planted.pth')
    atomic_save(planted, path)
    with pytest.raises(ValueError, match='latent_type'):
        load_tokenizer(path)                       # a planted string is rejected as a config value, not run
    tokenizer_dataset_config(load_checkpoint(path))                    # strings are kept as strings
    text = dict(checkpoint, config=f'{command}\ndata_root = "x"')
    with pytest.raises(ValueError, match='not executed'):
        tokenizer_dataset_config(text)
    assert not marker.exists()
