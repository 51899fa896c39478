"""The trajectory-conditioned DiT (model/dit.py): upstream's parameter count, shapes, initialisation, token
order, condition dropout, classifier-free guidance and known-prefix conditioning."""
import math

import pytest
import torch

from model.dit import DIT_MODELS, DiT, build_dit, draw_prefix_lengths, prefix_mask, sincos_table

LATENT_SHAPE = (4, 2, 3, 5)       # (C, T', H', W'): 30 tokens, non-square so an axis mix-up shows
COND_SHAPE = (6, 2)               # (T, cond_channels)


def tiny_dit(class_dropout_prob=0.1, depth=2, known_prefix=False):
    return DiT(LATENT_SHAPE, COND_SHAPE, hidden_size=16, depth=depth, num_heads=2,
               class_dropout_prob=class_dropout_prob, known_prefix=known_prefix)


def randomise_(model, seed=0):
    """Overwrite every parameter with N(0, 0.1) noise, so the zero-initialised layers stop hiding anything."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model.eval()


def inputs(batch_size, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch_size, *LATENT_SHAPE, generator=generator),
            torch.randint(0, 1000, (batch_size,), generator=generator),
            torch.randn(batch_size, *COND_SHAPE, generator=generator))


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_upstream_dit_xl2_parameter_count():
    model = build_dit('DiT-XL/2', latent_shape=(128, 4, 25, 25), cond_shape=(32, 2), class_dropout_prob=0.0,
                      known_prefix=False)
    assert count(model) == 36_819_200
    assert model.token_embed[0].in_channels == 128
    assert count(model.blocks) == 33_137_664 and count(model.blocks[0]) == 1_183_488
    assert count(model.token_embed) == 2_654_720
    assert model.pos_embed.numel() == 640_000
    assert count(model.final_layer) == 197_376
    assert count(model.t_embedder) == 131_584
    assert count(model.traj_embedder) == 57_856
    assert model.null_traj is None


def test_condition_dropout_adds_exactly_the_null_embedding():
    assert count(tiny_dit(0.1)) - count(tiny_dit(0.0)) == 16
    assert tiny_dit(0.1).null_traj.shape == (16,)


def test_presets_and_overrides():
    assert DIT_MODELS['DiT-XL/2'] == dict(hidden_size=256, depth=28, num_heads=16, mlp_ratio=4.0)
    widths = {name: (p['hidden_size'], p['depth'], p['num_heads']) for name, p in DIT_MODELS.items()}
    assert widths['DiT-S'] == (384, 12, 6) and widths['DiT-B'] == (768, 12, 12)
    assert widths['DiT-L'] == (1024, 24, 16) and widths['DiT-XL'] == (1152, 28, 16)
    model = build_dit('DiT-demo', [4, 2, 3, 5], [6, 2], depth=1)          # lists, as meta.json gives them
    assert len(model.blocks) == 1 and model.pos_embed.shape == (1, 30, DIT_MODELS['DiT-demo']['hidden_size'])
    with pytest.raises(ValueError, match="unknown DiT model 'DiT-XXL'"):
        build_dit('DiT-XXL', LATENT_SHAPE, COND_SHAPE)
    with pytest.raises(ValueError, match='divisible by num_heads'):
        build_dit('DiT-demo', LATENT_SHAPE, COND_SHAPE, num_heads=3)


@pytest.mark.parametrize('batch_size', [1, 3])
def test_output_shape_and_zero_output_at_init(batch_size):
    x, t, traj = inputs(batch_size)
    out = tiny_dit()(x, t, traj)
    assert out.shape == (batch_size, 2 * LATENT_SHAPE[0], *LATENT_SHAPE[1:])
    assert (out == 0).all()           # adaLN-Zero: zero-initialised output layer


def test_sincos_table_known_values_and_positions_from_one():
    table = sincos_table(torch.tensor([0, 1, 2]), 4)        # frequencies 1 and 10000^(-1/2)
    expected = torch.tensor([[0, 0, 1, 1],
                             [math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)],
                             [math.sin(2), math.sin(0.02), math.cos(2), math.cos(0.02)]], dtype=torch.float64)
    torch.testing.assert_close(table, expected)
    model = tiny_dit()
    # upstream numbers the positions 1 .. N: row 0 is position 1
    torch.testing.assert_close(model.pos_embed[0].double(), sincos_table(torch.arange(1, 31), 16), atol=1e-7, rtol=0)


def test_timestep_features_known_values():
    features = tiny_dit().t_embedder.features(torch.tensor([0, 3]))
    half = features.shape[1] // 2
    assert (features[0, :half] == 1).all() and (features[0, half:] == 0).all()        # [cos, sin]
    assert features[1, 0].item() == pytest.approx(math.cos(3))
    assert features[1, half].item() == pytest.approx(math.sin(3))


def test_tokens_are_t_major():
    # at initialisation every block is the identity (zero gates), so each output cell depends only on its own
    # token: perturbing pos_embed row t*H'*W' + h*W' + w must change output cell (t, h, w) and nothing else
    model = tiny_dit(depth=2).eval()                    # no condition dropout between the two forwards
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.final_layer.parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
    x, t, traj = inputs(1)
    before = model(x, t, traj)
    _, frames, height, width = LATENT_SHAPE
    frame, row, col = 1, 2, 3
    with torch.no_grad():
        model.pos_embed[0, frame * height * width + row * width + col] += 1.0
    changed = (model(x, t, traj) - before).abs().sum(dim=1)[0]                           # (T', H', W')
    assert changed[frame, row, col] > 0
    changed[frame, row, col] = 0
    assert (changed == 0).all()


PATCHED_LATENT = (4, 2, 4, 6)      # (C, T', H', W') at patch_size 2: 2 x 2 x 3 = 12 tokens


def patched_dit():
    return DiT(PATCHED_LATENT, COND_SHAPE, hidden_size=16, depth=2, num_heads=2, patch_size=2).eval()


def test_patch_size_tokenises_patches_and_puts_every_output_cell_back():
    model = patched_dit()
    channels, frames, height, width = PATCHED_LATENT
    assert model.pos_embed.shape == (1, frames * (height // 2) * (width // 2), 16)
    assert model.final_layer.linear.out_features == 2 * 2 * 2 * channels
    # with a zero output weight each token outputs the bias: slot (p, q, c) must land in cell (2h + p, 2w + q)
    with torch.no_grad():
        model.final_layer.linear.bias.copy_(torch.arange(model.final_layer.linear.out_features, dtype=torch.float32))
    _, t, traj = inputs(1)
    out = model(torch.randn(1, *PATCHED_LATENT), t, traj)[0]                                 # (2C, T', H', W')
    for p in range(2):
        for q in range(2):
            expected = torch.arange(2 * channels, dtype=torch.float32) + (p * 2 + q) * 2 * channels
            cells = out[:, :, p::2, q::2]                                               # (2C, T', H'/2, W'/2)
            assert (cells == expected[:, None, None, None]).all()


def test_patch_tokens_are_t_major_and_cover_their_own_cells():
    model = patched_dit()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.final_layer.parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
    x, t, traj = torch.randn(1, *PATCHED_LATENT), torch.tensor([5]), torch.randn(1, *COND_SHAPE)
    before = model(x, t, traj)
    _, frames, height, width = PATCHED_LATENT
    frame, row, col = 1, 1, 2                                                           # a token of the 2 x 3 grid
    with torch.no_grad():
        model.pos_embed[0, frame * (height // 2) * (width // 2) + row * (width // 2) + col] += 1.0
    changed = (model(x, t, traj) - before).abs().sum(dim=1)[0]                           # (T', H', W')
    patch = changed[frame, 2 * row:2 * row + 2, 2 * col:2 * col + 2]
    assert (patch > 0).all()
    changed[frame, 2 * row:2 * row + 2, 2 * col:2 * col + 2] = 0
    assert (changed == 0).all()


@pytest.mark.parametrize('patch_size', [2, 3, 4, 5])
def test_every_latent_cell_reaches_the_tokens(patch_size):
    """A 3-wide kernel strided by more than 3 would skip cells: each input cell must move some token."""
    latent = (2, 2, 2 * patch_size, 3 * patch_size)
    model = DiT(latent, COND_SHAPE, hidden_size=16, depth=1, num_heads=2, patch_size=patch_size)
    x = torch.randn(1, *latent, requires_grad=True)
    tokens = model.token_embed(model.network_input(x, None, None))               # (1, D, T', H'/p, W'/p)
    grad, = torch.autograd.grad(tokens.pow(2).sum(), x)
    assert tokens.shape[2:] == (2, 2, 3) and (grad.abs().sum(dim=1) > 0).all()


def test_patch_size_must_divide_the_latent_and_1_is_upstream():
    with pytest.raises(ValueError, match='patch_size 2 must be >= 1 and divide the latent'):
        DiT(LATENT_SHAPE, COND_SHAPE, hidden_size=16, depth=1, num_heads=2, patch_size=2)     # H' = 3
    one = DiT(LATENT_SHAPE, COND_SHAPE, hidden_size=16, depth=1, num_heads=2, patch_size=1)
    default = DiT(LATENT_SHAPE, COND_SHAPE, hidden_size=16, depth=1, num_heads=2)
    assert one.token_embed[0].stride == (1, 1, 1) and count(one) == count(default)


def test_trajectory_changes_the_output_and_null_is_used_without_one():
    model = randomise_(tiny_dit())
    x, t, traj = inputs(2)
    conditional = model(x, t, traj)
    assert not torch.allclose(conditional, model(x, t, traj + 1.0))
    null = model(x, t, None)
    torch.testing.assert_close(model(x, t, traj, force_drop=torch.tensor([True, True])), null)
    mixed = model(x, t, traj, force_drop=torch.tensor([False, True]))
    torch.testing.assert_close(mixed[0], conditional[0])
    torch.testing.assert_close(mixed[1], null[1])
    assert not torch.allclose(conditional, null)


def test_training_dropout_is_per_sample_and_off_in_eval():
    model = randomise_(tiny_dit(class_dropout_prob=0.5))
    x, t, traj = inputs(64)
    conditional, null = model(x, t, traj), model(x, t, None)
    torch.manual_seed(0)
    dropped = model.train()(x, t, traj)
    is_null = torch.isclose(dropped, null).flatten(1).all(1)
    is_conditional = torch.isclose(dropped, conditional).flatten(1).all(1)
    assert (is_null ^ is_conditional).all()
    assert 16 <= is_null.sum() <= 48
    torch.testing.assert_close(model.eval()(x, t, traj), conditional)
    always = randomise_(tiny_dit(class_dropout_prob=1.0)).train()
    torch.testing.assert_close(always(x, t, traj), always(x, t, None))


def test_every_parameter_gets_a_gradient_in_training():
    # DDP without find_unused_parameters needs a gradient for every parameter, null_traj included
    model = tiny_dit(class_dropout_prob=0.1).train()
    x, t, traj = inputs(2)
    torch.manual_seed(3)
    model(x, t, traj).square().sum().backward()
    assert all(param.grad is not None for param in model.parameters())


@pytest.mark.parametrize('cfg_scale', [1.0, 4.0])
def test_forward_with_cfg_guides_all_channels(cfg_scale):
    model = randomise_(tiny_dit())
    x, t, traj = inputs(2)
    conditional, null = model(x, t, traj), model(x, t, None)
    channels = LATENT_SHAPE[0]
    guided = model.forward_with_cfg(x, t, traj, cfg_scale)
    assert guided.shape == conditional.shape
    expected_eps = null[:, :channels] + cfg_scale * (conditional[:, :channels] - null[:, :channels])
    torch.testing.assert_close(guided[:, :channels], expected_eps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(guided[:, channels:], conditional[:, channels:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.forward_with_cfg(x, t, None, cfg_scale), null)


def test_without_null_embedding_guidance_and_unconditional_raise():
    model = tiny_dit(class_dropout_prob=0.0)
    x, t, traj = inputs(2)
    with pytest.raises(ValueError, match='nothing to guide with'):
        model.forward_with_cfg(x, t, traj, 4.0)
    with pytest.raises(ValueError, match='no null trajectory embedding'):
        model(x, t, None)


def test_bad_inputs_raise_clear_errors():
    model = tiny_dit()
    x, t, traj = inputs(2)
    with pytest.raises(ValueError, match=r'x must have shape \(B, \*latent_shape\)'):
        model(x[:, :, :1], t, traj)
    with pytest.raises(ValueError, match=r'traj must have shape \(B, T, cond_channels\) = \(2, 6, 2\)'):
        model(x, t, traj[:, :5])
    with pytest.raises(ValueError, match=r't must have shape \(B,\)'):
        model(x, t[:1], traj)
    with pytest.raises(ValueError, match='force_drop must be'):
        model(x, t, traj, force_drop=torch.tensor([True]))
    with pytest.raises(ValueError, match='latent_shape'):
        DiT((4, 2, 3), COND_SHAPE, hidden_size=16, depth=1, num_heads=2)
    with pytest.raises(ValueError, match='class_dropout_prob'):
        DiT(LATENT_SHAPE, COND_SHAPE, hidden_size=16, depth=1, num_heads=2, class_dropout_prob=1.5)


# ---------------------------------------------------------------------------------------------------------------
# Known-prefix conditioning

def test_known_prefix_adds_exactly_the_extra_input_channels():
    # C known channels + 1 mask channel into the first 3^3 conv of width 256: (128 + 1) * 27 * 256 weights
    plain = build_dit('DiT-XL/2', latent_shape=(128, 4, 25, 25), cond_shape=(32, 2), class_dropout_prob=0.0)
    forecasting = build_dit('DiT-XL/2', latent_shape=(128, 4, 25, 25), cond_shape=(32, 2), class_dropout_prob=0.0,
                            known_prefix=True)
    assert count(forecasting) - count(plain) == 129 * 27 * 256 == 891_648
    assert forecasting.token_embed[0].in_channels == 2 * 128 + 1


def test_known_latents_reach_the_network_only_at_known_steps():
    model = randomise_(tiny_dit(known_prefix=True))
    x, t, traj = inputs(2)
    known = torch.randn_like(x)
    nothing = torch.zeros(2, LATENT_SHAPE[1], dtype=torch.bool)
    first = torch.tensor([[True, False], [True, False]])
    # nothing known: the known values are ignored, and it is what the network sees without them
    torch.testing.assert_close(model(x, t, traj, known=known, known_mask=nothing), model(x, t, traj))
    with_first = model(x, t, traj, known=known, known_mask=first)
    assert not torch.allclose(with_first, model(x, t, traj))
    changed_unknown, changed_known = known.clone(), known.clone()
    changed_unknown[:, :, 1] += 5.0
    changed_known[:, :, 0] += 5.0
    torch.testing.assert_close(model(x, t, traj, known=changed_unknown, known_mask=first), with_first)
    assert not torch.allclose(model(x, t, traj, known=changed_known, known_mask=first), with_first)


def test_forward_with_cfg_passes_the_known_latents_to_both_branches():
    model = randomise_(tiny_dit(known_prefix=True))
    x, t, traj = inputs(2)
    known, known_mask = torch.randn_like(x), torch.tensor([[True, False], [False, False]])
    conditional = model(x, t, traj, known=known, known_mask=known_mask)
    null = model(x, t, None, known=known, known_mask=known_mask)
    channels = LATENT_SHAPE[0]
    guided = model.forward_with_cfg(x, t, traj, 3.0, known=known, known_mask=known_mask)
    torch.testing.assert_close(guided[:, :channels], null[:, :channels] + 3.0 * (conditional - null)[:, :channels],
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(guided[:, channels:], conditional[:, channels:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.forward_with_cfg(x, t, None, 3.0, known=known, known_mask=known_mask), null)


def test_every_parameter_gets_a_gradient_with_known_prefix():
    model = tiny_dit(known_prefix=True).train()
    x, t, traj = inputs(2)
    model(x, t, traj, known=x, known_mask=prefix_mask(torch.tensor([1, 0]), 2)).square().sum().backward()
    assert all(param.grad is not None for param in model.parameters())


def test_prefix_mask_and_drawn_prefix_lengths():
    assert prefix_mask(torch.tensor([0, 1, 3]), 3).tolist() == [[False] * 3, [True, False, False], [True] * 3]
    torch.manual_seed(0)
    assert (draw_prefix_lengths(100, 4, prob=0.0) == 0).all()
    always = draw_prefix_lengths(300, 4, prob=1.0)
    assert set(always.tolist()) == {1, 2, 3}                       # never 0, never the whole clip
    half = draw_prefix_lengths(2000, 4, prob=0.5)
    assert 900 < (half == 0).sum() < 1100 and half.max() == 3
    with pytest.raises(ValueError, match='nothing left to forecast'):
        draw_prefix_lengths(2, 1, prob=0.5)
    with pytest.raises(ValueError, match='prob must lie in'):
        draw_prefix_lengths(2, 4, prob=1.5)


def test_known_inputs_raise_clear_errors():
    x, t, traj = inputs(2)
    mask = torch.zeros(2, LATENT_SHAPE[1], dtype=torch.bool)
    with pytest.raises(ValueError, match='built with known_prefix=False'):
        tiny_dit()(x, t, traj, known=x, known_mask=mask)
    model = tiny_dit(known_prefix=True)
    with pytest.raises(ValueError, match='or neither'):
        model(x, t, traj, known=x)
    with pytest.raises(ValueError, match=r'known_mask must be a bool tensor of shape \(B, T\'\) = \(2, 2\)'):
        model(x, t, traj, known=x, known_mask=mask.float())
    with pytest.raises(ValueError, match='known must have the shape of x'):
        model(x, t, traj, known=x[:1], known_mask=mask)
