"""Stage 1 -> 2: encode every clip of the train and val splits into codebook indices (or continuous latents).

    python step02.py --py-config config/train_vqvae.py --work-dir out/vqvae
    python step02.py ... --precision bf16       # the encoder in bf16 autocast (code distances stay fp32)

Reads the tokenizer checkpoint <work-dir>/latest.pth (or --ckpt) and writes, deterministically (sliding windows):
    <work-dir>/tokens/{train,val}/<scene>_<start>.npz   indices (T', H', W') int16 (a tokenizer with continuous
                                                        latents: latents (C, T', H', W') float16, the posterior
                                                        mean after post_quant_conv), traj_xy / command / delta_xy
                                                        (T, 2) float32, scene_name, start
    <work-dir>/tokens/meta.json                         latent type and shape, codebook size, per-channel latent
                                                        mean/std, tokenizer checkpoint (path, sha256, step), clip
                                                        length, conditions, encoding precision
    <work-dir>/tokens/codebook_vectors.npy              (codebook_size, C) post-quant latent of every code, so
                                                        stage 2 rebuilds continuous latents without the tokenizer
                                                        (discrete latents only)
Upstream wrote float latents of 750 random *val* windows to /step32-2/ (upstream's `step02.py`); this dumps both
splits.
"""
import glob
import json
import os
import shutil
import time

import numpy as np
import torch
from tqdm import tqdm

from dataset.clips import CONDITIONS
from dataset.loader import build_dataset, build_loader
from evaluation.codebook import CodebookUsage
from model.pipeline import load_tokenizer
from utils.checkpoint import atomic_write, file_sha256
from utils.config import config_parser, load_config
from utils.distributed import cleanup_distributed, is_distributed, setup_distributed
from utils.precision import PRECISIONS, bf16_autocast


def prepare_token_dir(token_dir, tokenizer_sha256, overwrite):
    """Refuse to mix clips of two tokenizers in one token dir; --overwrite empties it instead. The clips and
    meta.json of an earlier run of the same checkpoint are removed too: another stride or clip length would
    leave stale clips behind, and a run that stops halfway must not leave a meta.json that vouches for them."""
    meta_path = os.path.join(token_dir, 'meta.json')
    if not os.path.exists(token_dir):
        return
    if overwrite:
        shutil.rmtree(token_dir)
        return
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            previous = json.load(f)['tokenizer']['sha256']
        if previous != tokenizer_sha256:
            raise FileExistsError(f'{meta_path} was made by another tokenizer checkpoint (sha256 {previous[:12]}...); '
                                  'pass --overwrite to replace its tokens')
        os.remove(meta_path)
    for path in glob.glob(os.path.join(token_dir, '*', '*.npz')):
        os.remove(path)


