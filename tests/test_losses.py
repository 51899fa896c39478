"""Lovasz-softmax on hand-computed cases and against a direct sort-and-dot reference; tokenizer_loss components,
weights and the camera mask."""
import pytest
import torch
import torch.nn.functional as F

from model.losses import lovasz_softmax, tokenizer_loss


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


def test_perfect_prediction_is_zero():
    labels = torch.tensor([0, 2, 2, 1, 0])
    assert lovasz_softmax(F.one_hot(labels, 3).float(), labels).item() == 0.0


def test_hand_computed_soft_case():
    # p(class 1) = 0.9, 0.4, 0.2 on labels 1, 0, 1: both classes have errors 0.1, 0.4, 0.8.
    # class 1: order (0.8 fg, 0.4 bg, 0.1 fg), Jaccard losses 1/2, 2/3, 1 -> gradient 1/2, 1/6, 1/3 -> 0.5
    # class 0: order (0.8 bg, 0.4 fg, 0.1 bg), Jaccard losses 1/2, 1, 1 -> gradient 1/2, 1/2, 0 -> 0.6
    p1 = torch.tensor([0.9, 0.4, 0.2])
    probs = torch.stack([1 - p1, p1], dim=1)
    labels = torch.tensor([1, 0, 1])
    assert lovasz_softmax(probs, labels).item() == pytest.approx(0.55, abs=1e-6)
    assert lovasz_softmax(probs, labels, classes=[1]).item() == pytest.approx(0.5, abs=1e-6)


def test_hard_prediction_gives_one_minus_iou():
    # On 0/1 probabilities the Lovasz extension equals the Jaccard loss: class 0 IoU 1/2, class 1 IoU 2/3
    labels = torch.tensor([0, 0, 1, 1])
    probs = F.one_hot(torch.tensor([0, 1, 1, 1]), 3).float()
    assert lovasz_softmax(probs, labels).item() == pytest.approx((0.5 + 1 / 3) / 2, abs=1e-6)
    # 'all' adds class 2, absent and never predicted: its loss is 0, so the mean is over three classes
    assert lovasz_softmax(probs, labels, classes='all').item() == pytest.approx((0.5 + 1 / 3) / 3, abs=1e-6)


def test_value_and_gradient_match_the_direct_algorithm():
    torch.manual_seed(0)
    logits = torch.randn(500, 6, requires_grad=True)
    labels = torch.randint(0, 5, (500,))                                # class 5 absent
    loss = lovasz_softmax(logits.softmax(1), labels)
    grad, = torch.autograd.grad(loss, logits)
    expected = reference_lovasz(logits.softmax(1), labels)
    expected_grad, = torch.autograd.grad(expected, logits)
    assert torch.allclose(loss, expected, atol=1e-6)
    assert torch.allclose(grad, expected_grad, atol=1e-7)


def test_empty_selection_and_bad_input():
    probs = torch.rand(0, 4, requires_grad=True)
    loss = lovasz_softmax(probs, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0
    with pytest.raises(ValueError, match=r'probs \(N, C\) and labels \(N,\)'):
        lovasz_softmax(torch.rand(4, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="'present', 'all'"):
        lovasz_softmax(torch.rand(4, 3), torch.zeros(4, dtype=torch.long), classes='some')


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
