"""Rank-0 logging: a human log (stdout + a text file) and a JSON-lines metrics file in the run directory."""
import json
import logging
import math
import os
import sys

from utils.checkpoint import atomic_write

logger = logging.getLogger(__name__)


def create_logger(log_file, rank, name='occsora'):
    """A logger that writes ``[time] message`` to stdout and ``log_file`` on rank 0, and nothing elsewhere."""
    logger = logging.getLogger(f'{name}.{rank}')
    logger.handlers.clear()
    logger.propagate = False
    if rank != 0:
        logger.addHandler(logging.NullHandler())
        return logger
    os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
    formatter = logging.Formatter('[%(asctime)s] %(message)s', datefmt='%Y-%m-%d %H:%M:%S')
    for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(log_file)):
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    # Warnings of our own modules (e.g. scenes skipped by the dataset) go to the same places.
    for module_logger in (logging.getLogger('dataset'), logging.getLogger('model'), logging.getLogger('utils')):
        module_logger.handlers = logger.handlers
        module_logger.setLevel(logging.INFO)
    return logger


def json_text(record, indent=None):
    """JSON of ``record`` that is always valid: a NaN or infinite number becomes null, and the record gains
    'non_finite', the paths of those values with what they were ({'a.b': 'nan'}), as the reason for the null."""
    found = {}

    def clean(value, path):
        if isinstance(value, float) and not math.isfinite(value):
            found[path] = str(value)
            return None
        if isinstance(value, dict):
            return {key: clean(item, f'{path}.{key}' if path else str(key)) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(item, f'{path}[{i}]') for i, item in enumerate(value)]
        return value

    cleaned = clean(record, '')
    if found:
        cleaned['non_finite'] = found
    return json.dumps(cleaned, indent=indent, allow_nan=False)


class MetricsWriter:
    """Appends one JSON object per line to ``path`` (rank 0 only; a no-op on other ranks). Every record has a
    'step'; ``drop_after`` makes a resumed run continue the file without repeating steps."""

    def __init__(self, path, rank):
        self.path = path if rank == 0 else None

    def drop_after(self, step):
        """Remove the records of steps after ``step`` (the resumed checkpoint's), atomically: a run killed after
        its last checkpoint logged steps that the resumed run logs again. A cut-off last line (a writer killed
        mid-line) goes too; any other line that is not a record of this writer is an error naming the file."""
        if self.path is None or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = f.read().splitlines()
        kept = []
        for number, line in enumerate(lines, 1):
            try:
                record_step = json.loads(line)['step']
            except (ValueError, KeyError, TypeError) as error:
                if number == len(lines) and isinstance(error, ValueError):
                    logger.warning(f'{self.path}: dropped its cut-off last line {line[:80]!r}')
                    continue
                raise ValueError(f'{self.path}, line {number}: not a JSON record with a "step" '
                                 f'({type(error).__name__}: {error})') from error
            if record_step <= step:
                kept.append(line + '\n')
        if len(kept) < len(lines):
            atomic_write(self.path, lambda f: f.write(''.join(kept).encode()))

    def write(self, **record):
        if self.path is None:
            return
        with open(self.path, 'a') as f:
            f.write(json_text(record) + '\n')
