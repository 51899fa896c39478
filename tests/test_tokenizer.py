"""OccTokenizer: faithful parameter counts, shapes for any batch size, height folding and the tied classifier,
encode/decode round trips, gradients, flags (activation checkpointing, EMA, bf16), the same-padding convolutions,
and overfitting one clip."""
import os

import pytest
import torch
import torch.nn.functional as F
from mmengine.config import Config

from dataset.constants import CLASS_ID, FREE_CLASS, GRID_SHAPE, NUM_CLASSES
from model.layers import SamePadConv3d, SamePadConvTranspose3d
from model.losses import tokenizer_loss
from model.tokenizer import OccTokenizer, build_tokenizer, downsampling_strides
from evaluation.codebook import CodebookUsage

CONFIG = os.path.join(os.path.dirname(__file__), '..', 'config', 'train_vqvae.py')
TINY = dict(hidden_channels=16, num_res_blocks=1, latent_channels=8, codebook_size=32)


def count(module):
    return sum(p.numel() for p in module.parameters())


def random_clip(batch, frames=8, size=16, seed=0, dtype=torch.uint8):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, NUM_CLASSES, (batch, frames, size, size, GRID_SHAPE[2]), generator=generator).to(dtype)


def street_clip(frames=4, size=16):
    """(1, T, X, Y, Z) a small street: terrain, a road with sidewalk, a building, a car moving along x."""
    occ = torch.full((1, frames, size, size, GRID_SHAPE[2]), FREE_CLASS, dtype=torch.long)
    occ[..., 0] = CLASS_ID['terrain']
    occ[:, :, :, 6:10, 0] = CLASS_ID['driveable_surface']
    occ[:, :, :, 4:6, 0:2] = CLASS_ID['sidewalk']
    occ[:, :, 12:16, 0:3, 0:6] = CLASS_ID['manmade']
    for t in range(frames):
        occ[:, t, 2 + 2 * t:5 + 2 * t, 7:9, 1:3] = CLASS_ID['car']
    return occ


def test_faithful_parameter_counts():
    with torch.device('meta'):
        model = OccTokenizer()
    assert count(model) == 137_369_744
    assert count(model.encoder) == 72_109_056 and count(model.decoder) == 65_030_272
    assert count(model.pre_vq_conv) == 65_664 and count(model.post_vq_conv) == 66_048
    assert count(model.quantizer) == 98_560 and count(model.quantizer.codebook) == 65_536
    assert count(model.class_embedding) == 144


def test_build_from_the_stage1_config_and_unknown_keys():
    cfg = Config.fromfile(CONFIG)
    with torch.device('meta'):
        assert count(build_tokenizer(cfg.model)) == 137_369_744
        assert count(build_tokenizer({**cfg.model.to_dict(), 'hidden_channels': 64})) < 137_369_744
    with pytest.raises(TypeError, match=r"\['n_e'\]"):
        build_tokenizer({'n_e': 512})


@pytest.mark.parametrize('kernel, stride, padded_copy', [(4, 2, False), (3, 1, False), (1, 1, False),
                                                         (4, (1, 2, 2), True), (4, 1, True)])
def test_same_padding_convolutions_equal_explicit_padding(kernel, stride, padded_copy):
    # VideoGPT pads the input by kernel - stride (larger half in front) and the transposed conv then removes
    # kernel - 1; symmetric paddings are done by the convolution itself, without the padded copy
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 6, 8, dtype=torch.float64)
    conv = SamePadConv3d(3, 5, kernel, stride).double()
    transposed = SamePadConvTranspose3d(3, 5, kernel, stride).double()
    assert conv.pad_input is transposed.pad_input is padded_copy
    padded = F.pad(x, conv.padding)
    expected = F.conv3d(padded, conv.conv.weight, conv.conv.bias, conv.conv.stride)
    crop = tuple(k - 1 for k in transposed.conv.kernel_size)
    expected_up = F.conv_transpose3d(padded, transposed.conv.weight, transposed.conv.bias, transposed.conv.stride, crop)
    assert torch.equal(conv(x), expected) and torch.equal(transposed(x), expected_up)
    strides = (stride,) * 3 if isinstance(stride, int) else stride
    assert transposed(x).shape[2:] == tuple(n * s for n, s in zip(x.shape[2:], strides))


