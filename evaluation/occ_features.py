"""The occupancy feature extractor of the generation metrics (Fréchet distance, MMD; evaluation/evaluate.py).

Upstream reports an FID but never said on which features; this is the documented, shareable replacement: a
small 3D-conv encoder of a whole clip, trained by a command of this project, whose checkpoint (and its sha256,
reported by the evaluation) defines the feature space.

Input: a clip (T, X, Y, Z) uint8 becomes the fraction of every semantic class (free left out) in each block of
BLOCK = 4 x 4 x 4 voxels, with the height blocks folded into channels: (17 * Z/4, T, X/4, Y/4) float.
Network: a per-frame patch embedding (1 x 2 x 2), three 3-D convolutions (stride 2 in time twice, in space
three times) with GroupNorm + SiLU, and global average pooling over (T', X', Y') -> FEATURE_DIM features, so any
clip length works (compare only sets of the same length).

Objective (auxiliary tasks read from the pooled features through one linear layer, so the features themselves
must carry the information). Each training clip has its frames put in a random order with probability
SHUFFLE_PROBABILITY (never the identity), and the network
  - tells whether the frames are in their true order (binary cross-entropy): temporal order verification
    ("Shuffle and Learn", Misra et al. 2016), which makes the features react to incoherent motion; and, for
    the clips in true order, regresses
  - class content: the clip's fraction of each semantic class (17 values, square-rooted);
  - layout: the fraction of each semantic class in each of LAYOUT_CELLS x LAYOUT_CELLS BEV cells (16 m) of the
    first and of the last frame (2 x 17 x 25 values, square-rooted): what is where, and how it moved;
  - ego motion: the mean displacement per frame and the mean speed per frame from the clip's 'traj_xy'
    (3 values, divided by MOTION_SCALE_M), which only a comparison of frames can tell.
Each of the four losses counts equally. Why these: realism of generated occupancy means plausible content,
plausible layout and coherent motion; a task for each keeps the features sensitive to all three, needs no labels
beyond the dataset's own poses, and trains in minutes on a CPU (an autoencoder of the clip would mostly learn to
reproduce ground texture). The features are never trained on generated clips, so they favour no generator; they
are trained to spot shuffled frames, so a "shuffled frames" baseline is an easy ceiling for them (evaluation/evaluate.py
--calibrate reports it next to a frozen-world baseline they never saw).

Usage:
    python -m evaluation.occ_features train --py-config config/demo_vqvae.py --out out/features.pt [--steps 300]
"""
import argparse
import logging
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, reduce
from torch.utils.data import Dataset
from tqdm import tqdm

from dataset.constants import GRID_SHAPE, NUM_CLASSES, SEMANTIC_CLASSES
from dataset.loader import build_dataset, build_loader, set_epoch
from utils.checkpoint import atomic_save, file_sha256, load_checkpoint
from utils.config import add_config_args, load_config
from utils.distributed import default_device

BLOCK = (4, 4, 4)                  # voxels pooled into one input cell along x, y, z
LAYOUT_CELLS = 5                   # layout target: 5 x 5 BEV cells of 16 m (10 x 10 input cells)
MOTION_SCALE_M = 5.0               # metres per frame (10 m/s): scales the motion targets to about 1
FEATURE_DIM = 256
SHUFFLE_PROBABILITY = 0.5
REGRESSION_GROUPS = ('classes', 'layout', 'motion')
logger = logging.getLogger(__name__)


