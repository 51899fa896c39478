"""Codebook usage over a whole evaluation pass: how many codes are used and the perplexity of their histogram."""
import torch
import torch.distributed as dist

from utils.distributed import is_distributed


class CodebookUsage:
    """Accumulates a histogram of code indices; ``compute`` gives used codes and perplexity exp(H(p))."""

    def __init__(self, codebook_size, device):
        self.counts = torch.zeros(codebook_size, dtype=torch.int64, device=device)

    def update(self, indices):
        """indices: integer tensor of any shape with values in [0, codebook_size)."""
        self.counts += torch.bincount(indices.flatten(), minlength=len(self.counts))

    def all_reduce(self):
        if is_distributed():
            dist.all_reduce(self.counts)

    def compute(self):
        probs = self.counts.double() / self.counts.sum().clamp(min=1)
        entropy = -(probs * probs.clamp(min=1e-12).log()).sum()
        return {'used_codes': int((self.counts > 0).sum()), 'perplexity': float(entropy.exp())}
