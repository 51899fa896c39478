"""Filling the space that came into view: the forecast protocol's learned baseline (evaluation/forecast.py).

A copy of the last context frame moved into a future frame's view (dataset/ego_warp.py, evaluation/constant_velocity.py)
knows nothing of the columns that came into view after that frame: it leaves them free. Two fills of those columns:

- ``extrude_into_view``, no model: each such column takes the nearest seen column behind it (lower x, same y) of
  the same frame, its movable classes made free, so the road's cross-section runs on straight ahead;
- ``FillHead``, learnt: a BEV U-Net that refines the extruded copy. Input: the extruded copy (each voxel's class
  embedded in EMBED_DIM values, the heights folded into channels), where the last context frame saw, and the
  horizon in seconds. Output: class logits of every voxel = a learnt scale x the one-hot extruded copy + a
  correction whose last layer starts at zero, so an untrained head returns the extruded copy. It draws no movable
  class (agents are the copy's), and only the columns that came into view take its prediction.

The head is trained on the train split of a dataset config, with cross-entropy over the voxels of the columns that
came into view (but those of agents, which it does not draw), at +1, +2 and +3 s after K context frames of random
clips (the guess computed on the fly, so any dataset size fits in memory):

    python -m evaluation.fill_head --py-config DATASET.py --context-frames 4 --out FILL.pt [--steps 240]

and ``python -m evaluation.forecast ... --fill-head FILL.pt`` reports ``constant_velocity_copy_filled_by_head``.
"""
import argparse
import logging
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.config import Config

from dataset.constants import FREE_CLASS, GRID_SHAPE, KEYFRAME_HZ, MOVABLE_CLASSES, NUM_CLASSES
from dataset.loader import build_dataset
from evaluation.constant_velocity import constant_velocity_copy
from utils.checkpoint import atomic_save, load_checkpoint

EMBED_DIM = 4                # values per voxel class at the input
HORIZONS_S = (1, 2, 3)       # horizons trained, seconds after the last context frame
MOVABLE_LOGIT = -1e4         # the logit of a movable class: never drawn


def extrude_into_view(prediction, seen):
    """``prediction`` (..., X, Y, Z) uint8 with every column that came into view (``seen`` (..., X, Y) bool False)
    taken from the nearest seen column behind it (lower x, same y), movable classes made free; the prediction's own
    agents there (moved into view) stay, and columns with no seen column behind them are left as they are."""
    flat = prediction.reshape(-1, *prediction.shape[-3:]).numpy()                     # (N, X, Y, Z)
    seen_flat = seen.reshape(-1, *seen.shape[-2:]).numpy()                              # (N, X, Y)
    size_x = seen_flat.shape[1]
    seen_x = np.where(seen_flat, np.arange(size_x)[None, :, None], -1)
    source_x = np.maximum.accumulate(seen_x, axis=1)                                # (N, X, Y): last seen x behind
    n, _, y = np.indices(seen_flat.shape)
    fill = flat[n, np.clip(source_x, 0, None), y]                                   # (N, X, Y, Z)
    fill = np.where(np.isin(fill, MOVABLE_CLASSES), FREE_CLASS, fill)
    use = ((~seen_flat) & (source_x >= 0))[..., None] & ~np.isin(flat, MOVABLE_CLASSES)
    filled = flat.copy()
    filled[use] = fill[use]
    return torch.from_numpy(filled).reshape(prediction.shape)


def extruded_copy(clips, poses, context_frames, frames):
    """The constant-velocity copy of ``frames`` (H indices) of clips (B, T, X, Y, Z) uint8 with ego poses (B, T, 3),
    filled by extrusion: (B, H, X, Y, Z) uint8, and where the last context frame saw, (B, H, X, Y) bool."""
    moving, seen = constant_velocity_copy(clips, poses, context_frames, frames, return_seen=True)
    return extrude_into_view(moving, seen), seen


