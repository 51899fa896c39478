"""Render occupancy clips with mayavi, offscreen: one PNG per frame and a GIF per clip.

    python visualize_demo.py --py-config config/train_vqvae.py --work-dir out/vqvae
        ground truth | reconstruction of validation clips, through the tokenizer <work-dir>/latest.pth
    python visualize_demo.py --input out/demo/samples/straight.npz out/demo/samples/left.npz --out-dir out/demo/vis
        one panel per .npz file (any file with an `occupancy` array (N, T, 200, 200, 16)), clip by clip

Writes <out-dir>/clip<i>/frame_<t>.png (panels side by side), the single panels under clip<i>/panels/, and
<out-dir>/clip<i>.gif.
"""
import os

import numpy as np
import torch
from tqdm import tqdm

from dataset.constants import GRID_SHAPE, KEYFRAME_HZ
from dataset.loader import build_dataset
from evaluation.render import OccupancyRenderer, compose_panels, write_gif
from model.pipeline import load_tokenizer
from utils.config import config_parser, load_config
from utils.distributed import default_device


def dataset_panels(cfg, args):
    """{'ground truth': (N, T, X, Y, Z), 'reconstruction': (N, T, X, Y, Z)} for the first val clips."""
    device = default_device()
    tokenizer, _ = load_tokenizer(args.ckpt or os.path.join(args.work_dir, 'latest.pth'), device)
    dataset = build_dataset(cfg, 'val', mode='sliding', stride=args.stride)
    truth, reconstruction = [], []
    for index in range(min(args.num_clips, len(dataset))):
        occupancy = dataset[index]['occupancy']                                             # (T, X, Y, Z)
        with torch.no_grad():
            logits, _, _ = tokenizer(occupancy[None].to(device).long())                     # (1, T, X, Y, Z, C)
        truth.append(occupancy.numpy())
        reconstruction.append(logits.argmax(-1)[0].to(torch.uint8).cpu().numpy())
    return {'ground truth': np.stack(truth), 'reconstruction': np.stack(reconstruction)}


def file_panels(paths, num_clips):
    """{file stem: occupancy (N, T, X, Y, Z)} of the given .npz files."""
    panels = {}
    for path in paths:
        with np.load(path) as data:
            if 'occupancy' not in data.files:
                raise KeyError(f"{path}: no 'occupancy' array (found {data.files})")
            occupancy = data['occupancy'][:num_clips]
        if occupancy.ndim != 5 or occupancy.shape[2:] != GRID_SHAPE:
            raise ValueError(f'{path}: occupancy has shape {occupancy.shape}, expected (N, T, X, Y, Z) with '
                             f'(X, Y, Z) = {GRID_SHAPE}')
        panels[os.path.splitext(os.path.basename(path))[0]] = occupancy
    return panels


def main(args):
    if args.input:
        panels = file_panels(args.input, args.num_clips)
    else:
        panels = dataset_panels(load_config(args), args)
    out_dir = args.out_dir or os.path.join(args.work_dir, 'vis')
    num_clips = min(len(clips) for clips in panels.values())
    num_frames = min(clips.shape[1] for clips in panels.values())
    renderer = OccupancyRenderer(size=tuple(args.size))
    for clip in range(num_clips):
        clip_dir = os.path.join(out_dir, f'clip{clip}')
        os.makedirs(os.path.join(clip_dir, 'panels'), exist_ok=True)
        frames = []
        for t in tqdm(range(num_frames), desc=f'render clip {clip}'):
            paths = []
            for title, clips in panels.items():
                path = os.path.join(clip_dir, 'panels', f'{title.replace(" ", "_")}_{t:02d}.png')
                renderer.render(clips[clip, t], path)
                paths.append(path)
            frames.append(compose_panels(paths, [f'{title}  t={t / KEYFRAME_HZ:.1f} s' for title in panels],
                                         os.path.join(clip_dir, f'frame_{t:02d}.png')))
        write_gif(frames, os.path.join(out_dir, f'clip{clip}.gif'))
        print(f'wrote {clip_dir}/ and {out_dir}/clip{clip}.gif')
    renderer.close()


if __name__ == '__main__':
    parser = config_parser('Render occupancy clips (ground truth, reconstructions or samples) to PNG and GIF.')
    parser.add_argument('--input', nargs='+', help='.npz files with an occupancy array; one panel per file')
    parser.add_argument('--ckpt', help='tokenizer checkpoint (default: <work-dir>/latest.pth)')
    parser.add_argument('--num-clips', type=int, default=1)
    parser.add_argument('--stride', type=int, default=8, help='sliding-window stride over the val split')
    parser.add_argument('--size', type=int, nargs=2, default=(640, 480), help='panel width and height in pixels')
    parser.add_argument('--out-dir', help='default: <work-dir>/vis')
    main(parser.parse_args())
