"""Stage-1 losses: upstream OccSora's 10 * cross-entropy + 1 * Lovasz-softmax + 1 * VQ (upstream's
`MultiLoss` of `ReconLoss` and `LovaszLoss`, wzzheng/OccSora@9f8d1f0).

Lovasz-softmax (Berman, Rannen Triki & Blaschko, CVPR 2018, arXiv 1705.08790) is the Lovasz extension of the
Jaccard loss: per class c, the errors |fg_c - p_c| sorted in decreasing order are dotted with the gradient of the
Jaccard loss along that order, and the class losses are averaged.

A full clip has 20 M voxels, so the (B, T, X, Y, Z, 18) logits are the largest tensor of a training step. The
training loss (tokenizer_loss) therefore fuses CE and Lovasz into one autograd function that computes its gradient
during the forward pass into a single class-major fp32 buffer: besides the logits, that buffer is the only
full-size tensor it creates (no probabilities, one-hot targets or per-class gradients are kept).
"""
import torch

# Voxels per chunk when the loss walks over the logits: the chunk's fp32 (chunk, C) temporaries stay small
# (2^18 voxels x 18 classes x 4 bytes = 18 MiB) whatever the clip size.
CHUNK_VOXELS = 2 ** 18
# Keys of the descending sort: a non-negative float32's bit pattern, read as an int32, grows with its value, and
# errors lie below 2.0 (bits < 2^30), so 2^30 - 1 - bits is a non-negative int32 key in decreasing error order.
# Integer keys let torch use its parallel radix sort on the CPU (2-3x faster than a float sort).
_DESCENDING_KEY_OFFSET = 2 ** 30 - 1


def _descending_order(errors):
    """Permutation (N,) int64 that sorts ``errors`` (N,) >= 0 in decreasing order (ties in index order)."""
    if errors.dtype != torch.float32:
        return errors.argsort(descending=True, stable=True)
    keys = _DESCENDING_KEY_OFFSET - errors.view(torch.int32)                  # (N,) int32, same order reversed
    return keys.sort(stable=True).indices


@torch.no_grad()
def _lovasz_weights(probs_c, foreground):
    """Detached weights w (N,) and constant k such that the class-c Lovasz loss equals k + dot(probs_c, w).

    Because fg is 0 or 1 and p in [0, 1], the error |fg - p| equals fg + p * (1 - 2 fg): linear in p. The Lovasz
    extension is linear in the errors for a fixed sort order, so the class loss is dot(g, errors) with g the
    Jaccard gradient scattered back to voxel order, i.e. k = dot(g, fg) and w = g * (1 - 2 fg). The Jaccard losses
    come from integer counts in float64: in float32 the counts stop being exact past 2^24 voxels (a full clip
    has 20 M) and the consecutive differences (~1/N) drown in rounding. Temporaries are freed as soon as
    possible: they, not the result, set the loss's peak memory.

    probs_c: (N,) float class-c probabilities; foreground: (N,) bool, labels == c. Returns (w, k) in probs_c's dtype.
    """
    errors = torch.where(foreground, 1.0 - probs_c, probs_c)                 # (N,) |fg - p|
    order = _descending_order(errors)
    del errors
    fg_seen = foreground.index_select(0, order).cumsum(0, dtype=torch.int32)  # (N,) foreground so far, in order
    # Jaccard loss after the first i + 1 errors: 1 - (fg not yet seen) / (fg + false positives so far)
    ratio = (fg_seen[-1:] - fg_seen).double()                                # (N,) float64, fg not yet seen
    del fg_seen
    union = torch.arange(1, len(order) + 1, dtype=torch.float64, device=order.device).add_(ratio)
    ratio.div_(union)                                                        # 1 - Jaccard loss
    del union
    gradient_sorted = torch.empty(len(order), dtype=probs_c.dtype, device=order.device)
    torch.sub(ratio[:-1], ratio[1:], out=gradient_sorted[1:])                # Jaccard loss differences (>= 0)
    gradient_sorted[:1] = 1.0 - ratio[:1]
    del ratio
    weights = torch.empty_like(gradient_sorted).scatter_(0, order, gradient_sorted)   # g, back to voxel order
    del gradient_sorted, order
    const = weights[foreground].sum()                                        # dot(g, fg)
    weights[foreground] *= -1.0                                              # g * (1 - 2 fg)
    return weights, const


def _present_classes(labels, num_classes):
    """Class ids that occur in ``labels`` (N,): Lovasz-softmax averages over them (upstream's classes='present')."""
    return (torch.bincount(labels, minlength=num_classes) > 0).nonzero()[:, 0].tolist()


# ---------------------------------------------------------------------------------------------------------------
# Fused cross-entropy + Lovasz-softmax for training
# ---------------------------------------------------------------------------------------------------------------

