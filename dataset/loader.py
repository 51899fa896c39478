"""DataLoader construction shared by every script: one sampler for one process or torchrun.

The sampler is always a DistributedSampler (with one replica when torch.distributed is not initialised),
so shuffling is a seeded permutation per epoch and a run stopped mid-epoch resumes at the same sample.
"""
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from dataset.clips import OccClipDataset


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can skip the first ``start_index`` samples of its next pass (resume mid-epoch).

    Unshuffled without drop_last (validation, step02) every sample is visited exactly once over all processes:
    rank r takes samples r, r + W, ... with no padding, so results do not depend on the number of processes W
    (DistributedSampler would repeat samples to give every rank the same count). Training keeps that padding,
    which DDP needs for an equal number of steps on every rank.
    """

    def __init__(self, dataset, shuffle, seed, drop_last, num_replicas=None, rank=None):
        distributed = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if distributed else 1
        if rank is None:
            rank = dist.get_rank() if distributed else 0
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.start_index = 0

    def set_start_index(self, start_index):
        """Skip this many of this rank's samples in the next pass only."""
        self.start_index = start_index

    def _each_once(self):
        return not self.shuffle and not self.drop_last

    def __iter__(self):
        if self._each_once():
            indices = list(range(self.rank, len(self.dataset), self.num_replicas))
        else:
            indices = list(super().__iter__())
        indices = indices[self.start_index:]
        self.start_index = 0
        return iter(indices)

    def __len__(self):
        return len(range(self.rank, len(self.dataset), self.num_replicas)) if self._each_once() else super().__len__()


def build_dataset(cfg, split, **overrides):
    """The clip dataset of ``split`` ('train' or 'val') from a config's ``dataset`` dict."""
    kwargs = dict(cfg.dataset.common, info_pkl=cfg.dataset[f'{split}_pkl'], **cfg.dataset[split])
    kwargs.update(overrides)
    return OccClipDataset(**kwargs)


def build_loader(dataset, batch_size, shuffle, seed=0, num_workers=0, drop_last=False):
    """A DataLoader over ``dataset`` whose sampler is a ResumableSampler (per-rank batch size ``batch_size``)."""
    sampler = ResumableSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    # The loader's own generator keeps it from drawing on the global RNG, so a resumed run repeats the
    # global random stream (timesteps, noise, dropout) of an uninterrupted one.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available(), drop_last=drop_last, persistent_workers=False,
                      generator=torch.Generator().manual_seed(seed))


def set_epoch(loader, epoch):
    """Reshuffle the sampler and redraw random clip starts for ``epoch``."""
    loader.sampler.set_epoch(epoch)
    loader.dataset.set_epoch(epoch)
