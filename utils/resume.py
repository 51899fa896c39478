"""Resuming tells the truth: a run resumed with a config that differs from its checkpoint's either refuses, naming
every differing key with its old and new value, or (with the scripts' ``--allow-config-changes``) applies the new
values, which the next checkpoints then record. Keys that do not change what is trained (logging and checkpoint
frequency, the step limit, loader workers) may change freely; each script lists its own."""

ABSENT = '<absent>'            # shown for a key that one of the two configs lacks


def flat_config(config, prefix=''):
    """{'a.b.c': value} of a nested config dict; tuples become lists, as a checkpoint may store either."""
    flat = {}
    for key, value in config.items():
        name = f'{prefix}{key}'
        if isinstance(value, dict):
            flat.update(flat_config(value, f'{name}.'))
        else:
            flat[name] = list(value) if isinstance(value, tuple) else value
    return flat


def config_changes(saved, current):
    """[(key, saved value, current value)] of every dotted key whose value differs, sorted by key."""
    saved, current = flat_config(saved), flat_config(current)
    return [(key, saved.get(key, ABSENT), current.get(key, ABSENT)) for key in sorted(saved.keys() | current.keys())
            if saved.get(key, ABSENT) != current.get(key, ABSENT)]


def check_resume_config(checkpoint_path, saved, current, free_keys, allow_changes):
    """The changes of ``current`` against the checkpoint's config ``saved`` (both nested dicts) that are not in
    ``free_keys`` (dotted names), as 'key old -> new' lines to log.

    Raises ValueError listing them unless ``allow_changes``: resuming must not quietly keep the old values (an
    optimiser state holds the old learning rate) nor quietly take the new ones."""
    if isinstance(saved, dict):
        changes = [f'{key} {old!r} -> {new!r}' for key, old, new in config_changes(saved, current)
                   if key not in free_keys]
    else:                                          # older versions stored the config as Python text
        changes = ['the checkpoint records no config to compare with (older versions stored it as text)']
    if changes and not allow_changes:
        raise ValueError(f'{checkpoint_path}: this config differs from the one the checkpoint was trained with: '
                         + '; '.join(changes) + '. Resume with the checkpoint\'s values, or pass '
                         '--allow-config-changes to apply the new ones (the next checkpoints record them)')
    return changes


def load_optimizer_state(optimizer, state):
    """Load the checkpoint's optimiser ``state`` (moments, step counts) but keep the hyperparameters the optimiser
    was built with from the current config (lr, weight decay, betas, ...): ``load_state_dict`` alone would bring
    back the checkpoint's."""
    hyperparameters = [{key: value for key, value in group.items() if key != 'params'}
                       for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, values in zip(optimizer.param_groups, hyperparameters):
        group.update(values)
