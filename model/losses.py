"""Stage-1 losses: upstream OccSora's 10 * cross-entropy + 1 * Lovasz-softmax + 1 * VQ (UPSTREAM.md §3.3).

Lovasz-softmax (Berman, Rannen Triki & Blaschko, CVPR 2018, arXiv 1705.08790) is the Lovasz extension of the
Jaccard loss: per class c, the errors |fg_c - p_c| sorted in decreasing order are dotted with the gradient of the
Jaccard loss along that order, and the class losses are averaged.
"""
import torch


@torch.no_grad()
def _lovasz_weights(probs_c, foreground):
    """Detached weights w (N,) and constant k such that the class-c Lovasz loss equals k + dot(probs_c, w).

    Because fg is 0 or 1 and p in [0, 1], the error |fg - p| equals fg + p * (1 - 2 fg): linear in p. The Lovasz
    extension is linear in the errors for a fixed sort order, so the class loss is dot(g, errors) with g the
    Jaccard gradient scattered back to voxel order; only w = g * (1 - 2 fg) (N,) is kept for the backward pass,
    instead of the sorted errors, the permutation and g.

    probs_c, foreground: (N,) float. Returns (w, k = dot(g, fg)).
    """
    errors = (foreground - probs_c).abs()
    order = errors.argsort(descending=True)
    fg_sorted = foreground[order]
    total = fg_sorted.sum()
    intersection = total - fg_sorted.cumsum(0)                 # foreground voxels not yet predicted
    union = total + (1.0 - fg_sorted).cumsum(0)                # foreground plus false positives so far
    jaccard_loss = 1.0 - intersection / union                  # Jaccard loss after the first i + 1 errors
    gradient_sorted = torch.cat([jaccard_loss[:1], jaccard_loss[1:] - jaccard_loss[:-1]])
    gradient = torch.empty_like(gradient_sorted).scatter_(0, order, gradient_sorted)   # back to voxel order
    return gradient * (1.0 - 2.0 * foreground), torch.dot(gradient, foreground)


def lovasz_softmax(probs, labels, classes='present'):
    """Lovasz-softmax loss over flattened voxels.

    Args:
        probs: (N, C) class probabilities (softmax output).
        labels: (N,) integer class ids in [0, C).
        classes: 'present' (classes occurring in ``labels``), 'all', or a list of class ids.

    Returns the mean of the per-class losses (a scalar; 0 when no class is selected, e.g. N = 0).
    """
    if probs.dim() != 2 or labels.shape != probs.shape[:1]:
        raise ValueError(f'lovasz_softmax expects probs (N, C) and labels (N,), got {tuple(probs.shape)} and '
                         f'{tuple(labels.shape)}')
    num_classes = probs.shape[1]
    if classes == 'present':
        selected = torch.unique(labels).tolist()
    elif classes == 'all':
        selected = list(range(num_classes))
    elif isinstance(classes, str):
        raise ValueError(f"classes must be 'present', 'all' or a list of class ids, got {classes!r}")
    else:
        selected = list(classes)
    losses = []
    for c in selected:
        foreground = (labels == c).to(probs.dtype)
        weights, const = _lovasz_weights(probs[:, c].detach(), foreground)
        losses.append(const + torch.dot(probs[:, c], weights))
    if not losses:
        return probs.sum() * 0.0          # keeps the graph, so backward works on an empty selection
    return torch.stack(losses).mean()


def tokenizer_loss(logits, target, vq_loss, ce_weight=10.0, lovasz_weight=1.0, vq_weight=1.0, mask=None):
    """Stage-1 training loss: ce_weight * CE + lovasz_weight * Lovasz-softmax + vq_weight * vq_loss.

    Args:
        logits: (B, T, X, Y, Z, C) decoder output (any float dtype; the losses are computed in fp32).
        target: (B, T, X, Y, Z) integer class ids.
        vq_loss: scalar quantizer loss.
        mask: optional (B, T, X, Y, Z) {0, 1}; only voxels with mask 1 count in CE and Lovasz (camera-mask-aware
            flag). None = every voxel, as upstream.

    Returns (total, {'ce', 'lovasz', 'vq'}): the components detached and unweighted (upstream's MultiLoss logs
    each component divided by its weight). CE is the mean over the counted voxels; Lovasz treats all of them as
    one image (upstream's per_image=False) with the classes present in the target, and is reported as 0 when
    lovasz_weight is 0 (it is then not computed).
    """
    if logits.dim() != 6 or target.shape != logits.shape[:-1]:
        raise ValueError(f'tokenizer_loss expects logits (B, T, X, Y, Z, C) and target (B, T, X, Y, Z), got '
                         f'{tuple(logits.shape)} and {tuple(target.shape)}')
    if mask is not None and mask.shape != target.shape:
        raise ValueError(f'tokenizer_loss: mask must have the target shape {tuple(target.shape)}, '
                         f'got {tuple(mask.shape)}')
    num_classes = logits.shape[-1]
    scores = logits.reshape(-1, num_classes)                                         # (N, C) view: classes last
    labels = target.reshape(-1).long()                                               # (N,)
    if mask is not None:
        keep = mask.reshape(-1).bool()
        scores, labels = scores[keep], labels[keep]                                  # (N_kept, C), (N_kept,)
    scores = scores.float()
    # CE as logsumexp - score of the label: the backward pass keeps the logits, which the caller holds anyway,
    # instead of a full (N, C) log-softmax; the probabilities are then the only extra full-size tensor.
    label_scores = scores.gather(1, labels[:, None])[:, 0]                           # (N,)
    ce = (torch.logsumexp(scores, dim=1) - label_scores).sum() / max(len(labels), 1)
    # A zero weight skips the Lovasz term altogether: it sorts every voxel once per class (the costly part on CPU).
    lovasz = lovasz_softmax(scores.softmax(dim=1), labels) if lovasz_weight else scores.new_zeros(())
    total = ce_weight * ce + lovasz_weight * lovasz + vq_weight * vq_loss
    return total, {'ce': ce.detach(), 'lovasz': lovasz.detach(), 'vq': vq_loss.detach()}
