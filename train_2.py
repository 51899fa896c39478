"""Stage 2: train the trajectory-conditioned DiT on the tokens written by step02.py.

    torchrun --nnodes=1 --nproc_per_node=8 train_2.py --model DiT-XL/2 --data-path out/vqvae/tokens
    python train_2.py --py-config config/demo_dit.py --data-path out/demo/vqvae/tokens --results-dir out/demo/results

Writes results/NNN-<model>/ with config.py, log.txt, metrics.jsonl (loss terms and the trajectory sensitivity: how
much the clean-latent prediction moves between the 'left' and 'right' presets on fixed latents, noise and steps, so a
run shows when the condition switches on) and checkpoints/{step:07d}.pt + latest.pt, each
{model, ema, opt, step, rng, args, model_args, data_path}, written atomically. --ckpt resumes a run exactly
(same directory, same sampler position and random stream; metrics.jsonl loses its records past the resumed step).
A config or --data-path that differs from the checkpoint's is refused with the list of differing keys, except for
CHANGEABLE_ON_RESUME; --allow-config-changes applies the new values instead (the optimiser keeps its moments but
takes the new lr and weight decay), logs them, and the next checkpoints record them.

    python train_2.py ... --cfg-options bf16=True grad_accum_steps=4   # bf16 autocast; 4 micro-batches per step

global_batch_size = processes x per-process micro-batch x grad_accum_steps; the step counter counts optimiser
steps, checkpoints are written only after one, so a run resumes exactly at optimiser steps (with the same number
of processes and grad_accum_steps). bf16 autocasts the forward passes only; weights, optimiser state, EMA and
checkpoints stay fp32.

    python train_2.py ... --cfg-options known_prefix.enabled=True      # one DiT that also forecasts (sample.py)
"""
import argparse
import glob
import os
import time
from copy import deepcopy

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from dataset.loader import build_loader
from dataset.tokens import LatentCodec, TokenDataset, load_meta
from model.diffusion import GaussianDiffusion
from model.dit import build_dit, dit_config_args, draw_prefix_lengths, prefix_mask
from model.rollout import preset_window_conditions
from utils.accumulation import accumulate_gradients, accumulation_groups, micro_batch_size
from utils.checkpoint import atomic_save, load_checkpoint
from utils.config import add_config_args, load_config
from utils.distributed import (all_reduce_mean, cleanup_distributed, gather_rng_states, restore_rng_state,
                               setup_distributed, unwrap)
from utils.numerics import raise_if_not_finite
from utils.precision import autocast_forward, check_bf16_training
from utils.resume import check_resume_config, load_optimizer_state
from utils.run_log import MetricsWriter, create_logger

SENSITIVITY_STEPS = (250, 500, 750)   # diffusion steps of the trajectory-sensitivity diagnostic
SENSITIVITY_CLIPS = 2                 # training clips it is measured on

# upstream's flags, each the name of a config key it overrides when given
FLAG_KEYS = ('model', 'results_dir', 'global_batch_size', 'epochs', 'global_seed', 'num_workers', 'log_every',
             'ckpt_every', 'max_steps')
