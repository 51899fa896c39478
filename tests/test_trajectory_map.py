"""The per-cell trajectory map (model/trajectory_map.py) and the DiT flag that feeds it (model/dit.py)."""
import math

import numpy as np
import pytest
import torch

from dataset.trajectories import preset_path
from model.dit import DiT
from model.trajectory_map import MAP_CHANNELS, headings, latent_step_poses, trajectory_map


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
    assert heading_cos[0] > 0.99 and heading_sin[-1] > 0.99                               # 0 -> 90 degrees
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
