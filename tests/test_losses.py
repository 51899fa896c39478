"""Lovasz-softmax on hand-computed cases and against a direct sort-and-dot reference; tokenizer_loss components,
weights, the camera mask and the class-weight flag; the fused, chunked loss against the unfused reference (values
and gradients) and its memory (one saved tensor of the logits' size; the Lovasz temporaries per voxel)."""
import pytest
import torch
import torch.nn.functional as F

from evaluation.benchmark.measure import LiveTensorBytes
from model import losses
from model.losses import balanced_class_weights, tokenizer_loss


def reference_lovasz(probs, labels):
    """Berman et al.'s algorithm written directly (errors sorted, dotted with the Jaccard gradient), present
    classes, mean over classes."""
    losses = []
    for c in torch.unique(labels).tolist():
        fg = (labels == c).float()
        errors = (fg - probs[:, c]).abs()
        errors_sorted, order = errors.sort(descending=True)
        fg_sorted = fg[order]
        jaccard = 1 - (fg.sum() - fg_sorted.cumsum(0)) / (fg.sum() + (1 - fg_sorted).cumsum(0))
        gradient = torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])
        losses.append(torch.dot(errors_sorted, gradient))
    return torch.stack(losses).mean()


def lovasz_of(probs, labels):
    """The Lovasz term tokenizer_loss reports for class probabilities probs (N, C) and labels (N,), the voxels laid
    along one axis; logits = log(probs), so the softmax inside the loss gives probs back."""
    logits = probs.log().reshape(1, 1, -1, 1, 1, probs.shape[1])
    _, parts = tokenizer_loss(logits, labels.reshape(1, 1, -1, 1, 1), torch.tensor(0.0), ce_weight=0.0)
    return parts['lovasz'].item()


def test_perfect_prediction_is_zero():
    labels = torch.tensor([0, 2, 2, 1, 0])
    assert lovasz_of(F.one_hot(labels, 3).float(), labels) == 0.0


def test_hand_computed_soft_case():
    # p(class 1) = 0.9, 0.4, 0.2 on labels 1, 0, 1: both classes have errors 0.1, 0.4, 0.8.
    # class 1: order (0.8 fg, 0.4 bg, 0.1 fg), Jaccard losses 1/2, 2/3, 1 -> gradient 1/2, 1/6, 1/3 -> 0.5
    # class 0: order (0.8 bg, 0.4 fg, 0.1 bg), Jaccard losses 1/2, 1, 1 -> gradient 1/2, 1/2, 0 -> 0.6
    p1 = torch.tensor([0.9, 0.4, 0.2])
    probs = torch.stack([1 - p1, p1], dim=1)
    assert lovasz_of(probs, torch.tensor([1, 0, 1])) == pytest.approx(0.55, abs=1e-6)


def test_hard_prediction_gives_one_minus_iou_over_the_present_classes():
    # On 0/1 probabilities the Lovasz extension equals the Jaccard loss: class 0 IoU 1/2, class 1 IoU 2/3; class 2,
    # absent and never predicted, is not averaged in
    labels = torch.tensor([0, 0, 1, 1])
    probs = F.one_hot(torch.tensor([0, 1, 1, 1]), 3).float()
    assert lovasz_of(probs, labels) == pytest.approx((0.5 + 1 / 3) / 2, abs=1e-6)


def test_lovasz_value_and_gradient_match_the_direct_algorithm():
    torch.manual_seed(0)
    logits = torch.randn(1, 1, 500, 1, 1, 6, requires_grad=True)
    labels = torch.randint(0, 5, (1, 1, 500, 1, 1))                   # class 5 absent
    total, parts = tokenizer_loss(logits, labels, torch.tensor(0.0), ce_weight=0.0)
    grad, = torch.autograd.grad(total, logits)
    expected = reference_lovasz(logits.reshape(500, 6).softmax(1), labels.reshape(500))
    expected_grad, = torch.autograd.grad(expected, logits)
    assert torch.allclose(parts['lovasz'], expected, atol=1e-6)
    assert torch.allclose(grad, expected_grad, atol=1e-7)


def make_batch(seed=0, shape=(2, 2, 3, 3, 4), num_classes=5):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, num_classes, generator=generator, requires_grad=True)   # (B, T, X, Y, Z, C)
    target = torch.randint(0, num_classes, shape, generator=generator)                   # (B, T, X, Y, Z)
    return logits, target


