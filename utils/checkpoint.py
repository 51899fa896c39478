"""Atomic, self-describing checkpoints: a crash, kill or power cut never leaves a half-written file (write to a
temp file in the same directory, flush it to disk, then rename), and loading is strict."""
import hashlib
import os
import re
import tempfile

import torch


def temp_file_pattern(path):
    """The names atomic_write gives its temp files for ``path``: '.tmp-<name>.<random><extension>'."""
    name = os.path.basename(path)
    return re.compile(re.escape(f'.tmp-{name}.') + r'[a-z0-9_]+' + re.escape(os.path.splitext(name)[1]))


def atomic_write(path, write):
    """Call ``write(binary_file)`` on a temp file next to ``path``, fsync it, then rename it to ``path``.

    Temp files of ``path`` left by an earlier writer that was killed (SIGKILL or a power cut skip the clean-up) are
    removed first: each file of this project has a single writer at a time (rank 0, or the one rank that owns it)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    orphan = temp_file_pattern(path)
    for name in os.listdir(directory):
        if orphan.fullmatch(name):
            os.unlink(os.path.join(directory, name))
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=f'.tmp-{os.path.basename(path)}.',
                                    suffix=os.path.splitext(path)[1])
    try:
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())                   # the bytes are on disk before the name points at them
        os.replace(tmp_path, path)
    except BaseException:
        os.unlink(tmp_path)
        raise
    directory_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(directory_fd)                     # and so is the rename
    finally:
        os.close(directory_fd)


def atomic_save(obj, path):
    """torch.save ``obj`` to ``path`` atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path, required_keys=()):
    """Load one of our own checkpoints on the CPU; raise a clear error when it is missing or incomplete."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint not found: {path}')
    # Our checkpoints hold only tensors, numbers, strings, lists and dicts, so the safe loader suffices.
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as error:                     # truncated, not a torch file, or a pickle that would run code
        raise ValueError(f'{path}: not a readable checkpoint of this project ({type(error).__name__}: '
                         f'{str(error).splitlines()[0] if str(error) else ""})') from error
    if not isinstance(checkpoint, dict):
        raise ValueError(f'{path}: not a checkpoint of this project (holds a {type(checkpoint).__name__}, not a dict)')
    missing = [k for k in required_keys if k not in checkpoint]
    if missing:
        raise KeyError(f'{path}: checkpoint lacks key(s) {missing}, has {sorted(checkpoint)}')
    return checkpoint


def file_sha256(path):
    """Hex sha256 of a file's bytes (identifies the checkpoint a derived file was made from)."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()
