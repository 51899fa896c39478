"""JSON written by the scripts stays valid: NaN and infinities become null with their paths as the reason."""
import json

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