def _stage(channels_in, channels_out, stride=1):
    """Two 3 x 3 convolutions with GroupNorm and SiLU, the first of stride ``stride``."""
    return nn.Sequential(nn.Conv2d(channels_in, channels_out, 3, stride, 1), nn.GroupNorm(8, channels_out), nn.SiLU(),
                         nn.Conv2d(channels_out, channels_out, 3, 1, 1), nn.GroupNorm(8, channels_out), nn.SiLU())


class FillHead(nn.Module):
    """A BEV U-Net over (X, Y) with three stride-2 levels (widths w, 2w, 3w, 4w), heights folded into channels."""

    def __init__(self, width=32, height=GRID_SHAPE[2]):
        super().__init__()
        if width % 8:
            raise ValueError(f'width must be a multiple of 8 (GroupNorm of 8 groups), got {width}')
        self.embed = nn.Embedding(NUM_CLASSES, EMBED_DIM)
        self.down = nn.ModuleList([_stage(height * EMBED_DIM + 2, width), _stage(width, 2 * width, 2),
                                   _stage(2 * width, 3 * width, 2), _stage(3 * width, 4 * width, 2)])
        self.middle = _stage(4 * width, 4 * width)
        self.up = nn.ModuleList([_stage(7 * width, 3 * width), _stage(5 * width, 2 * width), _stage(3 * width, width)])
        self.out = nn.Conv2d(width, NUM_CLASSES * height, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.prior_scale = nn.Parameter(torch.tensor(4.0))

    def forward(self, guess, seen, horizon_s):
        """guess (B, X, Y, Z) uint8, seen (B, X, Y) bool, horizon_s (B,) float -> logits (B, C, X, Y, Z)."""
        batch, size_x, size_y, height = guess.shape
        classes = guess.long()
        x = self.embed(classes).reshape(batch, size_x, size_y, height * EMBED_DIM).permute(0, 3, 1, 2)
        extra = torch.stack([seen.float(), (horizon_s.float() / max(HORIZONS_S))[:, None, None]
                             .expand(batch, size_x, size_y)], 1)
        skips = []
        x = torch.cat([x, extra], 1)
        for stage in self.down:
            x = stage(x)
            skips.append(x)
        x = self.middle(skips.pop())
        for stage in self.up:
            skip = skips.pop()
            x = stage(torch.cat([F.interpolate(x, size=skip.shape[-2:], mode='nearest'), skip], 1))
        correction = self.out(x).reshape(batch, NUM_CLASSES, height, size_x, size_y).permute(0, 1, 3, 4, 2)
        logits = self.prior_scale * F.one_hot(classes, NUM_CLASSES).permute(0, 4, 1, 2, 3).float() + correction
        logits[:, list(MOVABLE_CLASSES)] = MOVABLE_LOGIT
        return logits


@torch.no_grad()
def fill(head, guess, seen, horizon_s):
    """The extruded copy ``guess`` (B, H, X, Y, Z) uint8 with the columns that came into view (``seen`` (B, H, X, Y)
    False) taken from the head but for the guess's agents, the H horizons ``horizon_s`` (H,) seconds:
    (B, H, X, Y, Z) uint8."""
    head.eval()
    filled = []
    for clip_guess, clip_seen in zip(guess, seen):
        predicted = head(clip_guess, clip_seen, torch.as_tensor(horizon_s, dtype=torch.float32)).argmax(1)
        keep = clip_seen[..., None] | torch.isin(clip_guess, torch.tensor(MOVABLE_CLASSES, dtype=clip_guess.dtype))
        filled.append(torch.where(keep, clip_guess, predicted.to(torch.uint8)))
    return torch.stack(filled)


def new_column_loss(head, guess, seen, target, horizon_s):
    """The head's training loss: cross-entropy of its logits for ``guess`` (B, X, Y, Z) uint8 against ``target``
    (B, X, Y, Z) uint8, over the voxels of the columns that came into view (``seen`` (B, X, Y) False) whose target
    is not an agent; 0 (with a graph) where there are none."""
    voxel_loss = F.cross_entropy(head(guess, seen, horizon_s), target.long(), reduction='none')     # (B, X, Y, Z)
    counted = (~seen)[..., None] & ~torch.isin(target, torch.tensor(MOVABLE_CLASSES, dtype=target.dtype))
    return voxel_loss[counted].mean() if counted.any() else voxel_loss.sum() * 0


def load_fill_head(path, context_frames):
    """The FillHead of a checkpoint written by this module's command line, for forecasts from ``context_frames``
    known frames (it must have been trained so)."""
    checkpoint = load_checkpoint(path, required_keys=('model', 'model_args', 'context_frames'))
    if checkpoint['context_frames'] != context_frames:
        raise ValueError(f'{path} was trained after {checkpoint["context_frames"]} context frames, the forecast has '
                         f'{context_frames}')
    head = FillHead(**checkpoint['model_args'])
    head.load_state_dict(checkpoint['model'])
    return head.eval()


def train(args):
    """Train a FillHead on random clips of the train split (module docstring); returns the checkpoint dict."""
    if args.context_frames < 2:
        raise ValueError(f'--context-frames must be at least 2 (the copy moves agents by the earlier frames), got '
                         f'{args.context_frames}')
    torch.manual_seed(args.seed)
    generator = np.random.default_rng(args.seed)
    overrides = {'stride': args.stride} if args.stride else {}
    clip_frames = args.context_frames + KEYFRAME_HZ * max(HORIZONS_S)
    dataset = build_dataset(Config.fromfile(args.py_config), 'train', mode='sliding', num_frames=clip_frames,
                            load_ego_pose=True, **overrides)
    if not len(dataset):
        raise ValueError(f'{args.py_config}: its train split has no clip of {clip_frames} frames')
    model_args = {'width': args.width}
    head = FillHead(**model_args)
    optimizer = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=0.0)
    start, losses = time.time(), []
    for step in range(1, args.steps + 1):
        guesses, seens, targets, horizons = [], [], [], []
        for index in generator.integers(len(dataset), size=args.batch_size):
            item = dataset[int(index)]
            seconds = int(generator.choice(HORIZONS_S))
            frame = args.context_frames - 1 + KEYFRAME_HZ * seconds
            guess, seen = extruded_copy(item['occupancy'][None], item['ego_pose'][None], args.context_frames, [frame])
            guesses.append(guess[0, 0])
            seens.append(seen[0, 0])
            targets.append(item['occupancy'][frame])
            horizons.append(seconds)
        head.train()
        loss = new_column_loss(head, torch.stack(guesses), torch.stack(seens), torch.stack(targets),
                               torch.tensor(horizons, dtype=torch.float32))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % args.log_every == 0 or step == args.steps:
            logging.info('step %d/%d  loss over the new columns %.4f  %.1f min', step, args.steps,
                         float(np.mean(losses[-args.log_every:])), (time.time() - start) / 60)
    checkpoint = {'model': {k: v.cpu() for k, v in head.state_dict().items()}, 'model_args': model_args,
                  'context_frames': args.context_frames, 'py_config': args.py_config, 'steps': args.steps,
                  'batch_size': args.batch_size, 'lr': args.lr, 'seed': args.seed, 'stride': dataset.stride,
                  'final_loss': float(np.mean(losses[-args.log_every:]))}
    atomic_save(checkpoint, args.out)
    logging.info('wrote %s (%d train clips, %.1f min)', args.out, len(dataset), (time.time() - start) / 60)
    return checkpoint


def main(argv=None):
    parser = argparse.ArgumentParser(description='Train the fill head of the forecast protocol (module docstring).')
    parser.add_argument('--py-config', required=True, help='dataset config (its train split)')
    parser.add_argument('--context-frames', type=int, required=True, help='known frames K of the forecasts')
    parser.add_argument('--out', required=True, help='checkpoint to write')
    parser.add_argument('--steps', type=int, default=240)
    parser.add_argument('--batch-size', type=int, default=2)
    parser.add_argument('--lr', type=float, default=1e-3)
    parser.add_argument('--width', type=int, default=32)
    parser.add_argument('--stride', type=int, help='sliding-window stride (default: the dataset config\'s)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--log-every', type=int, default=20)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s')
    return train(args)


if __name__ == '__main__':
    main()