# config keys a resumed run may change without --allow-config-changes: they do not change what is trained
# (compile and bf16 change the rounding only; checkpoints are fp32 either way)
CHANGEABLE_ON_RESUME = ('results_dir', 'epochs', 'max_steps', 'num_workers', 'log_every', 'ckpt_every', 'compile',
                        'bf16')


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter."""
    for ema_param, param in zip(ema.parameters(), model.parameters()):
        ema_param.mul_(decay).add_(param.detach(), alpha=1 - decay)


@torch.no_grad()
def trajectory_sensitivity(model, diffusion, probe, conditions, steps=SENSITIVITY_STEPS):
    """How much the model's clean-latent prediction depends on the trajectory: RMS of x0(left) - x0(right) over
    RMS of x0(right), on fixed latents and noise, averaged over the diffusion steps ``steps``. 0 = the condition is
    ignored; it grows when the trajectory starts to steer the output.

    probe: dict(x0 (B, C, T', H', W'), noise (B, C, ...)); conditions: dict name -> (1, T, 2) scaled -> float
    """
    was_training = model.training
    model.eval()
    x0, noise = probe['x0'], probe['noise']
    ratios = []
    for step in steps:
        t = torch.full((x0.shape[0],), step, dtype=torch.long, device=x0.device)
        x_t = diffusion.q_sample(x0, t, noise)
        predictions = {}
        for name in ('left', 'right'):
            traj = conditions[name].expand(x0.shape[0], -1, -1)
            output = model(x_t, t, traj=traj)
            predictions[name] = diffusion.predicted_x0(output[:, :x0.shape[1]], x_t, t)
        difference = (predictions['left'] - predictions['right']).pow(2).mean().sqrt()
        ratios.append((difference / predictions['right'].pow(2).mean().sqrt().clamp(min=1e-12)).item())
    model.train(was_training)
    return sum(ratios) / len(ratios)


def experiment_dir_for(cfg, resume_ckpt):
    """The run directory: the resumed run's own, or results/NNN-<model> numbered after the existing ones."""
    if resume_ckpt:
        return os.path.dirname(os.path.dirname(os.path.abspath(resume_ckpt)))
    os.makedirs(cfg.results_dir, exist_ok=True)
    index = len(glob.glob(os.path.join(cfg.results_dir, '*')))
    return os.path.join(cfg.results_dir, f'{index:03d}-{cfg.model.replace("/", "-")}')


def main(cfg, args):
    # Setup distributed
    rank, world_size, device = setup_distributed()
    batch_size = micro_batch_size(cfg.global_batch_size, world_size, cfg.grad_accum_steps)      # per process
    torch.manual_seed(cfg.global_seed * world_size + rank)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    # Data: tokens (indices or latents) + condition; the DiT's latents are built on the device
    meta = load_meta(args.data_path)
    codec = LatentCodec(args.data_path, cfg.latent_scaling, device)
    dataset = TokenDataset(args.data_path, 'train', cfg.condition)
    loader = build_loader(dataset, batch_size, shuffle=True, seed=cfg.global_seed, num_workers=cfg.num_workers,
                          drop_last=True)
    steps_per_epoch = len(loader) // cfg.grad_accum_steps                                   # optimiser steps
    if steps_per_epoch == 0:
        raise ValueError(f'{len(dataset)} training clips are fewer than one global batch of {cfg.global_batch_size}')

    # Model, EMA, diffusion, optimiser
    if (cfg.trajectory_map or cfg.static_warp) and cfg.condition != 'traj_xy':
        raise ValueError(f'trajectory_map and static_warp need condition=\'traj_xy\' (both are built from the ego '
                         f'path), got {cfg.condition!r}')
    model_args = {**dit_config_args(cfg, traj_scale=meta['conditions']['scale']['traj_xy']),
                  'latent_shape': meta['latent_shape'], 'cond_shape': meta['conditions']['shape']}
    latent_frames = meta['latent_shape'][1]
    if cfg.known_prefix.enabled and latent_frames < 2:
        raise ValueError(f'known_prefix.enabled=True needs at least 2 latent time steps, but the tokens in '
                         f'{args.data_path} have T\' = {latent_frames} ({meta["num_frames"]} frames per clip): use '
                         'longer clips or turn known_prefix off')
    if cfg.bf16:
        check_bf16_training(device, latent_frames, args.data_path)
    torch.manual_seed(cfg.global_seed)                                   # identical initial weights on every rank
    model = build_dit(**model_args).to(device)
    ema = deepcopy(model).requires_grad_(False).eval()
    torch.manual_seed(cfg.global_seed * world_size + rank)
    diffusion = GaussianDiffusion(**cfg.diffusion)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    # Resume or start a run directory
    experiment_dir = experiment_dir_for(cfg, args.ckpt)
    step, config_changes = 0, []
    if args.ckpt:
        checkpoint = load_checkpoint(args.ckpt, ('model', 'ema', 'opt', 'step', 'rng', 'model_args', 'args',
                                                 'data_path'))
        config_changes = check_resume_config(
            args.ckpt, {**checkpoint['args'], 'data_path': checkpoint['data_path']},
            {**cfg.to_dict(), 'data_path': os.path.abspath(args.data_path)}, CHANGEABLE_ON_RESUME,
            args.allow_config_changes)
        saved_args = {'known_prefix': False, **checkpoint['model_args']}         # runs from before the flag
        if saved_args != model_args:
            raise ValueError(f'{args.ckpt} holds a DiT built with {saved_args}, but this config builds {model_args}: '
                             'resume with the run\'s own config (e.g. the same known_prefix.enabled)')
        model.load_state_dict(checkpoint['model'])
        ema.load_state_dict(checkpoint['ema'])
        load_optimizer_state(optimizer, checkpoint['opt'])
        step = checkpoint['step']
        restore_rng_state(checkpoint['rng'], rank)
    logger = create_logger(os.path.join(experiment_dir, 'log.txt'), rank, name='train_2')
    metrics_log = MetricsWriter(os.path.join(experiment_dir, 'metrics.jsonl'), rank)
    if rank == 0:
        os.makedirs(os.path.join(experiment_dir, 'checkpoints'), exist_ok=True)
        cfg.dump(os.path.join(experiment_dir, 'config.py'))
    metrics_log.drop_after(step)                   # records of steps the checkpoint does not hold are redone
    logger.info(f'experiment dir {experiment_dir}' + (f', resumed at step {step}' if step else ''))
    for change in config_changes:
        logger.info(f'config change applied on resume: {change}')
    logger.info(f'{cfg.model}: {sum(p.numel() for p in model.parameters()):,} parameters, latent '
                f'{meta["latent_shape"]}, condition {cfg.condition} {meta["conditions"]["shape"]}, '
                f'{len(dataset)} clips, {world_size} process(es) x batch {batch_size}'
                + (f' x {cfg.grad_accum_steps} accumulation steps' if cfg.grad_accum_steps > 1 else '')
                + (', bf16 autocast' if cfg.bf16 else ''))
    if cfg.compile:
        model.compile()                      # in place: the state dict keeps its keys, EMA and checkpoints unchanged
    if world_size > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)
    forward = autocast_forward(model, device, cfg.bf16)

    def save():
        rng = gather_rng_states(world_size)
        if rank == 0:
            checkpoint = {'model': unwrap(model).state_dict(), 'ema': ema.state_dict(),
                          'opt': optimizer.state_dict(), 'step': step, 'rng': rng, 'model_args': model_args,
                          'args': cfg.to_dict(), 'data_path': os.path.abspath(args.data_path)}
            atomic_save(checkpoint, os.path.join(experiment_dir, 'checkpoints', f'{step:07d}.pt'))
            atomic_save(checkpoint, os.path.join(experiment_dir, 'checkpoints', 'latest.pt'))

    # Train loop
    def finished():
        return bool(cfg.max_steps) and step >= cfg.max_steps

    # the trajectory-sensitivity probe: fixed training latents and noise (own generator: the run's RNG stream and
    # so its exact resume are untouched), the 'left' and 'right' presets in the DiT's condition units
    probe_generator = torch.Generator().manual_seed(cfg.global_seed)
    probe_x0 = codec.to_model(torch.stack([dataset[i][0] for i in range(min(SENSITIVITY_CLIPS, len(dataset)))])
                              .to(device))
    probe = {'x0': probe_x0, 'noise': torch.randn(probe_x0.shape, generator=probe_generator).to(device)}
    probe_conditions = {name: torch.from_numpy(preset_window_conditions(
        name, meta['num_frames'], [0], cfg.condition)[1] / dataset.scale).float().to(device)
        for name in ('left', 'right')}                                                 # (1, T, 2) each

    def losses_of(tokens, traj):
        """The diffusion loss terms of one micro-batch, (B,) each."""
        x = codec.to_model(tokens.to(device))                                        # (B, C, T', H', W')
        t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=device)
        model_kwargs, known_mask = {'traj': traj.to(device)}, None
        if cfg.known_prefix.enabled:
            prefix = draw_prefix_lengths(x.shape[0], latent_frames, cfg.known_prefix.prob, device)
            known_steps = prefix_mask(prefix, latent_frames)                                    # (B, T')
            model_kwargs.update(known=x, known_mask=known_steps)
            known_mask = known_steps[:, None, :, None, None]                                    # (B, 1, T', 1, 1)
        return diffusion.training_losses(forward, x, t, model_kwargs=model_kwargs, known_mask=known_mask)

    model.train()
    start_epoch, skip_steps = divmod(step, steps_per_epoch)
    running_loss, running_steps, tic = 0.0, 0, time.time()
    bar = tqdm(total=cfg.max_steps or steps_per_epoch * cfg.epochs, initial=step, desc='train_2', disable=rank != 0)
    for epoch in range(start_epoch, cfg.epochs):
        if finished():                                                     # also: resumed at --max-steps
            break
        loader.sampler.set_epoch(epoch)
        if epoch == start_epoch:                                           # resume inside an epoch
            loader.sampler.set_start_index(skip_steps * cfg.grad_accum_steps * batch_size)
        for micro_batches in accumulation_groups(loader, cfg.grad_accum_steps):              # k (tokens, traj)
            optimizer.zero_grad(set_to_none=True)
            losses = accumulate_gradients(model, micro_batches, losses_of)        # over the k micro-batches
            loss = losses['loss'].mean()
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
            raise_if_not_finite(step + 1, grad_norm, loss=loss.detach(), mse=losses['mse'].mean().detach(),
                                vb=losses['vb'].mean().detach())
            optimizer.step()
            update_ema(ema, unwrap(model), cfg.ema_decay)
            step += 1
            bar.update()
            running_loss += loss.item()
            running_steps += 1

            if step % cfg.log_every == 0:
                mean_loss = all_reduce_mean(running_loss / running_steps, device)
                steps_per_sec = running_steps / (time.time() - tic)
                sensitivity = trajectory_sensitivity(unwrap(model), diffusion, probe, probe_conditions)
                logger.info(f'(step={step:07d}) Train Loss: {mean_loss:.4f}, Train Steps/Sec: {steps_per_sec:.2f}, '
                            f'Trajectory Sensitivity: {sensitivity:.4f}')
                metrics_log.write(step=step, loss=mean_loss, steps_per_sec=steps_per_sec,
                                  mse=losses['mse'].mean().item(), vb=losses['vb'].mean().item(),
                                  traj_sensitivity=sensitivity)
                running_loss, running_steps, tic = 0.0, 0, time.time()
            if step % cfg.ckpt_every == 0 or finished():
                save()
            if finished():
                break
    if step % cfg.ckpt_every and not finished():                           # the steps since the last checkpoint
        save()
    bar.close()
    logger.info(f'done at step {step}')
    cleanup_distributed()


