"""The per-cell trajectory map (model/trajectory_map.py) and the DiT flag that feeds it (model/dit.py)."""
import math

import numpy as np
import pytest
import torch

from dataset.trajectories import preset_path
from model.dit import DiT
from model.trajectory_map import (MAP_CHANNELS, chain_static_warp, headings, latent_step_poses, trajectory_map,
                                  warp_latent)


def test_headings_follow_the_path_and_hold_through_a_stop():
    x, y, yaw = preset_path('left', 12)
    recovered = headings(torch.tensor(np.stack([x, y], 1), dtype=torch.float32)[None])[0].numpy()
    assert recovered[0] == 0
    # the chord heading lags the true yaw by at most half a frame's turn inside the arc
    np.testing.assert_allclose(recovered, yaw, atol=math.radians(16))
    assert recovered[-1] == pytest.approx(math.pi / 2, abs=1e-4)
    stop = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0]])[None]
    np.testing.assert_allclose(headings(stop)[0].numpy(), [0.0, math.pi / 4, math.pi / 4, math.pi / 4], atol=1e-6)


def test_a_static_point_keeps_its_code():
    # straight ahead by exactly one latent cell (80 m / 20 cells = 4 m) per latent step of two frames
    traj = torch.stack([torch.arange(8) * 2.0, torch.zeros(8)], 1)[None]                   # (1, 8, 2)
    maps = trajectory_map(traj, (4, 4, 20, 20))                                            # (1, M, 4, 20, 20)
    assert maps.shape == (1, MAP_CHANNELS, 4, 20, 20)
    position, yaw = latent_step_poses(traj, 4)
    np.testing.assert_allclose(position[0, :, 0].numpy(), [1, 5, 9, 13])
    # the mean position of step tau is 1 + 4 tau metres: cell i of step tau is cell i + tau of step 0
    for tau in range(1, 4):
        torch.testing.assert_close(maps[0, :, tau, :20 - tau], maps[0, :, 0, tau:], rtol=0, atol=1e-5)
    assert not torch.allclose(maps[0, :, 1], maps[0, :, 0])


def test_a_turn_rotates_the_map():
    x, y, _ = preset_path('left', 8)
    traj = torch.tensor(np.stack([x, y], 1), dtype=torch.float32)[None]
    maps = trajectory_map(traj, (4, 4, 10, 10))
    heading_cos, heading_sin = maps[0, -2, :, 0, 0], maps[0, -1, :, 0, 0]
    # 0 degrees, then the last step's frames (77 and 90 degrees into the turn, dataset/trajectories.py)
    assert heading_cos[0] > 0.99 and heading_sin[-1] > math.sin(math.radians(65))
    with pytest.raises(ValueError, match='multiple'):
        trajectory_map(traj[:, :7], (4, 4, 10, 10))


def tiny_dit(**kwargs):
    torch.manual_seed(0)
    return DiT((2, 2, 4, 4), (4, 2), hidden_size=16, depth=1, num_heads=2, **kwargs)


def test_trajectory_map_flag_adds_only_the_input_channels():
    plain, mapped = tiny_dit(), tiny_dit(trajectory_map=True, traj_scale=10.0)
    extra = sum(p.numel() for p in mapped.parameters()) - sum(p.numel() for p in plain.parameters())
    conv = plain.token_embed[0]
    assert extra == MAP_CHANNELS * conv.out_channels * math.prod(conv.kernel_size)
    with pytest.raises(ValueError, match='traj_xy'):
        DiT((2, 2, 4, 4), (4, 3), hidden_size=16, depth=1, num_heads=2, trajectory_map=True)


def test_the_map_steers_each_cell_and_vanishes_when_dropped():
    model = tiny_dit(trajectory_map=True, traj_scale=10.0).eval()
    for block in model.blocks:                         # adaLN-Zero starts every block as the identity: open them
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.1)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)
    x, t = torch.randn(2, 2, 2, 4, 4), torch.tensor([10, 500])
    left, right = (torch.tensor(np.stack(preset_path(name, 4)[:2], 1) / 10.0, dtype=torch.float32)[None].expand(2, -1, -1)
                   for name in ('left', 'right'))
    assert not torch.allclose(model(x, t, left), model(x, t, right))
    # dropped: the null embedding and a zero map, whatever the trajectory
    drop = torch.ones(2, dtype=torch.bool)
    torch.testing.assert_close(model(x, t, left, force_drop=drop), model(x, t, right, force_drop=drop))
    torch.testing.assert_close(model(x, t, left, force_drop=drop), model(x, t, None))


