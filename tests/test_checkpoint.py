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