def test_tokenizer_loss_components_and_weights():
    logits, target = make_batch()
    vq_loss = torch.tensor(0.25)
    total, parts = tokenizer_loss(logits, target, vq_loss)
    # upstream's ReconLoss: cross_entropy on logits moved to (B, C, T, X, Y, Z)
    ce = F.cross_entropy(logits.permute(0, 5, 1, 2, 3, 4), target)
    lovasz = reference_lovasz(logits.reshape(-1, 5).softmax(1), target.reshape(-1))
    assert torch.allclose(parts['ce'], ce) and torch.allclose(parts['lovasz'], lovasz, atol=1e-6)
    assert parts['vq'].item() == 0.25 and not any(p.requires_grad for p in parts.values())
    assert torch.allclose(total, 10 * ce + lovasz + 0.25, atol=1e-6)
    weighted, _ = tokenizer_loss(logits, target, vq_loss, ce_weight=2.0, lovasz_weight=0.5, vq_weight=4.0)
    assert torch.allclose(weighted, 2 * ce + 0.5 * lovasz + 1.0, atol=1e-6)
    total.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    without_lovasz, parts = tokenizer_loss(logits, target, vq_loss, lovasz_weight=0.0)
    assert torch.allclose(without_lovasz, 10 * ce + 0.25) and parts['lovasz'].item() == 0.0


def test_tokenizer_loss_with_camera_mask():
    logits, target = make_batch(seed=1)
    vq_loss = torch.tensor(0.0)
    full, full_parts = tokenizer_loss(logits, target, vq_loss)
    ones, ones_parts = tokenizer_loss(logits, target, vq_loss, mask=torch.ones_like(target, dtype=torch.uint8))
    assert torch.allclose(full, ones) and torch.allclose(full_parts['lovasz'], ones_parts['lovasz'])

    mask = torch.zeros_like(target, dtype=torch.uint8)
    mask[:, :, :2] = 1
    masked, parts = tokenizer_loss(logits, target, vq_loss, mask=mask)
    keep = mask.bool()
    assert torch.allclose(parts['ce'], F.cross_entropy(logits[keep], target[keep]))
    assert torch.allclose(parts['lovasz'], reference_lovasz(logits[keep].softmax(1), target[keep]), atol=1e-6)
    masked.backward()
    assert (logits.grad[~keep] == 0).all() and logits.grad[keep].abs().sum() > 0

    empty, parts = tokenizer_loss(logits, target, vq_loss, mask=torch.zeros_like(mask))
    assert empty.item() == 0.0 and parts['ce'].item() == 0.0


def test_tokenizer_loss_rejects_mismatched_shapes():
    logits, target = make_batch()
    with pytest.raises(ValueError, match=r'logits \(B, T, X, Y, Z, C\)'):
        tokenizer_loss(logits, target[:, :1], torch.tensor(0.0))
    with pytest.raises(ValueError, match='mask must have the target shape'):
        tokenizer_loss(logits, target, torch.tensor(0.0), mask=torch.ones(3))


def reference_loss(logits, target, ce_weight=10.0, lovasz_weight=1.0, mask=None):
    """The unfused loss, written directly: F.cross_entropy + reference_lovasz of the softmax, on the kept voxels."""
    scores, labels = logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1)
    if mask is not None:
        scores, labels = scores[mask.reshape(-1).bool()], labels[mask.reshape(-1).bool()]
    return ce_weight * F.cross_entropy(scores, labels) + lovasz_weight * reference_lovasz(scores.softmax(1), labels)


@pytest.mark.parametrize('masked', [False, True])
@pytest.mark.parametrize('chunk', [7, 2 ** 20])
def test_fused_chunked_loss_equals_the_reference_with_gradients(monkeypatch, masked, chunk):
    monkeypatch.setattr(losses, 'CHUNK_VOXELS', chunk)          # 7: many chunks, the last one partial
    logits, target = make_batch(seed=2, shape=(2, 3, 4, 3, 4), num_classes=6)
    mask = (torch.rand(target.shape, generator=torch.Generator().manual_seed(3)) < 0.6).to(torch.uint8) \
        if masked else None
    total, _ = tokenizer_loss(logits, target, torch.tensor(0.0), ce_weight=3.0, lovasz_weight=2.0, mask=mask)
    grad, = torch.autograd.grad(total, logits)
    expected = reference_loss(logits, target, 3.0, 2.0, mask)
    expected_grad, = torch.autograd.grad(expected, logits)
    assert abs(total.item() - expected.item()) < 1e-5
    assert torch.allclose(grad, expected_grad, atol=1e-6) and grad.abs().max() > 1e-3


def test_fused_loss_scales_its_gradient_and_follows_the_logits_dtype():
    logits, target = make_batch(seed=4)
    total, _ = tokenizer_loss(logits, target, torch.tensor(0.0))
    grad, = torch.autograd.grad(total, logits, retain_graph=True)
    doubled, = torch.autograd.grad(2.5 * total, logits)                 # a loss scaled before backward
    assert torch.allclose(doubled, 2.5 * grad)
    half = logits.detach().bfloat16().requires_grad_()
    total, parts = tokenizer_loss(half, target, torch.tensor(0.0))
    total.backward()
    assert half.grad.dtype == torch.bfloat16 and parts['ce'].dtype == torch.float32
    expected, = torch.autograd.grad(reference_loss(half, target), half)
    assert torch.allclose(half.grad.float(), expected.float(), atol=1e-3)


