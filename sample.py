"""Sample 4D occupancy for a given trajectory: DiT latents -> tokenizer decoder -> (N, T, 200, 200, 16) classes.

    python sample.py --model DiT-XL/2 --ckpt results/000-DiT-XL-2/checkpoints/1200000.pt
    python sample.py --ckpt out/demo/results/000-DiT-demo/checkpoints/latest.pt --traj left --sampler ddim \\
        --num-sampling-steps 50 --num-samples 2 --out out/demo/samples/left.npz
    python sample.py --ckpt DIT.pt --precision bf16      # the DiT's forward passes in bf16 autocast (fp32 weights)
    python sample.py --ckpt DIT.pt --traj left --static-warp hard   # a static_warp DiT's gate held open
    python sample.py --ckpt DIT.pt --traj left --voxel-warp   # static voxels moved along traj after decoding
    # a DiT trained with known_prefix.enabled=True also forecasts and rolls out (model/rollout.py):
    python -m evaluation.forecast --ckpt DIT.pt --write-clips val_clips.npz --num-clips 1
    python sample.py --ckpt DIT.pt --context val_clips.npz --context-frames 8 --traj context
    python sample.py --ckpt DIT.pt --traj left --num-frames 64 --context-frames 16

The DiT checkpoint names its token dir, whose meta.json names the tokenizer checkpoint: no paths to edit.
Writes one .npz: latents (N, C, T', H', W') float32 (tokenizer space), occupancy (N, T, 200, 200, 16) uint8,
traj (N, T, 2) float32 (the condition in its dataset units), plus the settings used. With a rollout, T is
--num-frames and T' the latent steps of all windows (window 0 whole, then the new steps of each later window);
with --context, the first K frames are the context as the tokenizer reconstructs it. With --voxel-warp,
occupancy is the decoded clip with its static voxels moved along traj (dataset/ego_warp.py follow_ego_motion) and
decoded_occupancy the clip as decoded.
"""
import argparse
import os

import numpy as np
import torch

from dataset.ego_warp import follow_ego_motion
from dataset.loader import build_dataset
from dataset.tokens import UPSTREAM_LATENT_SCALE, TokenDataset
from dataset.trajectories import PRESETS
from model.pipeline import load_pipeline
from model.rollout import (clip_window_conditions, context_steps, default_context_frames, load_context,
                           preset_window_conditions, rollout, window_starts)
from model.sampling import SCHEDULERS
from model.trajectory_map import headings
from utils.checkpoint import atomic_write
from utils.distributed import default_device
from utils.precision import PRECISIONS