def test_downsampling_strides():
    assert downsampling_strides((8, 8, 8)) == [(2, 2, 2)] * 3
    assert downsampling_strides((4, 8, 8)) == [(2, 2, 2), (2, 2, 2), (1, 2, 2)]
    assert downsampling_strides([1, 2, 2]) == [(1, 2, 2)]
    for bad in [(8, 8), (6, 8, 8), (1, 1, 1)]:
        with pytest.raises(ValueError, match='downsample'):
            downsampling_strides(bad)


@pytest.mark.parametrize('batch', [1, 3])
def test_shapes_for_any_batch_size(batch):
    torch.manual_seed(0)
    model = OccTokenizer(**TINY)
    with torch.no_grad():
        logits, vq_loss, indices = model(random_clip(batch, size=32))
    assert logits.shape == (batch, 8, 32, 32, GRID_SHAPE[2], NUM_CLASSES)
    assert indices.shape == (batch, 1, 4, 4) and indices.dtype == torch.int64
    assert vq_loss.shape == () and torch.isfinite(vq_loss)
    with torch.no_grad():
        z_q, _, _ = model.encode(random_clip(batch, size=32))
    assert z_q.shape == (batch, *model.latent_shape(8, (32, 32))) == (batch, 8, 1, 4, 4)
    assert OccTokenizer(**TINY, downsample=(4, 8, 8)).latent_shape(8, (32, 32)) == (8, 2, 4, 4)
    assert OccTokenizer(**TINY).latent_shape(32) == (8, 4, 25, 25)              # the faithful grid


def test_eval_batch_is_independent_and_dtype_agnostic():
    torch.manual_seed(0)
    model = OccTokenizer(**TINY).eval()
    clips = random_clip(3, seed=1)
    with torch.no_grad():
        logits, _, indices = model(clips)
        single_logits, _, single_indices = model(clips[1:2].long())
    assert torch.equal(indices[1:2], single_indices)
    assert torch.allclose(logits[1:2], single_logits, atol=1e-5)


def test_height_is_folded_z_major_and_the_classifier_is_tied():
    torch.manual_seed(0)
    model = OccTokenizer(**TINY)
    captured = {}
    model.encoder.down[0].register_forward_hook(lambda module, args, out: captured.update(encoder_in=args[0]))
    model.decoder.up[-1].register_forward_hook(lambda module, args, out: captured.update(decoder_out=out))
    occ = random_clip(1)
    logits, _, _ = model(occ)
    table, embed_dim = model.class_embedding.weight, model.class_embed_dim
    t, x, y, z = 3, 5, 7, 11                                                    # any voxel
    channels = slice(z * embed_dim, (z + 1) * embed_dim)                       # channel = z * E + e
    assert torch.equal(captured['encoder_in'][0, channels, t, x, y], table[occ[0, t, x, y, z].long()])
    features = captured['decoder_out'][0, channels, t, x, y]                   # (E,)
    assert torch.allclose(logits[0, t, x, y, z], table @ features, atol=1e-5)


def test_decode_indices_and_lookup_reproduce_the_forward_in_eval():
    torch.manual_seed(0)
    model = OccTokenizer(**TINY).eval()
    with torch.no_grad():
        z_q, indices, _ = model.encode(random_clip(2))
        assert torch.equal(model.quantizer.lookup(indices), z_q)
        assert torch.equal(model.decode_indices(indices), model.decode(z_q))
        logits, _, forward_indices = model(random_clip(2))
    assert torch.equal(forward_indices, indices) and torch.equal(logits, model.decode(z_q))