def test_fused_loss_keeps_one_tensor_of_the_logits_size_for_backward():
    logits, target = make_batch(seed=5, shape=(1, 2, 4, 4, 4), num_classes=18)
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        tokenizer_loss(logits, target, torch.tensor(0.0))
    assert saved == [logits.numel()]
    with torch.no_grad():                                                # no gradient wanted: nothing is kept
        total, parts = tokenizer_loss(logits, target, torch.tensor(0.0))
    assert total.grad_fn is None and torch.allclose(total, reference_loss(logits.detach(), target), atol=1e-5)


def test_descending_order_matches_a_float_sort_and_keeps_ties_in_index_order():
    errors = torch.tensor([0.5, 0.0, 1.0, 0.25, 0.5, 1.0, 1e-30, 0.0])
    order = losses._descending_order(errors)
    assert order.tolist() == [2, 5, 0, 4, 3, 6, 1, 7]
    assert torch.equal(order, losses._descending_order(errors.double()))


def test_lovasz_gradient_is_exact_on_many_voxels():
    # Consecutive Jaccard losses differ by ~1/N: differenced in float32 they would carry ~1 % error here
    torch.manual_seed(6)
    num_voxels = 300_000
    probs = torch.rand(num_voxels)
    foreground = torch.rand(num_voxels) < 0.3
    weights, const = losses._lovasz_weights(probs, foreground)
    weights64, const64 = losses._lovasz_weights(probs.double(), foreground)
    assert torch.allclose(weights.double(), weights64, rtol=1e-5, atol=0)
    assert abs(const.item() - const64.item()) < 1e-6


def test_lovasz_weights_free_their_temporaries_early():
    # the sort's int64 order, the float64 Jaccard ratios and the union live together at most: 24 bytes per voxel
    # (it was 32 when the float64 ratios and the order outlived their last use)
    num_voxels = 100_000
    probs, foreground = torch.rand(num_voxels), torch.rand(num_voxels) < 0.3
    with LiveTensorBytes() as live:
        weights, _ = losses._lovasz_weights(probs, foreground)
    assert live.peak <= 24 * num_voxels + 1024
    assert live.current <= 4 * num_voxels + 1024                     # the weights (and a scalar) remain


@pytest.mark.parametrize('masked', [False, True])
def test_class_weighted_ce_is_torch_weighted_mean_with_its_gradient(monkeypatch, masked):
    monkeypatch.setattr(losses, 'CHUNK_VOXELS', 11)
    logits, target = make_batch(seed=7, num_classes=5)
    weights = torch.tensor([0.5, 1.0, 2.0, 4.0, 3.0])
    mask = (torch.rand(target.shape, generator=torch.Generator().manual_seed(8)) < 0.5) if masked else None
    total, parts = tokenizer_loss(logits, target, torch.tensor(0.0), ce_weight=2.0, lovasz_weight=0.5,
                                  mask=mask, class_weights=weights)
    grad, = torch.autograd.grad(total, logits)
    keep = torch.ones_like(target, dtype=torch.bool) if mask is None else mask
    ce = F.cross_entropy(logits[keep], target[keep], weight=weights)
    expected = 2.0 * ce + 0.5 * reference_lovasz(logits[keep].softmax(1), target[keep])
    expected_grad, = torch.autograd.grad(expected, logits)
    assert torch.allclose(parts['ce'], ce, atol=1e-6) and abs(total.item() - expected.item()) < 1e-5
    assert torch.allclose(grad, expected_grad, atol=1e-6)
    unweighted, _ = tokenizer_loss(logits, target, torch.tensor(0.0), mask=mask)
    ones, _ = tokenizer_loss(logits, target, torch.tensor(0.0), mask=mask, class_weights=torch.ones(5))
    assert torch.allclose(unweighted, ones, atol=1e-6) and not torch.allclose(total, unweighted)
    with pytest.raises(ValueError, match=r'class_weights must have shape \(5,\)'):
        tokenizer_loss(logits, target, torch.tensor(0.0), class_weights=torch.ones(4))


def test_balanced_class_weights_follow_the_inverse_frequency_power():
    weights = balanced_class_weights([1000, 8, 0, 125], 1 / 3)
    assert torch.allclose(weights, torch.tensor([1.0, 5.0, 5.0, 2.0]))      # absent: the largest of the others
    assert torch.equal(balanced_class_weights([3, 1, 0], 0.0), torch.ones(3))
    with pytest.raises(ValueError, match='every class count is 0'):
        balanced_class_weights([0, 0], 1 / 3)