def trajectories(args, pipeline, num_frames, starts, context):
    """Conditions in dataset units of the DiT's condition: the whole run (N, starts[-1] + T, 2) and every window's
    (W, N, T, 2), or (None, None) for unconditional sampling. ``context`` is load_context's Context or None."""
    condition = pipeline.train_args['condition']
    rollout_help = 'a rollout continues only a preset or the dataset\'s trajectories (--traj PRESET or dataset)'
    if args.traj == 'none':
        return None, None
    if args.traj in PRESETS:
        full, windows = preset_window_conditions(args.traj, num_frames=num_frames, starts=starts, condition=condition)
        return (np.repeat(full[None], args.num_samples, axis=0),
                np.repeat(windows[:, None], args.num_samples, axis=1))
    if args.traj == 'dataset' and len(starts) > 1:
        # val clips long enough for the whole rollout, from the dataset the tokenizer was trained on
        clips = build_dataset(pipeline.dataset_config(args.py_config), 'val', mode='sliding',
                              num_frames=starts[-1] + num_frames, stride=1, conditions=(condition,))
        order = torch.randperm(len(clips), generator=torch.Generator().manual_seed(args.seed))
        picks = order.repeat(-(-args.num_samples // len(clips)))[:args.num_samples]
        full, windows = zip(*(clip_window_conditions(clips, int(i), starts=starts, num_frames=num_frames,
                                                     condition=condition) for i in picks))
        return np.stack(full), np.stack(windows, axis=1)
    if len(starts) > 1:
        raise ValueError(f'--traj {args.traj} with --num-frames {args.num_frames}: {rollout_help}')
    if args.traj == 'dataset':
        val = TokenDataset(pipeline.token_dir, 'val', condition)
        # distinct val clips while there are enough, then round again
        order = torch.randperm(len(val), generator=torch.Generator().manual_seed(args.seed))
        picks = order.repeat(-(-args.num_samples // len(val)))[:args.num_samples]
        scale = pipeline.meta['conditions']['scale'][condition]
        traj = torch.stack([val[int(i)][1] * scale for i in picks]).numpy()
    elif args.traj == 'context':
        if context is None or context.traj is None:
            raise ValueError('--traj context needs a --context file with a \'traj\' array '
                             '(python -m evaluation.forecast --write-clips writes one)')
        if context.condition != condition or context.traj.shape[1] < num_frames:
            raise ValueError(f'--traj context: {args.context} holds a {context.condition!r} traj of '
                             f'{context.traj.shape[1]} frames, the DiT needs {condition!r} over {num_frames} frames')
        traj = np.ascontiguousarray(context.traj[:, :num_frames])
    elif not os.path.isfile(args.traj):
        raise FileNotFoundError(f"--traj {args.traj!r} is neither one of {PRESETS + ('none', 'dataset', 'context')} "
                                'nor a .npy file')
    else:
        traj = np.load(args.traj).astype(np.float32)
        if traj.ndim == 2:
            traj = np.repeat(traj[None], args.num_samples, axis=0)
        if traj.shape != (args.num_samples, num_frames, 2):
            raise ValueError(f'{args.traj}: trajectory shape {traj.shape}, expected ({num_frames}, 2) or '
                             f'({args.num_samples}, {num_frames}, 2) in {condition} units')
        if not np.isfinite(traj).all():
            raise ValueError(f'{args.traj}: the trajectory holds NaN or infinite values (sample, frame): '
                             f'{np.argwhere(~np.isfinite(traj).all(axis=-1))[:5].tolist()}')
    return traj, traj[None]


def main(args):
    if args.num_samples < 1 or args.num_sampling_steps < 1:
        raise ValueError(f'--num-samples and --num-sampling-steps must be at least 1, got {args.num_samples} and '
                         f'{args.num_sampling_steps}')
    if not args.cfg_scale >= 0.0:                  # also NaN
        raise ValueError(f'--cfg-scale must be >= 0 (1 = no guidance), got {args.cfg_scale}')
    torch.manual_seed(args.seed)
    device = default_device()

    # The DiT (EMA weights by default), its token dir and the tokenizer named there
    pipeline = load_pipeline(args.ckpt, data_path=args.data_path, no_ema=args.no_ema, device=device,
                             allow_tokenizer_mismatch=args.allow_tokenizer_mismatch)
    model_args, meta = pipeline.checkpoint['model_args'], pipeline.meta
    if args.model and args.model != model_args['name']:
        raise ValueError(f'--model {args.model} but {args.ckpt} holds a {model_args["name"]}')
    if args.static_warp:
        if not model_args.get('static_warp'):
            raise ValueError(f'--static-warp {args.static_warp} needs a DiT trained with static_warp (it composes the '
                             f'predicted steps with its diffusion schedule along traj_xy); {args.ckpt} was not')
        pipeline.dit.static_warp = args.static_warp
    if not model_args['class_dropout_prob'] > 0:
        # only condition dropout trains the null trajectory that guidance and unconditional sampling need
        if args.traj == 'none':
            raise ValueError(f'--traj none needs a DiT trained with condition dropout, but {args.ckpt} was trained '
                             'with class_dropout_prob=0 (no null trajectory)')
        if args.cfg_scale != 1.0:
            raise ValueError(f'--cfg-scale {args.cfg_scale:g} needs a DiT trained with condition dropout, but '
                             f'{args.ckpt} was trained with class_dropout_prob=0 (no null trajectory to guide with): '
                             'use --cfg-scale 1')

    # Windows: known context frames and a rollout past the clip length
    num_frames, latent_frames = meta['conditions']['shape'][0], meta['latent_shape'][1]
    total_frames = args.num_frames or num_frames
    if total_frames < num_frames:
        raise ValueError(f'--num-frames {total_frames} is shorter than the model\'s clip of {num_frames} frames')
    forecasting = args.context is not None or total_frames > num_frames
    if args.context_frames and not forecasting:
        raise ValueError('--context-frames needs --context or --num-frames beyond the clip length')
    if forecasting and not model_args.get('known_prefix'):
        raise ValueError(f'--context and --num-frames > {num_frames} need a DiT trained with '
                         f'known_prefix.enabled=True; {args.ckpt} was not')
    context_frames, starts, context = 0, [0], None
    if forecasting:
        context_frames = args.context_frames or default_context_frames(num_frames, latent_frames)
        context_steps(context_frames, num_frames, latent_frames)
        starts = window_starts(total_frames, num_frames, context_frames)
        if args.context:
            context = load_context(args.context, context_frames, args.num_samples)

    # Conditions
    condition = pipeline.train_args['condition']
    scale = meta['conditions']['scale'][condition]
    traj, traj_windows = trajectories(args, pipeline=pipeline, num_frames=num_frames, starts=starts, context=context)
    if traj is None and args.cfg_scale != 1.0:
        raise ValueError('--traj none samples from the null condition alone: use --cfg-scale 1')
    if args.voxel_warp and (traj is None or condition != 'traj_xy'):
        raise ValueError(f'--voxel-warp moves static voxels along the ego path, so it needs samples conditioned on '
                         f'traj_xy positions; got --traj {args.traj} with {args.ckpt} conditioned on {condition!r}')
    model_traj = [None] * len(starts) if traj is None else [torch.from_numpy(w / scale).float().to(device)
                                                             for w in traj_windows]

    # Sample latents window by window, decode clip by clip (the logits of one clip are 1.5 GB at the faithful size)
    latents, occupancy = rollout(
        model=pipeline.dit, tokenizer=pipeline.tokenizer, codec=pipeline.codec, traj_windows=model_traj,
        shape=(args.num_samples, *meta['latent_shape']), context_frames=context_frames,
        context=None if context is None else context.frames, sampler=args.sampler,
        num_steps=args.num_sampling_steps, cfg_scale=args.cfg_scale,
        generator=torch.Generator(device).manual_seed(args.seed), schedule=pipeline.train_args['diffusion'],
        snap=args.snap, bf16=args.precision == 'bf16')
    occupancy = occupancy[:, :total_frames].numpy()
    extra = {}
    if args.voxel_warp:
        path = torch.from_numpy(traj[:, :total_frames]).float()                          # (N, T, 2) metres
        poses = torch.cat([path, headings(path)[..., None]], dim=-1)                      # (N, T, 3)
        extra['decoded_occupancy'] = occupancy
        occupancy = np.stack([follow_ego_motion(torch.from_numpy(clip), clip_poses).numpy()
                              for clip, clip_poses in zip(occupancy, poses)])

    # Save: the samples, their conditions and the settings used
    name = args.traj if args.traj in PRESETS + ('none', 'dataset', 'context') else 'file'
    window_tag = (f'-ctx{context_frames}' if context is not None else '') + (
        f'-n{total_frames}' if total_frames > num_frames else '')
    out = args.out or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(args.ckpt))), 'samples',
                                   f'{name}{window_tag}-{args.sampler}{args.num_sampling_steps}-cfg{args.cfg_scale:g}'
                                   f'-seed{args.seed}.npz')
    traj_out = np.zeros((args.num_samples, total_frames, 2), np.float32) if traj is None else traj[:, :total_frames]
    atomic_write(out, lambda f: np.savez_compressed(
        f, latents=latents.numpy(), occupancy=occupancy, traj=traj_out.astype(np.float32), condition=condition,
        unconditional=traj is None, sampler=args.sampler, num_sampling_steps=args.num_sampling_steps,
        cfg_scale=args.cfg_scale, seed=args.seed, snap=args.snap, precision=args.precision,
        static_warp=str(pipeline.dit.static_warp or ''), voxel_warp=args.voxel_warp,
        ckpt=os.path.abspath(args.ckpt),
        context=os.path.abspath(args.context) if args.context else '', context_frames=context_frames,
        window_frames=num_frames, window_starts=np.array(starts), **extra))
    print(f'wrote {out}: occupancy {occupancy.shape}')
    if args.save_upstream:
        path = os.path.join(os.path.dirname(out), 'samples_array.npy')
        atomic_write(path, lambda f: np.save(f, (latents * UPSTREAM_LATENT_SCALE).numpy()))
        print(f'wrote {path} (upstream layout: (N, C, T\', H\', W\') float32 in the x0.1 scale)')


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description='Sample 4D occupancy clips from a trained DiT.')
    parser.add_argument('--ckpt', required=True, help='train_2.py checkpoint')
    parser.add_argument('--model', help='checked against the checkpoint (upstream passed it explicitly)')
    parser.add_argument('--image-size', type=int, help='accepted for upstream command compatibility; unused')
    parser.add_argument('--data-path', help='token dir (default: the one recorded in the checkpoint)')
    parser.add_argument('--py-config', help='dataset config of --traj dataset rollouts (default: the one stored in '
                        'the tokenizer checkpoint)')
    parser.add_argument('--sampler', choices=SCHEDULERS, default='ddpm')
    parser.add_argument('--num-sampling-steps', type=int, default=1000)
    parser.add_argument('--cfg-scale', type=float, default=4.0)
    parser.add_argument('--traj', default='straight',
                        help=f'{", ".join(PRESETS)}, none (unconditional), dataset (val clips), context (the --context '
                             'file\'s traj) or a .npy file. A rollout continues a preset straight on after its '
                             'manoeuvre, and takes a val scene long enough for the whole rollout for dataset')
    parser.add_argument('--context', help='.npz with occupancy (N or 1, T, 200, 200, 16) uint8 whose first '
                        '--context-frames frames are known (a clip of python -m evaluation.forecast --write-clips, or '
                        'a sample); needs a DiT trained with known_prefix.enabled')
    parser.add_argument('--context-frames', type=int,
                        help='known frames K at the start of each window: the --context frames for the first, the '
                             'overlap with the window before for the others; a multiple of the tokenizer\'s temporal '
                             'factor below the clip length (default: half the clip in whole latent steps)')
    parser.add_argument('--num-frames', type=int,
                        help='frames to generate (default: the clip length); more rolls out windows of the clip length '
                             'every clip length - K frames, each conditioned on the overlap with the one before and '
                             'on the trajectory continued')
    parser.add_argument('--num-samples', type=int, default=1)
    parser.add_argument('--seed', type=int, default=561)
    parser.add_argument('--snap', action='store_true',
                        help='snap latents to the nearest codebook vector (discrete latents only)')
    parser.add_argument('--no-ema', action='store_true', help='use the raw instead of the EMA weights')
    parser.add_argument('--precision', choices=PRECISIONS, default='fp32',
                        help='bf16: the DiT\'s forward passes in bf16 autocast (the checkpoint\'s fp32 weights, the '
                             'sampler and the tokenizer\'s decoding stay fp32)')
    parser.add_argument('--static-warp', choices=('hard',),
                        help='hard: compose every predicted latent step with the step before moved by the ego motion '
                        'wherever that is in view, the learned gate of a static_warp=\'gated\' DiT held open: static '
                        'things then follow the trajectory exactly, the network fills what comes into view (default: '
                        'as trained)')
    parser.add_argument('--voxel-warp', action='store_true',
                        help='after decoding, move every static voxel that an earlier frame saw into the later frames '
                        'by the ego motion of traj (dataset/ego_warp.py follow_ego_motion): the static world then '
                        'follows the trajectory exactly, the decoded clip keeps the columns that came into view and '
                        'the movable classes; also saves the clip as decoded (decoded_occupancy)')
    parser.add_argument('--allow-tokenizer-mismatch', action='store_true',
                        help='decode with a tokenizer checkpoint whose sha256 differs from the one in meta.json '
                             '(a warning instead of an error)')
    parser.add_argument('--save-upstream', action='store_true', help="also write upstream's samples_array.npy")
    parser.add_argument('--out', help='output .npz (default: <run>/samples/<traj>-<sampler><steps>-...npz)')
    main(parser.parse_args())