if __name__ == '__main__':
    parser = add_config_args(argparse.ArgumentParser(description='Train the trajectory-conditioned DiT (stage 2).'),
                             default_config='config/train_dit.py')
    parser.add_argument('--data-path', required=True, help='token dir written by step02.py (<work-dir>/tokens)')
    parser.add_argument('--model', help='DiT preset, e.g. DiT-XL/2 (upstream) or DiT-S/B/L/XL (true widths)')
    parser.add_argument('--results-dir')
    parser.add_argument('--global-batch-size', type=int)
    parser.add_argument('--epochs', type=int)
    parser.add_argument('--global-seed', type=int)
    parser.add_argument('--num-workers', type=int)
    parser.add_argument('--log-every', type=int)
    parser.add_argument('--ckpt-every', type=int)
    parser.add_argument('--max-steps', type=int)
    parser.add_argument('--ckpt', help='a checkpoint of this script to resume from; the run goes on in the '
                        'checkpoint\'s own run directory, whatever --results-dir says (copy the run directory first '
                        'to branch off a separate run)')
    parser.add_argument('--allow-config-changes', action='store_true',
                        help='resume with config values or a --data-path that differ from the checkpoint\'s (they '
                        'are applied, logged and recorded); without it such a resume is refused')
    args = parser.parse_args()
    cfg = load_config(args)
    cfg.merge_from_dict({key: getattr(args, key) for key in FLAG_KEYS if getattr(args, key) is not None})
    main(cfg, args)
