"""evaluation.study on the tiny pipeline runs of tests/conftest.py: two guidance settings sampled with the same
trajectories, evaluated and tabulated, and the table showing the values it is given."""
import json
import os

import numpy as np
import torch

from evaluation.occ_features import OccFeatureEncoder
from evaluation.study import COLUMNS, main, markdown_table
from tests.pipeline import NUM_FRAMES
from utils.checkpoint import atomic_save


def table_cells(line):
    """The cells of one Markdown table row."""
    return [cell.strip() for cell in line.strip().strip('|').split('|')]


def test_table_rows_carry_their_values():
    rows = {'a': {'seconds_per_sample': 12.345, 'adherence_ade_m': 0.5, 'shuffled_adherence_ade_m': 7.25,
                  'frechet_distance': 1.0, 'mmd': 0.01234, 'class_js_divergence': 0.2, 'static_consistency': 0.9876},
            'b': {'seconds_per_sample': 1.0, 'adherence_ade_m': None}}          # b: nothing else measured
    header, rule, first, second = markdown_table(rows).splitlines()
    assert table_cells(header) == ['setting'] + [title for title, _, _ in COLUMNS]
    assert rule.count('---') == 1 + len(COLUMNS)
    assert table_cells(first) == ['a', '12.3', '0.50', '7.25', '1.00', '0.0123', '0.200', '0.988']
    assert table_cells(second) == ['b', '1.0'] + ['—'] * (len(COLUMNS) - 1)


def test_study_samples_each_setting_under_the_same_trajectories_and_reports_its_metrics(
        dit_run, tokenizer_config, tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    features = str(tmp_path / 'features.pt')
    atomic_save({'model': OccFeatureEncoder(width=8, feature_dim=16).state_dict(),
                 'model_args': {'width': 8, 'feature_dim': 16}, 'training': {'num_frames': NUM_FRAMES}}, features)
    monkeypatch.chdir(tmp_path)                    # not the repository root: the study finds sample.py itself
    out_dir = tmp_path / 'study'
    main(['--ckpt', os.path.join(dit_run, 'checkpoints', 'latest.pt'), '--features', features,
          '--reference-config', tokenizer_config, '--out-dir', str(out_dir), '--num-samples', '2',
          '--settings', 'ddim50-cfg1', 'ddim50-cfg4'])
    study = json.loads((out_dir / 'study.json').read_text())
    assert list(study) == ['ddim50-cfg1', 'ddim50-cfg4']

    samples = {name: np.load(out_dir / f'{name}.npz') for name in study}
    for name, cfg_scale in (('ddim50-cfg1', 1.0), ('ddim50-cfg4', 4.0)):
        sample = samples[name]
        # sample.py ran with the setting's sampler and guidance on the val trajectories
        assert (str(sample['sampler']), int(sample['num_sampling_steps'])) == ('ddim', 50)
        assert float(sample['cfg_scale']) == cfg_scale and sample['occupancy'].shape[0] == 2
        assert study[name]['setting'] == {'sampler': 'ddim', 'steps': 50, 'cfg_scale': cfg_scale}
        # the row holds what evaluate measured on those samples, and the time of the run
        evaluated = json.loads((out_dir / f'{name}.json').read_text())
        assert {key: study[name][key] for key in evaluated} == evaluated
        assert evaluated['num_samples'] == 2 and study[name]['seconds_per_sample'] > 0
    # the settings are compared under the same trajectories and seed
    np.testing.assert_array_equal(samples['ddim50-cfg1']['traj'], samples['ddim50-cfg4']['traj'])
    assert int(samples['ddim50-cfg1']['seed']) == int(samples['ddim50-cfg4']['seed'])

    table = capsys.readouterr().out.strip().splitlines()[-2:]
    for line, (name, result) in zip(table, study.items()):
        assert table_cells(line) == [name] + ['—' if result.get(key) is None else fmt.format(result[key])
                                              for _, key, fmt in COLUMNS]