def _chunks(num_voxels):
    return (slice(start, start + CHUNK_VOXELS) for start in range(0, num_voxels, CHUNK_VOXELS))


@torch.no_grad()
def _loss_and_gradient(scores, labels, keep, ce_weight, lovasz_weight, class_weights=None, with_gradient=True):
    """CE, Lovasz-softmax and the gradient of ce_weight * CE + lovasz_weight * Lovasz w.r.t. ``scores``.

    scores: (N, C) logits (any float dtype); labels: (N,) int64; keep: (N,) bool or None (every voxel counts);
    class_weights: (C,) float or None. With weights, CE is torch's weighted mean sum_i w_yi nll_i / sum_i w_yi.
    Returns (gradient (C, N) fp32, class-major, or None without ``with_gradient``; ce; lovasz), the losses as fp32
    scalars.

    With p = softmax(scores), the CE gradient is (p - onehot) / count. Lovasz is the mean over the present classes
    of k_c + dot(p_c, w_c) (see _lovasz_weights), whose gradient through the softmax is p_j * (w_j - s) / n with
    s = sum_c p_c w_c. The buffer first holds p (class rows, so each class sorts a contiguous row), then p_c w_c,
    and finally the gradient; p is recomputed from the scores and the saved log-sum-exp where it was overwritten.
    """
    num_voxels, num_classes = scores.shape
    buffer = scores.new_empty((num_classes, num_voxels), dtype=torch.float32)   # (C, N)
    log_norm = scores.new_empty(num_voxels, dtype=torch.float32)                # (N,) logsumexp per voxel
    ce_sum = scores.new_zeros((), dtype=torch.float64)
    for chunk in _chunks(num_voxels):
        x = scores[chunk].float()                                                # (n, C)
        log_norm[chunk] = torch.logsumexp(x, dim=1)
        nll = log_norm[chunk] - x.gather(1, labels[chunk, None])[:, 0]          # (n,) -log p(label)
        if class_weights is not None:
            nll = nll * class_weights[labels[chunk]]
        ce_sum += (nll if keep is None else nll[keep[chunk]]).sum(dtype=torch.float64)
        torch.sub(x.t(), log_norm[chunk], out=buffer[:, chunk]).exp_()          # (C, n) probabilities
    kept = None if keep is None else keep.nonzero()[:, 0]                        # (N_kept,) voxel ids
    kept_labels = labels if kept is None else labels.index_select(0, kept)
    count = len(kept_labels)
    if class_weights is not None:                       # the CE normaliser: sum of the kept voxels' weights
        count = float(torch.dot(torch.bincount(kept_labels, minlength=num_classes).double(), class_weights.double()))
    ce = (ce_sum / (count or 1)).float()

    # Lovasz: each present class's row becomes p_c w_c (absent classes: 0), summed into s
    classes = _present_classes(kept_labels, num_classes) if lovasz_weight else []
    prob_weight_sum = scores.new_zeros(num_voxels, dtype=torch.float32)          # (N,) s
    lovasz_sum = scores.new_zeros((), dtype=torch.float32)
    for c in range(num_classes):
        row = buffer[c]                                                          # (N,) p_c, contiguous
        if c not in classes:
            row.zero_()
            continue
        probs_c = row if kept is None else row.index_select(0, kept)             # (N_kept,)
        weights, const = _lovasz_weights(probs_c, kept_labels == c)
        lovasz_sum += const + torch.dot(probs_c, weights)
        if kept is None:
            row.mul_(weights)
        else:
            row.zero_().index_copy_(0, kept, probs_c * weights)
        prob_weight_sum += row
    lovasz = lovasz_sum / max(len(classes), 1)
    if not with_gradient:
        return None, ce, lovasz

    # gradient = lovasz_scale * (p_j w_j - p_j s) + ce_scale * (p - onehot), zero on voxels not kept; computed in
    # place, class-major, a chunk of voxels at a time
    lovasz_scale = lovasz_weight / max(len(classes), 1)
    ce_scale = ce_weight / (count or 1)
    for chunk in _chunks(num_voxels):
        gradient = buffer[:, chunk]                                              # (C, n) view
        probs = torch.sub(scores[chunk].t(), log_norm[chunk], out=torch.empty_like(gradient)).exp_()   # (C, n)
        gradient.mul_(lovasz_scale).addcmul_(probs, prob_weight_sum[chunk], value=-lovasz_scale)
        if class_weights is None:
            gradient.add_(probs, alpha=ce_scale)
            gradient.scatter_add_(0, labels[None, chunk], gradient.new_full((1, probs.shape[1]), -ce_scale))
        else:                                           # voxel i's CE gradient is scaled by w_yi
            voxel_scale = (class_weights[labels[chunk]] * ce_scale).float()[None]                # (1, n)
            gradient.addcmul_(probs, voxel_scale)
            gradient.scatter_add_(0, labels[None, chunk], -voxel_scale)
        if keep is not None:
            gradient.mul_(keep[chunk])
    return buffer, ce, lovasz


