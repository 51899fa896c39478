"""JSON written by the scripts stays valid: NaN and infinities become null with their paths as the reason."""
import json

import pytest

from utils.run_log import MetricsWriter, json_text


def strict_loads(text):
    def refuse(constant):
        raise ValueError(f'invalid JSON constant {constant}')
    return json.loads(text, parse_constant=refuse)


def test_non_finite_numbers_become_null_with_their_paths():
    record = {'iou': float('nan'), 'per_frame': [1.5, float('-inf')], 'nested': {'ok': 2, 'bad': float('inf')}}
    parsed = strict_loads(json_text(record))
    assert parsed == {'iou': None, 'per_frame': [1.5, None], 'nested': {'ok': 2, 'bad': None},
                      'non_finite': {'iou': 'nan', 'per_frame[1]': '-inf', 'nested.bad': 'inf'}}
    assert strict_loads(json_text({'iou': 0.5})) == {'iou': 0.5}


def test_metrics_writer_writes_valid_lines_on_rank_0_only(tmp_path):
    path = tmp_path / 'metrics.jsonl'
    MetricsWriter(str(path), rank=0).write(step=1, loss=float('nan'))
    MetricsWriter(str(path), rank=1).write(step=2, loss=1.0)
    lines = path.read_text().splitlines()
    assert [strict_loads(line) for line in lines] == [{'step': 1, 'loss': None, 'non_finite': {'loss': 'nan'}}]


def test_resuming_drops_the_records_after_the_checkpoint_atomically(tmp_path):
    """A run killed at step 5 after its checkpoint of step 3: the resumed run starts from 3, so the records of
    steps 4 and 5 (and the half-written line the kill left) go before it appends its own."""
    path = tmp_path / 'metrics.jsonl'
    writer = MetricsWriter(str(path), rank=0)
    for step in range(1, 6):
        writer.write(step=step, loss=1.0 / step)
    writer.write(split='val', step=3, iou=50.0)
    with open(path, 'a') as f:
        f.write('{"step": 6, "lo')
    MetricsWriter(str(path), rank=1).drop_after(0)                   # other ranks leave the file alone
    writer.drop_after(3)
    assert [(r.get('split'), r['step']) for r in map(strict_loads, path.read_text().splitlines())] == [
        (None, 1), (None, 2), (None, 3), ('val', 3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ['metrics.jsonl']         # no temp file left
    writer.write(step=4, loss=0.3)
    assert [strict_loads(line)['step'] for line in path.read_text().splitlines()] == [1, 2, 3, 3, 4]
    MetricsWriter(str(tmp_path / 'absent.jsonl'), rank=0).drop_after(0)            # a fresh run: nothing to do


def test_a_damaged_metrics_line_is_named(tmp_path):
    path = tmp_path / 'metrics.jsonl'
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r'metrics.jsonl, line 2: not a JSON record with a "step"'):
        MetricsWriter(str(path), rank=0).drop_after(1)
    assert path.read_text() == '{"step": 1}\nnot json\n{"step": 2}\n'