def test_gradient_reaches_the_encoder_through_the_straight_through_estimator():
    torch.manual_seed(0)
    model = OccTokenizer(**TINY)
    occ = random_clip(2)
    logits, _, _ = model(occ)
    tokenizer_loss(logits, occ, torch.tensor(0.0), lovasz_weight=0.0)[0].backward()   # reconstruction only
    for parameter in (model.class_embedding.weight, model.encoder.down[0].conv.weight,
                      model.pre_vq_conv.conv.weight, model.quantizer.quant_conv.weight):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0
    assert model.quantizer.codebook.weight.grad is None                         # codes learn from the VQ loss only


def test_bad_input_raises_naming_the_shape():
    model = OccTokenizer(**TINY)
    with pytest.raises(ValueError, match=r'\(B, T, X, Y, 16\).*\(1, 8, 16, 16, 8\)'):
        model(torch.zeros(1, 8, 16, 16, 8, dtype=torch.long))
    with pytest.raises(ValueError, match='integer tensor'):
        model(torch.zeros(1, 8, 16, 16, GRID_SHAPE[2]))
    with pytest.raises(ValueError, match='axis T = 12 is not a multiple'):
        model(torch.zeros(1, 12, 16, 16, GRID_SHAPE[2], dtype=torch.long))
    with pytest.raises(ValueError, match=r'class ids must lie in \[0, 18\)'):
        model(torch.full((1, 8, 16, 16, GRID_SHAPE[2]), NUM_CLASSES, dtype=torch.long))
    with pytest.raises(ValueError, match=r'z_q of shape \(B, 8, T, H, W\)'):
        model.decode(torch.zeros(1, 4, 1, 2, 2))


def test_activation_checkpointing_gives_the_same_loss_gradients_and_statistics():
    torch.manual_seed(0)
    plain = OccTokenizer(**{**TINY, "num_res_blocks": 2})
    checkpointed = OccTokenizer(**{**TINY, "num_res_blocks": 2}, activation_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    occ = random_clip(2)
    losses = []
    for model in (plain, checkpointed):
        logits, vq_loss, _ = model(occ)
        loss, _ = tokenizer_loss(logits, occ, vq_loss)
        loss.backward()
        losses.append(loss)
    assert torch.allclose(losses[0], losses[1])
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-7), name
    for (name, a), b in zip(plain.named_buffers(), checkpointed.buffers()):
        assert torch.allclose(a.float(), b.float()), name                     # the recompute counts no batch twice


@pytest.mark.parametrize('ema, threshold', [(True, 0.5), (False, 2.0)])
def test_codebook_flags_update_the_codebook_without_an_optimiser(ema, threshold):
    torch.manual_seed(0)
    model = OccTokenizer(**TINY, codebook_ema=ema, dead_code_threshold=threshold)
    assert ('quantizer.embed_sum' in model.state_dict()) == ema and 'quantizer.cluster_size' in model.state_dict()
    assert 'quantizer.cluster_size' not in OccTokenizer(**TINY).state_dict()
    before = model.quantizer.codebook.weight.clone()
    occ = random_clip(2)
    logits, vq_loss, indices = model(occ)
    changed = (model.quantizer.codebook.weight != before).any(1)
    if ema:                     # every used code follows its latents; unused ones (EMA usage 0.99) stay alive
        assert changed[indices.unique()].all()
    else:                       # 8 latent cells cannot give 32 codes an EMA usage of 2: all restart
        assert changed.all() and torch.allclose(model.quantizer.cluster_size, torch.full((32,), threshold))
    tokenizer_loss(logits, occ, vq_loss)[0].backward()              # the in-place update leaves backward intact
    assert (model.quantizer.codebook.weight.grad is None) == ema
    usage = CodebookUsage(32, 'cpu')
    usage.update(indices)
    stats = usage.compute()
    assert 1 <= stats['used_codes'] <= 8 and 1.0 <= stats['perplexity'] <= stats['used_codes'] + 1e-6


