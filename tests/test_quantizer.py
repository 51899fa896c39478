"""VectorQuantizer: nearest code, the loss formula on a hand example, straight-through gradient, lookup round trip,
usage statistics, and the EMA / dead-code flags (including their all-reduce across two processes)."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model.quantizer import VectorQuantizer
from evaluation.codebook import CodebookUsage

CODEBOOK = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
# Two latent cells, (B, C, T, H, W) = (1, 2, 1, 1, 2): (0.9, 0.1) is nearest code 1, (0.2, 1.5) code 2.
LATENT = torch.tensor([[0.9, 0.2], [0.1, 1.5]]).reshape(1, 2, 1, 1, 2)


def identity_quantizer(codebook=CODEBOOK, **kwargs):
    """A quantizer whose two 1^3 convs are the identity, so the codebook is seen directly."""
    vq = VectorQuantizer(len(codebook), codebook.shape[1], **kwargs)
    with torch.no_grad():
        for conv in (vq.quant_conv, vq.post_quant_conv):
            conv.weight.copy_(torch.eye(codebook.shape[1]).reshape(conv.weight.shape))
            conv.bias.zero_()
        vq.codebook.weight.copy_(codebook)
        if vq.ema:                                                       # keep the EMA sums consistent with it
            vq.embed_sum.copy_(codebook * vq.cluster_size[:, None])
    return vq


def test_hand_example_indices_loss_and_codebook_gradient():
    vq = identity_quantizer(codebook_weight=0.5, commitment_weight=2.0)
    z_q, indices, loss = vq(LATENT)
    assert indices.dtype == torch.int64 and indices.tolist() == [[[[1, 2]]]]
    assert torch.equal(z_q, torch.tensor([[1.0, 0.0], [0.0, 2.0]]).reshape(1, 2, 1, 1, 2))
    # squared errors 0.1^2, 0.1^2, 0.2^2, 0.5^2 -> mean 0.0775; (0.5 + 2) * 0.0775
    assert loss.item() == pytest.approx(2.5 * 0.0775, rel=1e-6)
    loss.backward()
    # codebook term 0.5 * mean((sg[z] - e)^2): d/de_1 = 0.5 * 2 * (e_1 - z) / 4 = (0.025, -0.025); code 0 unused
    expected = torch.tensor([[0.0, 0.0], [0.025, -0.025], [-0.05, 0.125]])
    assert torch.allclose(vq.codebook.weight.grad, expected, atol=1e-7)


def test_faithful_loss_equals_upstream_legacy_form():
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 4)
    z = torch.randn(2, 4, 2, 3, 3)
    _, indices, loss = vq(z)
    latent = vq.quant_conv(z).permute(0, 2, 3, 4, 1)                     # (B, T, H, W, C)
    codes = vq.codebook(indices)
    # upstream (taming legacy, beta = 1): mean((sg[z_q] - z)^2) + beta * mean((z_q - sg[z])^2)
    legacy = torch.mean((codes.detach() - latent) ** 2) + 1.0 * torch.mean((codes - latent.detach()) ** 2)
    assert torch.allclose(loss, legacy, rtol=1e-6)
    distances = torch.cdist(latent.reshape(-1, 4), vq.codebook.weight)
    assert torch.equal(indices.flatten(), distances.argmin(1))


def test_straight_through_gradient_reaches_the_input():
    vq = identity_quantizer()
    z = LATENT.clone().requires_grad_()
    z_q, _, _ = vq(z)
    (z_q * torch.arange(4.0).reshape(1, 2, 1, 1, 2)).sum().backward()
    assert torch.equal(z.grad, torch.arange(4.0).reshape(1, 2, 1, 1, 2))   # identity convs: gradient copied


def test_lookup_and_codebook_vectors_match_the_forward_in_eval():
    torch.manual_seed(1)
    vq = VectorQuantizer(32, 8).eval()
    z_q, indices, _ = vq(torch.randn(3, 8, 2, 4, 5))
    assert torch.equal(vq.lookup(indices), z_q)
    table = vq.codebook_vectors()                                        # (K, C)
    assert table.shape == (32, 8)
    assert torch.allclose(table[indices].permute(0, 4, 1, 2, 3), z_q, atol=1e-6)
    with pytest.raises(ValueError, match='integer indices'):
        vq.lookup(indices.float())
    with pytest.raises(ValueError, match=r'\(B, 8, T, H, W\)'):
        vq(torch.randn(1, 7, 1, 1, 1))


def usage_of(indices, codebook_size=8):
    usage = CodebookUsage(codebook_size, 'cpu')
    usage.update(indices)
    return usage.compute()


def test_usage_stats():
    assert usage_of(torch.tensor([[0, 0], [3, 3]])) == {'perplexity': pytest.approx(2.0), 'used_codes': 2}
    assert usage_of(torch.arange(8))['perplexity'] == pytest.approx(8.0)


def test_faithful_quantizer_has_no_ema_state():
    assert set(VectorQuantizer(8, 2).state_dict()) == {
        'quant_conv.weight', 'quant_conv.bias', 'codebook.weight', 'post_quant_conv.weight', 'post_quant_conv.bias'}


def test_ema_moves_the_used_code_by_the_moving_average():
    vq = identity_quantizer(ema=True, ema_decay=0.5)
    assert not vq.codebook.weight.requires_grad
    latent = torch.tensor([[0.8, 1.0, 0.9], [0.1, 0.0, -0.4]]).reshape(1, 2, 1, 1, 3)   # all nearest code 1
    _, indices, loss = vq(latent)
    assert indices.flatten().tolist() == [1, 1, 1]
    # commitment term only: mean of squared errors 0.2^2, 0.1^2, 0, 0, 0.1^2, 0.4^2 over 6 entries
    assert loss.item() == pytest.approx((0.04 + 0.01 + 0.01 + 0.16) / 6, rel=1e-6)
    # counts: 0.5 * 1 + 0.5 * 3 = 2; sums: 0.5 * (1, 0) + 0.5 * (2.7, -0.3) -> code 1 = (1.85, -0.15) / 2
    assert torch.allclose(vq.codebook.weight[1], torch.tensor([0.925, -0.075]), atol=1e-4)
    assert torch.allclose(vq.codebook.weight[[0, 2]], CODEBOOK[[0, 2]], atol=1e-4)   # decayed sum / decayed count
    assert torch.allclose(vq.cluster_size, torch.tensor([0.5, 2.0, 0.5]))
    before = vq.codebook.weight.clone()
    vq.eval()
    vq(latent)
    assert torch.equal(vq.codebook.weight, before)                       # no update outside training


def test_dead_codes_restart_on_batch_latents():
    torch.manual_seed(0)
    codebook = torch.tensor([[0.0, 0.0], [5.0, 5.0], [-5.0, 5.0], [5.0, -5.0]])
    vq = identity_quantizer(codebook, ema_decay=0.5, dead_code_threshold=0.9)
    latent = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.0, -0.1, 0.1, 0.2]]).reshape(1, 2, 1, 1, 4)   # all code 0
    vq.eval()
    vq(latent)
    assert torch.equal(vq.codebook.weight, codebook)                     # eval: nothing restarted
    vq.train()
    vq(latent)
    # usage EMA: code 0 -> 0.5 + 0.5 * 4 = 2.5 stays; codes 1..3 -> 0.5 < 0.9 are moved onto batch latents
    assert torch.equal(vq.codebook.weight[0], codebook[0])
    batch_latents = latent.reshape(2, 4).t()                             # (4, C)
    for code in vq.codebook.weight[1:]:
        assert (code == batch_latents).all(1).any()
    assert torch.allclose(vq.cluster_size, torch.tensor([2.5, 0.9, 0.9, 0.9]))


def _ema_worker(rank, world_size, init_file, latents, results):
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world_size)
    try:
        torch.manual_seed(rank)                                          # different restart draws per rank
        vq = identity_quantizer(ema=True, ema_decay=0.5, dead_code_threshold=1.5)
        vq(latents[rank])
        results[rank] = (vq.codebook.weight.clone(), vq.cluster_size.clone())
    finally:
        dist.destroy_process_group()


def test_ema_statistics_are_all_reduced_across_processes(tmp_path):
    latents = [torch.tensor([[0.8, 1.1], [0.1, 0.0]]).reshape(1, 2, 1, 1, 2),
               torch.tensor([[0.2, 1.0], [1.9, -0.2]]).reshape(1, 2, 1, 1, 2)]
    results = mp.Manager().dict()
    mp.spawn(_ema_worker, args=(2, str(tmp_path / 'init'), latents, results), nprocs=2)
    (codebook_0, counts_0), (codebook_1, counts_1) = results[0], results[1]
    assert torch.equal(codebook_0, codebook_1) and torch.equal(counts_0, counts_1)

    # One process on the concatenated batch gives the same statistics (restarts aside)
    single = identity_quantizer(ema=True, ema_decay=0.5)
    single(torch.cat(latents, dim=4))
    # counts [0, 3, 1] -> EMA [0.5, 2.0, 1.0]: codes 0 and 2 fall below 1.5 and restart at the threshold
    assert torch.allclose(single.cluster_size, torch.tensor([0.5, 2.0, 1.0]))
    assert torch.allclose(counts_0, torch.tensor([1.5, 2.0, 1.5]))
    assert torch.allclose(codebook_0[1], single.codebook.weight[1], atol=1e-6)
