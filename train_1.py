"""Stage 1: train the 4D VQ-VAE occupancy tokenizer (upstream OccSora's `train_1.py`, wzzheng/OccSora@9f8d1f0).

One process (CPU or one GPU), or several under torchrun (gloo on CPU, nccl on GPU):
    python train_1.py --py-config config/train_vqvae.py --work-dir out/vqvae
    torchrun --nproc_per_node=8 train_1.py --py-config config/train_vqvae.py --work-dir out/vqvae
    python train_1.py --py-config config/demo_vqvae.py --work-dir out/demo/vqvae --cfg-options max_epochs=2

Writes to the work dir: config.py, log.txt, metrics.jsonl, epoch_{k}.pth and latest.pth (both atomic). A run
finds latest.pth in its work dir and resumes from it: model, optimiser moments, step, RNG and sampler position; the
learning-rate schedule is the config's, at the resumed step, and metrics.jsonl loses its records past that step.
A config that differs from the checkpoint's (say a new optimizer.lr) is refused with the list of differing keys,
except for CHANGEABLE_ON_RESUME; --allow-config-changes applies the new values instead, logs them, and the next
checkpoints record them.
"""
import os
import time

import torch
from timm.scheduler import CosineLRScheduler
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from dataset.loader import build_dataset, build_loader, set_epoch
from evaluation.codebook import CodebookUsage
from evaluation.metrics import OccupancyMetrics
from model.losses import balanced_class_weights, tokenizer_loss
from model.tokenizer import build_tokenizer
from utils.checkpoint import atomic_save, load_checkpoint
from utils.config import config_parser, load_config
from utils.distributed import (all_reduce_mean, broadcast_buffers, cleanup_distributed, gather_rng_states,
                               restore_rng_state, setup_distributed, unwrap)
from utils.numerics import raise_if_not_finite
from utils.resume import check_resume_config, load_optimizer_state
from utils.run_log import MetricsWriter, create_logger

# config keys a resumed run may change without --allow-config-changes: they do not change what is trained
CHANGEABLE_ON_RESUME = ('print_freq', 'eval_every_epochs', 'val_every_steps', 'checkpoint_every_steps', 'num_workers',
                        'compile')


def evaluate(model, loader, cfg, device, show_progress):
    """Per-frame and per-class IoU / mIoU and (discrete latents) codebook usage on ``loader``, reduced over all
    processes."""
    tokenizer = unwrap(model)
    broadcast_buffers(tokenizer)                   # every rank evaluates the network the checkpoint holds (rank 0's)
    tokenizer.eval()
    metrics = OccupancyMetrics(cfg.num_frames, mode=cfg.metric_mode, use_camera_mask=cfg.metric_camera_mask)
    usage = CodebookUsage(cfg.model.codebook_size, device) if tokenizer.discrete else None
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=cfg.bf16):
        for batch in tqdm(loader, desc='val', leave=False, disable=not show_progress):
            occupancy = batch['occupancy'].to(device).long()                     # (B, T, X, Y, Z)
            logits, _, indices = tokenizer(occupancy)                            # (B, T, X, Y, Z, C)
            mask = batch['mask_camera'].to(device) if cfg.metric_camera_mask else None
            metrics.update(logits.argmax(-1), occupancy, mask)
            if usage is not None:
                usage.update(indices)
    metrics.all_reduce()
    results = metrics.compute()
    if usage is not None:
        usage.all_reduce()
        results.update(usage.compute())
    tokenizer.train()
    return results


def random_crop(occupancy, mask, size):
    """The same random (size[0], size[1]) window of the X, Y axes of occupancy (B, T, X, Y, Z) and mask (or None)."""
    x0 = int(torch.randint(occupancy.shape[2] - size[0] + 1, ()))
    y0 = int(torch.randint(occupancy.shape[3] - size[1] + 1, ()))
    window = (slice(None), slice(None), slice(x0, x0 + size[0]), slice(y0, y0 + size[1]))
    # contiguous: convolutions on a strided view are several times slower with more than one CPU thread
    return occupancy[window].contiguous(), None if mask is None else mask[window].contiguous()


def checkpoint_state(model, optimizer, cfg, epoch, batch_in_epoch, step, train_seconds, rng):
    """The resumable state; ``rng`` is the list of every process's CPU RNG state, by rank; ``train_seconds`` the
    wall-clock time spent in training steps so far (validation and checkpointing excluded)."""
    return {'model': unwrap(model).state_dict(), 'optimizer': optimizer.state_dict(), 'epoch': epoch,
            'batch_in_epoch': batch_in_epoch, 'step': step, 'train_seconds': train_seconds, 'rng': rng,
            'model_config': cfg.model.to_dict(),
            'config': cfg.to_dict()}         # plain data: loading a checkpoint never executes text from it