def test_bf16_autocast_keeps_the_quantizer_in_fp32():
    torch.manual_seed(0)
    model = OccTokenizer(**TINY)
    occ = random_clip(1)
    with torch.autocast('cpu', torch.bfloat16):
        z_q, _, _ = model.encode(occ)
        logits = model.decode(z_q)
    assert z_q.dtype == torch.float32 and logits.dtype == torch.bfloat16
    loss, _ = tokenizer_loss(logits, occ, torch.tensor(0.0))
    loss.backward()
    assert torch.isfinite(model.encoder.down[0].conv.weight.grad).all()


def overfit(model, occ, steps, lr=3e-3):
    """Train ``model`` on the one clip ``occ`` for ``steps`` Adam steps; its eval-mode prediction (B, T, X, Y, Z)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        logits, latent_loss, _ = model(occ)
        loss, _ = tokenizer_loss(logits, occ, latent_loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        return model(occ)[0].argmax(-1)


@pytest.mark.parametrize('latent_type', ['vq', 'gaussian'])
def test_overfits_one_small_clip(latent_type):
    torch.manual_seed(0)
    occ = street_clip()
    model = OccTokenizer(hidden_channels=32, num_res_blocks=1, downsample=(2, 4, 4), latent_channels=16,
                         codebook_size=64, latent_type=latent_type)
    prediction = overfit(model, occ, steps=100)                                # vq: 1.0 accuracy from ~80 steps
    occupied = occ != FREE_CLASS
    assert (prediction == occ).float().mean() > 0.99
    assert (prediction == occ)[occupied].float().mean() > 0.95


def test_faithful_forward_and_backward_at_full_grid_size():
    torch.manual_seed(0)
    model = OccTokenizer()
    occ = torch.full((1, 8, *GRID_SHAPE), FREE_CLASS, dtype=torch.uint8)
    occ[..., :2] = CLASS_ID['driveable_surface']
    logits, vq_loss, indices = model(occ)
    assert logits.shape == (1, 8, *GRID_SHAPE, NUM_CLASSES) and indices.shape == (1, 1, 25, 25)
    loss, parts = tokenizer_loss(logits, occ, vq_loss)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in parts.values())
    gradients = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in gradients)
    assert model.class_embedding.weight.grad.abs().sum() > 0 and model.encoder.down[0].conv.weight.grad.abs().sum() > 0


def test_gaussian_latents_sample_in_training_use_the_mean_in_eval_and_pay_a_kl_term():
    torch.manual_seed(0)
    model = OccTokenizer(**TINY, latent_type='gaussian', kl_weight=0.5)
    assert not model.discrete and not hasattr(model.quantizer, 'codebook')
    occ = random_clip(1)
    z1, indices, kl = model.encode(occ)
    z2, _, _ = model.encode(occ)
    assert indices is None and not torch.equal(z1, z2)                          # a fresh sample each call
    assert kl.item() > 0 and kl.requires_grad
    model.eval()
    with torch.no_grad():
        mean1, _, _ = model.encode(occ)
        mean2, _, _ = model.encode(occ)
        logits, _, forward_indices = model(occ)
    assert torch.equal(mean1, mean2) and forward_indices is None and torch.equal(logits, model.decode(mean1))
    # the KL term is exactly 0 for a posterior N(0, 1): zero the quant conv, so mean = 0 and log-variance = 0
    torch.nn.init.zeros_(model.quantizer.quant_conv.weight)
    torch.nn.init.zeros_(model.quantizer.quant_conv.bias)
    assert model.encode(occ)[2].item() == 0.0
    with pytest.raises(ValueError, match="latent_type must be 'vq' or 'gaussian'"):
        OccTokenizer(**TINY, latent_type='fsq')
