"""Sample 4D occupancy for a given trajectory: DiT latents -> tokenizer decoder -> (N, T, 200, 200, 16) classes.

    python sample.py --model DiT-XL/2 --ckpt results/000-DiT-XL-2/checkpoints/1200000.pt
    python sample.py --ckpt out/demo/results/000-DiT-demo/checkpoints/latest.pt --traj left --sampler ddim \\
        --num-sampling-steps 50 --num-samples 2 --out out/demo/samples/left.npz

The DiT checkpoint names its token dir, whose meta.json names the tokenizer checkpoint: no paths to edit.
Writes one .npz: latents (N, C, T', H', W') float32 (tokenizer space), occupancy (N, T, 200, 200, 16) uint8,
traj (N, T, 2) float32 (the condition in its dataset units), plus the settings used.
"""
import argparse
import os

import numpy as np
import torch
from tqdm import tqdm

from dataset.tokens import UPSTREAM_LATENT_SCALE, LatentCodec, TokenDataset, load_meta
from dataset.trajectories import PRESETS, preset_condition
from model.dit import build_dit
from model.sampling import sample_latents
from model.tokenizer import load_tokenizer
from utils.checkpoint import atomic_write, load_checkpoint


def trajectories(args, num_frames, condition, token_dir, scale):
    """(N, T, 2) conditions in dataset units, or None for unconditional sampling."""
    if args.traj == 'none':
        return None
    if args.traj in PRESETS:
        one = preset_condition(args.traj, num_frames, condition)
        return torch.from_numpy(np.repeat(one[None], args.num_samples, axis=0))
    if args.traj == 'dataset':
        val = TokenDataset(token_dir, 'val', condition)
        # distinct val clips while there are enough, then round again
        order = torch.randperm(len(val), generator=torch.Generator().manual_seed(args.seed))
        picks = order.repeat(-(-args.num_samples // len(val)))[:args.num_samples]
        return torch.stack([val[int(i)][1] * scale for i in picks])
    if not os.path.isfile(args.traj):
        raise FileNotFoundError(f"--traj {args.traj!r} is neither one of {PRESETS + ('none', 'dataset')} "
                                'nor a .npy file')
    traj = np.load(args.traj).astype(np.float32)
    if traj.ndim == 2:
        traj = np.repeat(traj[None], args.num_samples, axis=0)
    if traj.shape != (args.num_samples, num_frames, 2):
        raise ValueError(f'{args.traj}: trajectory shape {traj.shape}, expected ({num_frames}, 2) or '
                         f'({args.num_samples}, {num_frames}, 2) in {condition} units')
    return torch.from_numpy(traj)


def main(args):
    torch.manual_seed(args.seed)
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')

    # The DiT (EMA weights by default), its token dir and the tokenizer named there
    checkpoint = load_checkpoint(args.ckpt, ('model', 'ema', 'model_args', 'args', 'data_path'))
    if args.model and args.model != checkpoint['model_args']['name']:
        raise ValueError(f'--model {args.model} but {args.ckpt} holds a {checkpoint["model_args"]["name"]}')
    if not checkpoint['model_args']['class_dropout_prob'] > 0:
        # only condition dropout trains the null trajectory that guidance and unconditional sampling need
        if args.traj == 'none':
            raise ValueError(f'--traj none needs a DiT trained with condition dropout, but {args.ckpt} was trained '
                             'with class_dropout_prob=0 (no null trajectory)')
        if args.cfg_scale != 1.0:
            raise ValueError(f'--cfg-scale {args.cfg_scale:g} needs a DiT trained with condition dropout, but '
                             f'{args.ckpt} was trained with class_dropout_prob=0 (no null trajectory to guide with): '
                             'use --cfg-scale 1')
    model = build_dit(**checkpoint['model_args'])
    model.load_state_dict(checkpoint['model' if args.no_ema else 'ema'])
    model.to(device).eval()
    token_dir = args.data_path or checkpoint['data_path']
    meta = load_meta(token_dir)
    train_args = checkpoint['args']
    codec = LatentCodec(token_dir, train_args['latent_scaling'], device)
    tokenizer_path = os.path.normpath(os.path.join(token_dir, meta['tokenizer']['checkpoint']))
    tokenizer, _ = load_tokenizer(tokenizer_path, device)

    # Conditions
    condition = train_args['condition']
    num_frames = meta['conditions']['shape'][0]
    scale = meta['conditions']['scale'][condition]
    traj = trajectories(args, num_frames, condition, token_dir, scale)                   # (N, T, 2) or None
    model_traj = None if traj is None else (traj / scale).to(device)
    if traj is None and args.cfg_scale != 1.0:
        raise ValueError('--traj none samples from the null condition alone: use --cfg-scale 1')

    def model_fn(x, t):
        if model_traj is not None and args.cfg_scale != 1.0:
            return model.forward_with_cfg(x, t, model_traj, args.cfg_scale)
        return model(x, t, model_traj)

    # Sample latents, decode clip by clip (the logits of one clip are 1.5 GB at the faithful size)
    generator = torch.Generator(device).manual_seed(args.seed)
    with torch.no_grad():
        x = sample_latents(model_fn, (args.num_samples, *meta['latent_shape']), args.sampler,
                           args.num_sampling_steps, generator=generator, device=device,
                           schedule=train_args['diffusion'])
        latents = codec.from_model(x)                                                      # (N, C, T', H', W')
        occupancy = []
        for z in tqdm(latents.split(1), desc='decode'):
            logits = tokenizer.decode_indices(codec.nearest_indices(z)) if args.snap else tokenizer.decode(z)
            occupancy.append(logits.argmax(-1).to(torch.uint8).cpu())                    # (1, T, X, Y, Z)
    occupancy = torch.cat(occupancy).numpy()

    out = args.out or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(args.ckpt))), 'samples',
                                   f'{args.traj if args.traj in PRESETS + ("none", "dataset") else "file"}-'
                                   f'{args.sampler}{args.num_sampling_steps}-cfg{args.cfg_scale:g}-seed{args.seed}.npz')
    traj_out = np.zeros((args.num_samples, num_frames, 2), np.float32) if traj is None else traj.numpy()
    atomic_write(out, lambda f: np.savez_compressed(
        f, latents=latents.cpu().numpy(), occupancy=occupancy, traj=traj_out, condition=condition,
        unconditional=traj is None, sampler=args.sampler, num_sampling_steps=args.num_sampling_steps,
        cfg_scale=args.cfg_scale, seed=args.seed, snap=args.snap, ckpt=os.path.abspath(args.ckpt)))
    print(f'wrote {out}: occupancy {occupancy.shape}')
    if args.save_upstream:
        path = os.path.join(os.path.dirname(out), 'samples_array.npy')
        atomic_write(path, lambda f: np.save(f, (latents * UPSTREAM_LATENT_SCALE).cpu().numpy()))
        print(f'wrote {path} (upstream layout: (N, C, T\', H\', W\') float32 in the x0.1 scale)')


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description='Sample 4D occupancy clips from a trained DiT.')
    parser.add_argument('--ckpt', required=True, help='train_2.py checkpoint')
    parser.add_argument('--model', help='checked against the checkpoint (upstream passed it explicitly)')
    parser.add_argument('--image-size', type=int, help='accepted for upstream command compatibility; unused')
    parser.add_argument('--data-path', help='token dir (default: the one recorded in the checkpoint)')
    parser.add_argument('--sampler', choices=('ddpm', 'ddim', 'dpm-solver'), default='ddpm')
    parser.add_argument('--num-sampling-steps', type=int, default=1000)
    parser.add_argument('--cfg-scale', type=float, default=4.0)
    parser.add_argument('--traj', default='straight',
                        help=f'{", ".join(PRESETS)}, none (unconditional), dataset (val clips) or a .npy file')
    parser.add_argument('--num-samples', type=int, default=1)
    parser.add_argument('--seed', type=int, default=561)
    parser.add_argument('--snap', action='store_true', help='snap latents to the nearest codebook vector')
    parser.add_argument('--no-ema', action='store_true', help='use the raw instead of the EMA weights')
    parser.add_argument('--save-upstream', action='store_true', help="also write upstream's samples_array.npy")
    parser.add_argument('--out', help='output .npz (default: <run>/samples/<traj>-<sampler><steps>-...npz)')
    main(parser.parse_args())