def build_data(cfg, device, logger):
    """Train and val loaders of the config's dataset, and the CE class weights (None unless class_weight_power)."""
    val_kwargs = {'load_camera_mask': True} if cfg.metric_camera_mask else {}
    train_set = build_dataset(cfg, 'train', seed=cfg.seed, load_camera_mask=cfg.camera_mask_loss)
    val_set = build_dataset(cfg, 'val', seed=cfg.seed, **val_kwargs)
    train_loader = build_loader(train_set, cfg.batch_size, shuffle=True, seed=cfg.seed,
                                num_workers=cfg.num_workers, drop_last=True)
    val_loader = build_loader(val_set, cfg.batch_size, shuffle=False, num_workers=cfg.num_workers)
    logger.info(f'train: {len(train_set)} clips, val: {len(val_set)} clips of {cfg.num_frames} frames')
    class_weights = None
    if cfg.class_weight_power:                       # class-balance flag: CE weights from the train split's counts
        class_weights = balanced_class_weights(train_set.class_voxel_counts(), cfg.class_weight_power).to(device)
        logger.info('CE class weights: ' + ', '.join(f'{w:.2f}' for w in class_weights.tolist()))
    return train_loader, val_loader, class_weights


def build_model(cfg, device, world_size, logger):
    """The tokenizer with the same initial weights on every rank, compiled (flag) and wrapped for DDP."""
    torch.manual_seed(cfg.seed)
    model = build_tokenizer(cfg.model).to(device)
    logger.info(f'tokenizer parameters: {sum(p.numel() for p in model.parameters()):,}')
    if cfg.compile:
        # In place (the state dict keeps its keys), encoder and decoder only: they hold the compute, and the
        # quantizer's no-grad code search fails to trace in torch 2.14
        model.encoder.compile()
        model.decoder.compile()
    if world_size > 1:
        if cfg.sync_bn and device.type == 'cuda':    # SyncBatchNorm has no CPU kernel
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None,
                                        broadcast_buffers=False)
    return model


