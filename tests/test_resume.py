"""A resumed run names every config key that differs from its checkpoint's, and applies new hyperparameters to an
optimiser whose moments come from the checkpoint."""
import pytest
import torch

from utils.resume import check_resume_config, config_changes, load_optimizer_state

SAVED = {'lr': 1e-3, 'optimizer': {'betas': [0.9, 0.999]}, 'log_every': 10, 'data_path': '/runs/a/tokens'}


def test_config_changes_name_each_key_with_its_old_and_new_value():
    current = {'lr': 1e-4, 'optimizer': {'betas': (0.9, 0.999)}, 'log_every': 10, 'data_path': '/runs/b/tokens',
               'new_key': 1}
    assert config_changes(SAVED, current) == [('data_path', '/runs/a/tokens', '/runs/b/tokens'), ('lr', 1e-3, 1e-4),
                                              ('new_key', '<absent>', 1)]           # a tuple equals its list


def test_a_resume_with_another_config_is_refused_unless_allowed():
    current = {**SAVED, 'lr': 1e-4, 'log_every': 100, 'optimizer': {'betas': (0.5, 0.999)}}
    with pytest.raises(ValueError, match=r"ckpt.pt: .*trained with: lr 0.001 -> 0.0001; optimizer.betas "
                                         r"\[0.9, 0.999\] -> \[0.5, 0.999\]\. .*--allow-config-changes"):
        check_resume_config('ckpt.pt', SAVED, current, ('log_every',), allow_changes=False)
    assert check_resume_config('ckpt.pt', SAVED, current, ('log_every', 'optimizer.betas'), allow_changes=True) == [
        'lr 0.001 -> 0.0001']                      # free keys are dotted names
    assert check_resume_config('ckpt.pt', SAVED, current, ('log_every',), allow_changes=True) == [
        'lr 0.001 -> 0.0001', 'optimizer.betas [0.9, 0.999] -> [0.5, 0.999]']
    assert check_resume_config('ckpt.pt', SAVED, {**SAVED, 'log_every': 1}, ('log_every',), False) == []
    with pytest.raises(ValueError, match='records no config'):
        check_resume_config('ckpt.pt', "lr = 1e-3\n", SAVED, (), allow_changes=False)


def test_load_optimizer_state_keeps_the_moments_and_takes_the_new_hyperparameters():
    weight = torch.nn.Parameter(torch.ones(3))
    old = torch.optim.AdamW([weight], lr=1e-3, weight_decay=0.01)
    weight.grad = torch.ones(3)
    old.step()
    new = torch.optim.AdamW([weight], lr=5e-4, weight_decay=0.0)
    load_optimizer_state(new, old.state_dict())
    assert new.param_groups[0]['lr'] == 5e-4 and new.param_groups[0]['weight_decay'] == 0.0
    assert torch.equal(new.state[weight]['exp_avg'], old.state[weight]['exp_avg'])
    assert new.state_dict()['param_groups'][0]['lr'] == 5e-4            # what the next checkpoint records