class _CrossEntropyLovasz(torch.autograd.Function):
    """ce_weight * CE + lovasz_weight * Lovasz-softmax of logits (..., C), gradient computed in the forward pass.

    forward(logits (..., C), labels (...) int64, keep (...) bool or None, ce_weight, lovasz_weight,
            class_weights (C,) or None) -> (weighted sum, ce, lovasz); only the weighted sum is differentiable.
    """

    @staticmethod
    def forward(ctx, logits, labels, keep, ce_weight, lovasz_weight, class_weights):
        num_classes = logits.shape[-1]
        scores = logits.reshape(-1, num_classes)                                 # (N, C), a view when contiguous
        gradient, ce, lovasz = _loss_and_gradient(scores, labels.reshape(-1), None if keep is None else
                                                  keep.reshape(-1), ce_weight, lovasz_weight, class_weights,
                                                  with_gradient=ctx.needs_input_grad[0])
        if gradient is not None:
            # the class-major buffer seen as (..., C): strided, but no copy (matmuls take transposed operands)
            ctx.save_for_backward(gradient.view(num_classes, *logits.shape[:-1]).movedim(0, -1))
        ctx.logits_dtype = logits.dtype
        ctx.mark_non_differentiable(ce, lovasz)
        return ce_weight * ce + lovasz_weight * lovasz, ce, lovasz

    @staticmethod
    def backward(ctx, grad_total, grad_ce, grad_lovasz):
        gradient, = ctx.saved_tensors
        if not bool(grad_total == 1):              # a loss used as is (the usual case) needs no second buffer
            gradient = gradient * grad_total
        return gradient.to(ctx.logits_dtype), None, None, None, None, None


def balanced_class_weights(counts, power):
    """(C,) float32 CE class weights (max_count / count_c) ** power from per-class voxel counts (C,), as DynamicCity
    (power 1/3); a class with no voxel gets the largest weight of the others. power 0 gives all ones."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    present = counts > 0
    if not present.any():
        raise ValueError('balanced_class_weights: every class count is 0')
    weights = torch.ones_like(counts)
    weights[present] = (counts.max() / counts[present]) ** power
    weights[~present] = weights[present].max()
    return weights.float()


def tokenizer_loss(logits, target, vq_loss, ce_weight=10.0, lovasz_weight=1.0, vq_weight=1.0, mask=None,
                   class_weights=None):
    """Stage-1 training loss: ce_weight * CE + lovasz_weight * Lovasz-softmax + vq_weight * vq_loss.

    Args:
        logits: (B, T, X, Y, Z, C) decoder output (any float dtype; the losses are computed in fp32).
        target: (B, T, X, Y, Z) integer class ids.
        vq_loss: scalar quantizer loss.
        mask: optional (B, T, X, Y, Z) {0, 1}; only voxels with mask 1 count in CE and Lovasz (camera-mask-aware
            flag). None = every voxel, as upstream.
        class_weights: optional (C,) CE weights (class-balance flag, see balanced_class_weights); CE is then the
            weighted mean over the counted voxels. None = unweighted, as upstream.

    Returns (total, {'ce', 'lovasz', 'vq'}): the components detached and unweighted (upstream's MultiLoss logs
    each component divided by its weight). CE is the mean over the counted voxels; Lovasz treats all of them as
    one image (upstream's per_image=False) with the classes present in the target, and is reported as 0 when
    lovasz_weight is 0 (it is then not computed). Memory: besides the logits, one fp32 tensor of their size.
    """
    if logits.dim() != 6 or target.shape != logits.shape[:-1]:
        raise ValueError(f'tokenizer_loss expects logits (B, T, X, Y, Z, C) and target (B, T, X, Y, Z), got '
                         f'{tuple(logits.shape)} and {tuple(target.shape)}')
    if mask is not None and mask.shape != target.shape:
        raise ValueError(f'tokenizer_loss: mask must have the target shape {tuple(target.shape)}, '
                         f'got {tuple(mask.shape)}')
    keep = None if mask is None else mask.bool()
    if class_weights is not None:
        class_weights = torch.as_tensor(class_weights, dtype=torch.float32, device=logits.device)
        if class_weights.shape != logits.shape[-1:]:
            raise ValueError(f'tokenizer_loss: class_weights must have shape ({logits.shape[-1]},), '
                             f'got {tuple(class_weights.shape)}')
    weighted, ce, lovasz = _CrossEntropyLovasz.apply(logits, target.long(), keep, ce_weight, lovasz_weight,
                                                     class_weights)
    total = weighted + vq_weight * vq_loss
    return total, {'ce': ce, 'lovasz': lovasz, 'vq': vq_loss.detach()}
