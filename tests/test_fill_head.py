"""The fill of the space that came into view (evaluation/fill_head.py): extrusion on hand-made columns, the head's
start at the extruded copy, that it learns a fill extrusion misses, and its command line with the forecast
protocol on the tiny synthetic world of tests/conftest.py."""
import pytest
import torch

from dataset.constants import CLASS_ID, FREE_CLASS
from evaluation import fill_head, forecast

ROAD, CAR, TERRAIN, VEGETATION = (CLASS_ID[name] for name in ('driveable_surface', 'car', 'terrain', 'vegetation'))


def test_extrusion_continues_the_last_seen_column_and_frees_agents():
    prediction = torch.full((1, 6, 3, 2), FREE_CLASS, dtype=torch.uint8)           # (H, X, Y, Z)
    prediction[0, :3, :, 0] = ROAD
    prediction[0, 2, 1, 1] = CAR                                                    # an agent on the last seen row
    prediction[0, 4, 2, 0] = TERRAIN                                                # unseen, nothing seen behind it
    prediction[0, 5, 0, 1] = CAR                                                    # an agent moved into view
    seen = torch.zeros(1, 6, 3, dtype=torch.bool)
    seen[0, :3, :2] = True                                                          # rows x 0..2 of columns y 0, 1
    filled = fill_head.extrude_into_view(prediction, seen)
    assert torch.equal(filled[0, :3, :2], prediction[0, :3, :2])                    # seen columns untouched
    assert (filled[0, 3:, :2, 0] == ROAD).all()                                     # the road runs on
    assert (filled[0, 3:5, :2, 1] == FREE_CLASS).all() and filled[0, 5, 1, 1] == FREE_CLASS   # the car is not
    assert filled[0, 5, 0, 1] == CAR                                                # repeated; the one moved in stays
    assert torch.equal(filled[0, :, 2], prediction[0, :, 2])                        # no seen column behind: as it was


def test_untrained_head_returns_the_extruded_copy_and_never_draws_agents():
    torch.manual_seed(0)
    guess = torch.randint(11, 18, (2, 16, 16, 4), dtype=torch.uint8)[None]          # static classes and free
    guess[0, 0, :4, :4, 0] = CAR                                                    # an agent in a seen column
    guess[0, 1, 12, 12, 1] = CAR                                                    # and one moved into view
    seen = torch.zeros(1, 2, 16, 16, dtype=torch.bool)
    seen[:, :, :8] = True
    head = fill_head.FillHead(width=8, height=4)
    assert torch.equal(fill_head.fill(head, guess, seen, [1.0, 2.0]), guess)
    logits = head(guess[0], seen[0], torch.tensor([1.0, 2.0]))
    assert logits.shape == (2, 18, 16, 16, 4) and (logits[:, CAR] == fill_head.MOVABLE_LOGIT).all()


def test_head_learns_a_fill_that_extrusion_misses():
    """Terrain extruded into view where the truth is vegetation: a few steps of the training loss teach the head to
    draw vegetation there, and only there."""
    torch.manual_seed(0)
    guess = torch.full((2, 16, 16, 2), FREE_CLASS, dtype=torch.uint8)
    guess[..., 0] = TERRAIN
    target = guess.clone()
    target[:, 8:, :, 0] = VEGETATION
    seen = torch.zeros(2, 16, 16, dtype=torch.bool)
    seen[:, :8] = True
    horizon = torch.tensor([1.0, 2.0])
    head = fill_head.FillHead(width=8, height=2)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2)
    first = fill_head.new_column_loss(head, guess, seen, target, horizon).item()
    for _ in range(30):
        loss = fill_head.new_column_loss(head, guess, seen, target, horizon)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < first / 4
    filled = fill_head.fill(head, guess[:, None], seen[:, None], [1.0])[:, 0]
    assert torch.equal(filled[:, 8:], target[:, 8:]) and torch.equal(filled[:, :8], guess[:, :8])


def test_fill_head_command_line_and_the_protocol(tokenizer_config, tmp_path):
    path = str(tmp_path / 'fill.pt')
    checkpoint = fill_head.main(['--py-config', tokenizer_config, '--context-frames', '2', '--out', path,
                                 '--steps', '2', '--width', '8', '--log-every', '1'])
    assert checkpoint['context_frames'] == 2 and checkpoint['steps'] == 2
    result = forecast.main(['--baselines-only', '--py-config', tokenizer_config, '--context-frames', '2',
                            '--stride', '4', '--fill-head', path])
    assert list(result['metrics']) == [*forecast.BASELINES, forecast.FILL_HEAD_METHOD]     # after the extruded copy
    with pytest.raises(ValueError, match='trained after 2 context frames, the forecast has 3'):
        forecast.main(['--baselines-only', '--py-config', tokenizer_config, '--context-frames', '3',
                       '--fill-head', path])
    with pytest.raises(ValueError, match='--context-frames must be at least 2'):
        fill_head.main(['--py-config', tokenizer_config, '--context-frames', '1', '--out', path])