def main(cfg, args):
    # Setup distributed, seeds and the run directory
    rank, world_size, device = setup_distributed()
    torch.manual_seed(cfg.seed * world_size + rank)
    torch.backends.cudnn.benchmark = True
    os.makedirs(args.work_dir, exist_ok=True)
    logger = create_logger(os.path.join(args.work_dir, 'log.txt'), rank)
    metrics_log = MetricsWriter(os.path.join(args.work_dir, 'metrics.jsonl'), rank)
    if rank == 0:
        cfg.dump(os.path.join(args.work_dir, 'config.py'))
    logger.info(f'world size {world_size}, device {device}, work dir {args.work_dir}')

    # Data, model
    train_loader, val_loader, class_weights = build_data(cfg, device, logger)
    model = build_model(cfg, device, world_size, logger)

    # Optimiser, schedule; each rank's own random stream from here on (crops, dead-code restarts)
    torch.manual_seed(cfg.seed * world_size + rank)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optimizer.lr, weight_decay=cfg.optimizer.weight_decay,
                                  betas=tuple(cfg.optimizer.betas))
    total_steps = len(train_loader) * cfg.max_epochs
    scheduler = CosineLRScheduler(optimizer, t_initial=total_steps, lr_min=cfg.scheduler.min_lr,
                                  warmup_t=cfg.scheduler.warmup_iters, warmup_lr_init=cfg.scheduler.warmup_lr,
                                  t_in_epochs=False)

    # Resume from the newest checkpoint of this run, with this config's hyperparameters and schedule
    epoch, batch_in_epoch, step, train_seconds = 0, 0, 0, 0.0
    latest = args.resume_from or os.path.join(args.work_dir, 'latest.pth')
    if os.path.exists(latest):
        checkpoint = load_checkpoint(latest, ('model', 'optimizer', 'epoch', 'batch_in_epoch', 'step'))
        for change in check_resume_config(latest, checkpoint.get('config'), cfg.to_dict(), CHANGEABLE_ON_RESUME,
                                          args.allow_config_changes):
            logger.info(f'config change applied on resume: {change}')
        unwrap(model).load_state_dict(checkpoint['model'])
        load_optimizer_state(optimizer, checkpoint['optimizer'])
        epoch, batch_in_epoch, step = checkpoint['epoch'], checkpoint['batch_in_epoch'], checkpoint['step']
        train_seconds = checkpoint.get('train_seconds', 0.0)
        if batch_in_epoch >= len(train_loader):
            epoch, batch_in_epoch = epoch + 1, 0
        restore_rng_state(checkpoint['rng'], rank)
        logger.info(f'resumed from {latest}: step {step}, epoch {epoch}, batch {batch_in_epoch}')
    scheduler.step_update(step)
    metrics_log.drop_after(step)                   # records of steps the checkpoint does not hold are redone

    def save(name, epoch, batch_in_epoch):
        rng = gather_rng_states(world_size)
        if rank == 0:
            state = checkpoint_state(model, optimizer, cfg, epoch, batch_in_epoch, step, train_seconds, rng)
            atomic_save(state, os.path.join(args.work_dir, name))
            if name != 'latest.pth':
                atomic_save(state, os.path.join(args.work_dir, 'latest.pth'))

    def validate(epoch):
        results = evaluate(model, val_loader, cfg, device, show_progress=rank == 0)
        codes = (f', codebook used {results["used_codes"]}/{cfg.model.codebook_size}, perplexity '
                 f'{results["perplexity"]:.1f}' if 'used_codes' in results else '')
        weakest = sorted((v, k) for k, v in results['class_iou'].items() if v is not None)[:3]
        logger.info(f'[val] epoch {epoch + 1} step {step} ({train_seconds / 60:.1f} train min): IoU '
                    f'{results["iou"]:.2f}, mIoU {results["miou"]:.2f}{codes}; weakest: '
                    + ', '.join(f'{k} {v:.1f}' for v, k in weakest))
        metrics_log.write(split='val', epoch=epoch + 1, step=step, train_minutes=train_seconds / 60, **results)

    # Train loop
    model.train()
    stop = bool(args.max_steps) and step >= args.max_steps
    while epoch < cfg.max_epochs and not stop:
        set_epoch(train_loader, epoch)
        train_loader.sampler.set_start_index(batch_in_epoch * cfg.batch_size)
        running, running_steps, tic = {}, 0, time.time()
        step_tic = time.time()
        bar = tqdm(train_loader, desc=f'epoch {epoch + 1}/{cfg.max_epochs}', initial=batch_in_epoch,
                   total=len(train_loader), disable=rank != 0, leave=False)
        for batch in bar:
            occupancy = batch['occupancy'].to(device, non_blocking=True).long()   # (B, T, X, Y, Z)
            mask = batch['mask_camera'].to(device, non_blocking=True) if cfg.camera_mask_loss else None
            if cfg.train_crop:
                occupancy, mask = random_crop(occupancy, mask, cfg.train_crop)
            with torch.autocast(device.type, torch.bfloat16, enabled=cfg.bf16):
                logits, vq_loss, _ = model(occupancy)
            loss, parts = tokenizer_loss(logits, occupancy, vq_loss, mask=mask, class_weights=class_weights,
                                         **cfg.loss)
            del logits              # the backward pass needs only the loss's own gradient buffer, not the logits
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_max_norm)
            raise_if_not_finite(step + 1, grad_norm, loss=loss.detach(), **parts)
            optimizer.step()
            step += 1
            batch_in_epoch += 1
            scheduler.step_update(step)
            train_seconds += time.time() - step_tic
            for name, value in {'loss': loss.item(), **{k: v.item() for k, v in parts.items()}}.items():
                running[name] = running.get(name, 0.0) + value
            running_steps += 1

            if step % cfg.print_freq == 0 or batch_in_epoch == len(train_loader):
                means = {k: all_reduce_mean(v / running_steps, device) for k, v in running.items()}
                lr = optimizer.param_groups[0]['lr']
                seconds = (time.time() - tic) / running_steps
                logger.info(f'[train] epoch {epoch + 1} iter {batch_in_epoch}/{len(train_loader)} step {step}: '
                            + ', '.join(f'{k} {v:.4f}' for k, v in means.items())
                            + f', grad_norm {grad_norm.item():.3f}, lr {lr:.3g}, {seconds:.2f} s/iter')
                metrics_log.write(split='train', epoch=epoch + 1, step=step, lr=lr, grad_norm=grad_norm.item(),
                                  seconds_per_iter=seconds, **means)
                running, running_steps, tic = {}, 0, time.time()
            if cfg.get('checkpoint_every_steps', 0) and step % cfg.checkpoint_every_steps == 0:
                save('latest.pth', epoch, batch_in_epoch)
            # the learning curve; an epoch's last step is validated below, after its checkpoint
            if cfg.val_every_steps and step % cfg.val_every_steps == 0 and batch_in_epoch < len(train_loader):
                validate(epoch)
            step_tic = time.time()
            if args.max_steps and step >= args.max_steps:
                stop = True
                break
        bar.close()
        if batch_in_epoch < len(train_loader):         # stopped inside the epoch: resume from this batch
            save('latest.pth', epoch, batch_in_epoch)
            break
        # an epoch that ends at --max-steps still gets its checkpoint and validation
        save(f'epoch_{epoch + 1}.pth', epoch, batch_in_epoch)
        if (epoch + 1) % cfg.eval_every_epochs == 0 or (cfg.val_every_steps and step % cfg.val_every_steps == 0):
            validate(epoch)
        epoch, batch_in_epoch = epoch + 1, 0
    logger.info(f'done at step {step}')
    cleanup_distributed()


if __name__ == '__main__':
    parser = config_parser('Train the 4D VQ-VAE occupancy tokenizer (stage 1).')
    parser.add_argument('--resume-from', default=None,
                        help='checkpoint to resume from (default: <work-dir>/latest.pth)')
    parser.add_argument('--max-steps', type=int, default=0, help='stop (and checkpoint) after this many steps')
    parser.add_argument('--allow-config-changes', action='store_true',
                        help='resume with config values that differ from the checkpoint\'s (they are applied, logged '
                        'and recorded); without it such a resume is refused')
    args = parser.parse_args()
    main(load_config(args), args)