def main(cfg, args):
    rank, world_size, device = setup_distributed()
    checkpoint_path = args.ckpt or os.path.join(args.work_dir, 'latest.pth')
    token_dir = os.path.join(args.work_dir, 'tokens')
    tokenizer_sha256 = file_sha256(checkpoint_path)
    if rank == 0:
        prepare_token_dir(token_dir, tokenizer_sha256, args.overwrite)
    if is_distributed():
        torch.distributed.barrier()
    tokenizer, checkpoint = load_tokenizer(checkpoint_path, device)
    codebook_size = checkpoint['model_config']['codebook_size'] if tokenizer.discrete else None

    counts, latent_shape = {}, None
    usage = CodebookUsage(codebook_size, device) if tokenizer.discrete else None   # train-split code histogram
    moments = torch.zeros(2, tokenizer.latent_channels, dtype=torch.float64, device=device)  # continuous: sum, sum sq
    squares = {name: torch.zeros((), dtype=torch.float64, device=device) for name in CONDITIONS}
    for split in ('train', 'val'):
        dataset = build_dataset(cfg, split, mode='sliding', stride=args.stride, conditions=CONDITIONS)
        loader = build_loader(dataset, args.batch_size, shuffle=False, num_workers=cfg.num_workers)
        os.makedirs(os.path.join(token_dir, split), exist_ok=True)
        tic = time.time()
        for batch in tqdm(loader, desc=f'step02 {split}', disable=rank != 0):
            with torch.no_grad(), bf16_autocast(device, args.precision == 'bf16'):
                z_q, indices, _ = tokenizer.encode(batch['occupancy'].to(device).long())   # indices (B, T', H', W')
            z_q = z_q.float()                                                             # (B, C, T', H', W')
            latent_shape = list(z_q.shape[1:])
            if split == 'train' and usage is not None:
                usage.update(indices)
            elif split == 'train':
                moments += torch.stack([z_q.double().sum((0, 2, 3, 4)), z_q.double().pow(2).sum((0, 2, 3, 4))])
                for name in CONDITIONS:
                    squares[name] += batch[name].double().pow(2).sum().to(device)
            for i, (scene_name, start) in enumerate(zip(batch['scene_name'], batch['start'].tolist())):
                name = f'{scene_name}_{start:04d}.npz'                # every clip comes once, on one process
                arrays = {key: batch[key][i].numpy() for key in CONDITIONS}
                if usage is not None:
                    arrays['indices'] = indices[i].cpu().numpy().astype(np.int16)
                else:
                    arrays['latents'] = z_q[i].cpu().numpy().astype(np.float16)
                atomic_write(os.path.join(token_dir, split, name), lambda f: np.savez(
                    f, scene_name=scene_name, start=start, **arrays))
        counts[split] = len(dataset)
        seconds = time.time() - tic
        if rank == 0:
            print(f'{split}: {len(dataset)} clips in {seconds:.1f} s ({len(dataset) / seconds:.2f} clips/s)')
    if usage is not None:
        usage.all_reduce()
    if is_distributed():
        for value in (*squares.values(), moments):
            torch.distributed.all_reduce(value)

    if rank == 0:
        if usage is not None:
            # Every latent is a row of this table, so the per-channel statistics follow from the code histogram.
            with torch.no_grad():
                vectors = tokenizer.quantizer.codebook_vectors().double().cpu()        # (K, C)
            weights = usage.counts.double().cpu() / usage.counts.sum().cpu()          # (K,)
            mean = weights @ vectors                                                  # (C,)
            std = (weights @ (vectors - mean) ** 2).sqrt()
            atomic_write(os.path.join(token_dir, 'codebook_vectors.npy'),
                         lambda f: np.save(f, vectors.float().numpy()))
        else:
            cells = counts['train'] * int(np.prod(latent_shape[1:]))                  # latent cells per channel
            mean = moments[0].cpu() / cells                                           # (C,)
            std = (moments[1].cpu() / cells - mean ** 2).clamp(min=0).sqrt()
        meta = {
            'latent_type': 'discrete' if usage is not None else 'continuous',
            'latent_shape': latent_shape, 'codebook_size': codebook_size,
            'latent_mean': mean.tolist(), 'latent_std': std.tolist(),
            'tokenizer': {'checkpoint': os.path.relpath(os.path.abspath(checkpoint_path), os.path.abspath(token_dir)),
                          'sha256': tokenizer_sha256, 'step': checkpoint['step'],
                          'model_config': checkpoint['model_config']},
            'num_frames': cfg.num_frames, 'stride': args.stride, 'clips': counts, 'precision': args.precision,
            'conditions': {'names': list(CONDITIONS), 'shape': [cfg.num_frames, 2],
                           # the DiT sees condition / scale: RMS over the train clips, 1 for the command bits
                           'scale': {name: 1.0 if name == 'command' else
                                     max(float((squares[name] / (counts['train'] * cfg.num_frames * 2)).sqrt()), 1e-6)
                                     for name in CONDITIONS},
                           'units': {'traj_xy': 'metres, first-frame ego coordinates (x forward, y left)',
                                     'command': '[right, left] bits of pose_mode',
                                     'delta_xy': 'metres, next-keyframe displacement in LiDAR coordinates'}},
        }
        if usage is not None:
            meta['codebook_usage'] = usage.compute()
        atomic_write(os.path.join(token_dir, 'meta.json'), lambda f: f.write(json.dumps(meta, indent=1).encode()))
        print(f'wrote {token_dir}: {counts}, latent {latent_shape}, codebook usage {meta.get("codebook_usage")}')
    cleanup_distributed()


if __name__ == '__main__':
    parser = config_parser('Encode train and val clips into token files for stage 2.')
    parser.add_argument('--ckpt', default=None, help='tokenizer checkpoint (default: <work-dir>/latest.pth)')
    parser.add_argument('--stride', type=int, default=1, help='frames between the starts of consecutive clips')
    parser.add_argument('--batch-size', type=int, default=1)
    parser.add_argument('--overwrite', action='store_true', help='replace tokens made by another checkpoint')
    parser.add_argument('--precision', choices=PRECISIONS, default='fp32',
                        help='bf16: the tokenizer\'s encoder in bf16 autocast (faster where bf16 matmuls are)')
    args = parser.parse_args()
    main(load_config(args), args)