def _block_index():
    """(X, Y, Z) int64 index of every voxel's input cell, in (x block, y block, z block) row-major order."""
    x, y, z = (np.arange(size) // block for size, block in zip(GRID_SHAPE, BLOCK))
    cells = [size // block for size, block in zip(GRID_SHAPE, BLOCK)]
    return (x[:, None, None] * cells[1] + y[None, :, None]) * cells[2] + z[None, None, :]


_BLOCK_INDEX = _block_index()


def clip_input(clip):
    """Network input of one clip (T, X, Y, Z) uint8: per-class fractions in BLOCK cells, (C_in, T, X/4, Y/4)
    float32 with C_in = 17 * Z/4 (channel = class * Z/4 + z block)."""
    clip = np.asarray(clip)
    if clip.ndim != 4 or clip.shape[1:] != GRID_SHAPE or clip.dtype != np.uint8:
        raise ValueError(f'clip must be (T, {", ".join(map(str, GRID_SHAPE))}) uint8, got {clip.shape} {clip.dtype}')
    cells = [size // block for size, block in zip(GRID_SHAPE, BLOCK)]
    counts = np.stack([np.bincount((_BLOCK_INDEX * NUM_CLASSES + frame).ravel(),
                                   minlength=math.prod(cells) * NUM_CLASSES) for frame in clip])
    counts = counts.reshape(len(clip), *cells, NUM_CLASSES)[..., list(SEMANTIC_CLASSES)]   # (T, X', Y', Z', 17)
    fractions = torch.from_numpy(counts.astype(np.float32) / math.prod(BLOCK))
    return rearrange(fractions, 't x y z c -> (c z) t x y')


def clip_targets(inputs, traj):
    """Regression targets of one clip from its `clip_input` (C_in, T, X', Y') and its 'traj_xy' (T, 2):
    dict group -> 1-D float32 tensor (module docstring)."""
    # numpy: several times faster than torch for reductions this small, and this runs once per training clip
    fractions = np.asarray(inputs)
    classes = reduce(fractions, '(c z) t x y -> c', 'mean', c=len(SEMANTIC_CLASSES))                  # (17,)
    layout = reduce(fractions[:, [0, -1]], '(c z) t (i x) (j y) -> t c i j', 'mean', c=len(SEMANTIC_CLASSES),
                    i=LAYOUT_CELLS, j=LAYOUT_CELLS)                                                  # (2, 17, 5, 5)
    traj = np.asarray(traj, np.float32)                                                              # (T, 2)
    steps = max(len(traj) - 1, 1)
    speed = np.linalg.norm(np.diff(traj, axis=0), axis=-1).sum() / steps
    motion = np.append(traj[-1] / steps, speed) / MOTION_SCALE_M                                     # (3,)
    return {'classes': torch.from_numpy(np.sqrt(classes)).float(),
            'layout': torch.from_numpy(np.sqrt(layout).ravel()).float(), 'motion': torch.from_numpy(motion).float()}


def target_sizes():
    """Number of outputs of each head: the order logit and the regression groups."""
    classes = len(SEMANTIC_CLASSES)
    return {'in_order': 1, 'classes': classes, 'layout': 2 * LAYOUT_CELLS ** 2 * classes, 'motion': 3}


class OccFeatureEncoder(nn.Module):
    """3-D conv encoder of occupancy clips (module docstring) with the linear heads of its training objective.

    Args:
        width: channels after the patch embedding (doubled by each of the next two convolutions).
        feature_dim: length of the feature vector.
    """

    def __init__(self, width=32, feature_dim=FEATURE_DIM):
        super().__init__()
        in_channels = len(SEMANTIC_CLASSES) * GRID_SHAPE[2] // BLOCK[2]

        def stage(channels_in, channels_out, stride):
            return nn.Sequential(nn.GroupNorm(8, channels_in), nn.SiLU(),
                                 nn.Conv3d(channels_in, channels_out, 3, stride=stride, padding=1))

        self.encoder = nn.Sequential(
            nn.Conv3d(in_channels, width, (1, 2, 2), stride=(1, 2, 2)),    # (W, T, 25, 25)
            stage(width, 2 * width, 2),                                     # (2W, T/2, 13, 13)
            stage(2 * width, 4 * width, 2),                                 # (4W, T/4, 7, 7)
            stage(4 * width, feature_dim, (1, 2, 2)),                       # (D, T/4, 4, 4)
            nn.GroupNorm(8, feature_dim), nn.SiLU())
        self.heads = nn.Linear(feature_dim, sum(target_sizes().values()))

    def features(self, x):
        """x: (N, C_in, T, X/4, Y/4) from `clip_input` -> (N, feature_dim)."""
        return self.encoder(x).mean((2, 3, 4))

    def forward(self, x):
        """x: (N, C_in, T, X/4, Y/4) -> dict group -> predicted targets (N, size)."""
        predictions = self.heads(self.features(x)).split(list(target_sizes().values()), dim=1)
        return dict(zip(target_sizes(), predictions))


def objective(predictions, targets):
    """The training loss (module docstring) and the order accuracy of a batch. predictions: dict head -> (N, size);
    targets: 'in_order' (N,) in {0, 1} and each regression group (N, size), used where in_order = 1."""
    in_order = targets['in_order']
    order_logit = predictions['in_order'][:, 0]
    loss = F.binary_cross_entropy_with_logits(order_logit, in_order)
    for group in REGRESSION_GROUPS:
        per_clip = ((predictions[group] - targets[group]) ** 2).mean(1)                    # (N,)
        loss = loss + (per_clip * in_order).sum() / in_order.sum().clamp(min=1)
    accuracy = ((order_logit > 0).float() == in_order).float().mean()
    return loss, accuracy


def extract_features(model, clips, batch_size=4):
    """Features of ``clips`` (N, T, X, Y, Z) uint8 (an array, a tensor or a sequence of (T, X, Y, Z) clips):
    (N, feature_dim) float64 numpy."""
    device = next(model.parameters()).device
    model.eval()
    features = []
    with torch.no_grad():
        for start in range(0, len(clips), batch_size):
            batch = torch.stack([clip_input(np.asarray(clip)) for clip in clips[start:start + batch_size]])
            features.append(model.features(batch.to(device)).double().cpu())          # (B, D)
    return torch.cat(features).numpy()


def load_feature_extractor(path, device='cpu'):
    """The encoder of a checkpoint written by `train` (strictly loaded, in eval mode) and the checkpoint dict."""
    checkpoint = load_checkpoint(path, ('model', 'model_args', 'training'))
    model = OccFeatureEncoder(**checkpoint['model_args'])
    model.load_state_dict(checkpoint['model'])
    return model.to(device).eval(), checkpoint


class _TrainingClips(Dataset):
    """(inputs, targets) of the clips of a clip dataset (its items need 'traj_xy'), computed in the loader's workers;
    whether and how a clip's frames are shuffled is a function of (seed, epoch, index)."""

    def __init__(self, clips, seed):
        if clips.num_frames < 2:
            raise ValueError(f'the feature extractor trains on clips of at least 2 frames, got {clips.num_frames}')
        self.clips, self.seed, self.epoch = clips, seed, 0

    def __len__(self):
        return len(self.clips)

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.clips.set_epoch(epoch)

    def __getitem__(self, index):
        item = self.clips[index]
        inputs = clip_input(item['occupancy'].numpy())                                       # (C_in, T, X', Y')
        targets = clip_targets(inputs, item['traj_xy'])
        rng = np.random.default_rng([self.seed, self.epoch, index])
        in_order = rng.random() >= SHUFFLE_PROBABILITY
        if not in_order:
            order = np.arange(inputs.shape[1])
            while (order == np.arange(len(order))).all():
                order = rng.permutation(len(order))
            inputs = inputs[:, torch.from_numpy(order)]
        targets['in_order'] = torch.tensor(float(in_order))
        return inputs, targets


def train(cfg, args):
    """Train the encoder on the config's train split and write the checkpoint to ``args.out``. Returns the
    checkpoint's 'training' record (settings, final training loss, validation loss and order accuracy)."""
    torch.manual_seed(args.seed)
    device = default_device()
    train_set = _TrainingClips(build_dataset(cfg, 'train', conditions=('traj_xy',)), args.seed)
    val_set = _TrainingClips(build_dataset(cfg, 'val', conditions=('traj_xy',), mode='sliding'), args.seed)
    loader = build_loader(train_set, args.batch_size, shuffle=True, seed=args.seed,
                          num_workers=cfg.get('num_workers', 0), drop_last=len(train_set) >= args.batch_size)
    model_args = dict(width=args.width, feature_dim=args.feature_dim)
    model = OccFeatureEncoder(**model_args).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.steps, pct_start=0.1)

    step, epoch, recent = 0, 0, []
    with tqdm(total=args.steps, desc='train features') as progress:
        while step < args.steps:
            set_epoch(loader, epoch)
            for inputs, targets in loader:
                loss, _ = objective(model(inputs.to(device)), {g: t.to(device) for g, t in targets.items()})
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                recent = (recent + [loss.item()])[-20:]
                step += 1
                progress.update()
                progress.set_postfix(loss=f'{np.mean(recent):.4f}')
                if step == args.steps:
                    break
            epoch += 1

    # validation: the objective and the order accuracy over every val clip (sliding windows), clip-weighted
    model.eval()
    val_loader = build_loader(val_set, args.batch_size, shuffle=False)
    totals = np.zeros(2)
    with torch.no_grad():
        for inputs, targets in tqdm(val_loader, desc='val features', leave=False):
            loss, accuracy = objective(model(inputs.to(device)), {g: t.to(device) for g, t in targets.items()})
            totals += len(inputs) * np.array([loss.item(), accuracy.item()])
    val_loss, val_order_accuracy = totals / len(val_set)
    training = dict(py_config=args.py_config, num_frames=cfg.dataset.common.num_frames, steps=args.steps,
                    batch_size=args.batch_size, lr=args.lr, seed=args.seed, train_clips=len(train_set),
                    final_train_loss=float(np.mean(recent)), val_loss=float(val_loss),
                    val_order_accuracy=float(val_order_accuracy))
    atomic_save({'model': {k: v.cpu() for k, v in model.state_dict().items()}, 'model_args': model_args,
                 'training': training}, args.out)
    return training


def main(argv=None):
    parser = argparse.ArgumentParser(description='Train the occupancy feature extractor of the generation metrics.')
    commands = parser.add_subparsers(dest='command', required=True)
    train_parser = add_config_args(commands.add_parser('train', help='train on the config\'s train split'),
                                   'config/demo_vqvae.py')
    train_parser.add_argument('--out', default='out/features.pt', help='checkpoint to write')
    train_parser.add_argument('--steps', type=int, default=300)
    train_parser.add_argument('--batch-size', type=int, default=8)
    train_parser.add_argument('--lr', type=float, default=2e-3)
    train_parser.add_argument('--width', type=int, default=32)
    train_parser.add_argument('--feature-dim', type=int, default=FEATURE_DIM)
    train_parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    training = train(load_config(args), args)
    logger.info('wrote %s (sha256 %s): train loss %.4f, val loss %.4f, val order accuracy %.3f', args.out,
                file_sha256(args.out), training['final_train_loss'], training['val_loss'],
                training['val_order_accuracy'])


if __name__ == '__main__':
    main()
