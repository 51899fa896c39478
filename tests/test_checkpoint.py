"""Checkpoints are written atomically and loaded strictly."""
import os

import pytest
import torch

from tests.pipeline import temp_files
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


def test_the_temp_file_is_on_disk_before_the_rename(tmp_path, monkeypatch):
    """fsync of the temp file, then the rename, then fsync of the directory: a power cut after the rename cannot
    leave ``path`` naming a file whose bytes never reached the disk."""
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(('fsync', os.fstat(fd).st_ino))
        real_fsync(fd)

    def replace(source, target):
        events.append(('replace', os.stat(source).st_ino))
        real_replace(source, target)

    monkeypatch.setattr(os, 'fsync', fsync)
    monkeypatch.setattr(os, 'replace', replace)
    path = tmp_path / 'latest.pt'
    atomic_save({'step': 1}, str(path))
    assert [name for name, _ in events] == ['fsync', 'replace', 'fsync']
    assert events[0][1] == events[1][1] and events[2][1] == os.stat(tmp_path).st_ino     # temp file, then directory
    assert load_checkpoint(str(path))['step'] == 1


def killed_writer(path):
    """Start writing ``path`` with atomic_write in a child process that dies midway (os._exit skips every clean-up,
    as SIGKILL or a power cut would), leaving its temp file behind."""
    pid = os.fork()
    if pid == 0:
        try:
            atomic_write(path, lambda f: (f.write(b'partial bytes'), f.flush(), os._exit(0)))
        finally:
            os._exit(1)                            # never return into the test runner
    assert os.waitpid(pid, 0)[1] == 0


def test_temp_files_of_a_killed_writer_are_removed_by_the_next_write(tmp_path):
    latest, other = str(tmp_path / 'latest.pt'), str(tmp_path / 'other.pt')
    atomic_save({'step': 1}, latest)
    killed_writer(latest)
    killed_writer(other)
    assert len(temp_files(tmp_path)) == 2
    atomic_save({'step': 2}, latest)
    assert load_checkpoint(latest)['step'] == 2
    # the killed write of latest.pt is gone; other.pt's stays until other.pt is written again
    remaining = temp_files(tmp_path)
    assert len(remaining) == 1 and os.path.basename(remaining[0]).startswith('.tmp-other.pt.')
    atomic_save({'step': 1}, other)
    assert temp_files(tmp_path) == [] and sorted(os.listdir(tmp_path)) == ['latest.pt', 'other.pt']


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