def test_warp_moves_a_static_scene_by_the_ego_motion():
    # the ego moves 4 m (one cell of a 20-cell latent) forward: a point at cell i is then at cell i - 1
    latent = torch.randn(1, 3, 20, 20)
    warped, in_view = warp_latent(latent, torch.zeros(1, 2), torch.zeros(1), torch.tensor([[[4.0, 0.0]]]),
                                  torch.zeros(1, 1), mode='nearest')
    assert warped.shape == (1, 3, 1, 20, 20) and in_view.shape == (1, 1, 1, 20, 20)
    torch.testing.assert_close(warped[0, :, 0, :19], latent[0, :, 1:])
    assert in_view[0, 0, 0, :19].all() and not in_view[0, 0, 0, 19].any() and not warped[0, :, 0, 19].any()
    # a quarter turn to the left on the spot: what was on the left (+y) is now ahead (+x)
    turned, _ = warp_latent(latent, torch.zeros(1, 2), torch.zeros(1), torch.zeros(1, 1, 2),
                            torch.full((1, 1), math.pi / 2), mode='nearest')
    torch.testing.assert_close(turned[0, :, 0], torch.rot90(latent[0], k=-1, dims=(1, 2)))
    assert torch.equal(turned[0, :, 0, 19, 10], latent[0, :, 9, 19])                   # ahead <- left


def test_chain_static_warp_follows_the_trajectory_where_the_gate_is_open():
    traj = torch.stack([torch.arange(8) * 2.0, torch.zeros(8)], 1)[None]                 # one cell per latent step
    x0 = torch.randn(1, 2, 4, 20, 20)
    composed = chain_static_warp(x0, traj, gate=torch.ones(1, 1, 4, 20, 20))
    for tau in range(1, 4):
        torch.testing.assert_close(composed[0, :, tau, :20 - tau], x0[0, :, 0, tau:])      # moved step 0
        torch.testing.assert_close(composed[0, :, tau, 20 - 1], x0[0, :, tau, 20 - 1])     # newly seen: own
    torch.testing.assert_close(chain_static_warp(x0, traj, gate=torch.zeros(1, 1, 4, 20, 20)), x0)


def test_static_warp_dit_keeps_the_parameterisation_and_leaves_dropped_samples_alone():
    schedule = dict(prediction_type='v_prediction')
    plain = tiny_dit(static_warp='gated', traj_scale=1.0, schedule=schedule).eval()
    for block in plain.blocks:
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.1)
    torch.nn.init.normal_(plain.final_layer.linear.weight, std=0.1)
    x, t = torch.randn(2, 2, 2, 4, 4), torch.tensor([10, 500])
    traj = torch.tensor(np.stack(preset_path('left', 4)[:2], 1), dtype=torch.float32)[None].expand(2, -1, -1)
    out = plain(x, t, traj)
    assert out.shape == (2, 4, 2, 4, 4)                                                   # the gate is consumed
    drop = torch.ones(2, dtype=torch.bool)
    torch.testing.assert_close(plain(x, t, traj, force_drop=drop), plain(x, t, None))
    assert not torch.allclose(out, plain(x, t, traj, force_drop=drop))
    # the composed prediction implies clean latents whose step 0 is the network's own
    plain.static_warp = False                          # the raw output: prediction || variance || gate logit
    raw = plain(x, t, traj)
    plain.static_warp = True
    diffusion = plain.diffusion
    torch.testing.assert_close(diffusion.predicted_x0(out[:, :2], x, t)[:, :, 0],
                               diffusion.predicted_x0(raw[:, :2], x, t)[:, :, 0], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match='static_warp'):
        DiT((2, 1, 4, 4), (4, 2), hidden_size=16, depth=1, num_heads=2, static_warp='hard')
    with pytest.raises(ValueError, match='static_warp'):
        DiT((2, 2, 4, 4), (4, 2), hidden_size=16, depth=1, num_heads=2, static_warp=True)
