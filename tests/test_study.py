"""evaluation.study on the tiny pipeline runs of tests/pipeline_fixtures.py: two guidance settings sampled, evaluated and
tabulated."""
import json
import os

import torch

from evaluation.occ_features import OccFeatureEncoder
from evaluation.study import main
from tests.pipeline_fixtures import NUM_FRAMES, REPO
from tests.pipeline_fixtures import dit_run, token_dir, tokenizer_config, tokenizer_run, world  # noqa: F401
from utils.checkpoint import atomic_save


def test_study_samples_evaluates_and_tabulates(dit_run, tokenizer_config, tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    features = str(tmp_path / 'features.pt')
    atomic_save({'model': OccFeatureEncoder(width=8, feature_dim=16).state_dict(),
                 'model_args': {'width': 8, 'feature_dim': 16}, 'training': {'num_frames': NUM_FRAMES}}, features)
    monkeypatch.chdir(REPO)
    out_dir = tmp_path / 'study'
    main(['--ckpt', os.path.join(dit_run, 'checkpoints', 'latest.pt'), '--features', features,
          '--reference-config', tokenizer_config, '--out-dir', str(out_dir), '--num-samples', '2',
          '--settings', 'ddim50-cfg1', 'ddim50-cfg4'])
    table = capsys.readouterr().out.strip().splitlines()[-4:]
    assert table[0].startswith('| setting | s/sample | ADE matched (m) | ADE shuffled (m) | Fréchet')
    assert [row.split(' | ')[0] for row in table[2:]] == ['| ddim50-cfg1', '| ddim50-cfg4']
    study = json.loads((out_dir / 'study.json').read_text())
    assert list(study) == ['ddim50-cfg1', 'ddim50-cfg4']
    for name, result in study.items():
        assert (out_dir / f'{name}.npz').is_file() and (out_dir / f'{name}.json').is_file()
        assert result['num_samples'] == 2 and result['seconds_per_sample'] > 0
        for key in ('adherence_ade_m', 'shuffled_adherence_ade_m', 'frechet_distance', 'mmd'):
            assert isinstance(result[key], float), (name, key)
    assert study['ddim50-cfg4']['setting'] == {'sampler': 'ddim', 'steps': 50, 'cfg_scale': 4.0}
