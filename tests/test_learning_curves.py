"""evaluation.learning_curves: the validation records of a train_1.py run as table rows and a plot."""
import json
import subprocess
import sys

import pytest

from evaluation.learning_curves import curve_rows, read_validations, weakest_classes

RECORDS = [
    {'split': 'train', 'step': 1, 'loss': 3.0},
    {'split': 'val', 'step': 2, 'train_minutes': 0.5, 'iou': 40.0, 'miou': 10.0,
     'class_iou': {'car': 5.0, 'bus': None, 'vegetation': 30.0},
     'class_share': {'car': 0.2, 'bus': 0.0, 'vegetation': 0.8}},
    {'split': 'val', 'step': 4, 'train_minutes': 1.25, 'iou': 60.0, 'miou': 20.0,
     'class_iou': {'car': 25.0, 'bus': 0.0, 'vegetation': 15.0},
     'class_share': {'car': 0.2, 'bus': 0.005, 'vegetation': 0.795}},
]


@pytest.fixture
def run(tmp_path):
    with open(tmp_path / 'metrics.jsonl', 'w') as f:
        f.write(''.join(json.dumps(r) + '\n' for r in RECORDS))
    return tmp_path


def test_rows_hold_each_validation_and_its_weakest_frequent_classes(run):
    validations = read_validations(str(run))
    assert [r['step'] for r in validations] == [2, 4]
    assert weakest_classes(validations[1], ['car', 'vegetation'], count=1) == [(15.0, 'vegetation')]
    rows = curve_rows('a', validations, ['car', 'vegetation'])
    assert rows == ['| a | 2 | 0.5 | 40.0 | 10.0 | car 5.0, vegetation 30.0 |',
                    '| a | 4 | 1.2 | 60.0 | 20.0 | vegetation 15.0, car 25.0 |']


def test_command_line_leaves_rare_classes_out_and_plots(run, tmp_path):
    plot = tmp_path / 'curve.png'
    result = subprocess.run([sys.executable, '-m', 'evaluation.learning_curves', str(run), '--names', 'a',
                             '--plot', str(plot)], capture_output=True, text=True, check=True)
    assert '| a | 4 | 1.2 | 60.0 | 20.0 | vegetation 15.0, car 25.0 |' in result.stdout     # bus: 0.5 % < 1 %
    assert plot.stat().st_size > 0


def test_a_dir_without_validations_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match='no metrics.jsonl'):
        read_validations(str(tmp_path))
    (tmp_path / 'metrics.jsonl').write_text(json.dumps(RECORDS[0]) + '\n')
    with pytest.raises(ValueError, match='no validation record'):
        read_validations(str(tmp_path))
