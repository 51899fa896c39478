"""End-to-end tests of sample.py (every sampler and trajectory source, decoding, errors) and visualize_demo.py
(PNG frames + GIF from .npz files and from the dataset through the tokenizer), on the tiny runs of
tests/conftest.py.

The upstream sampler (ddpm) runs as a subprocess; the other samplers, the trajectory variants and the error cases
run the same command line in this process (runpy with sys.argv): the same CLI, without the ~7 s of imports of a
new interpreter each time."""
import glob
import os
import runpy
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dataset.constants import CLASS_COLORS, CLASS_ID, FREE_CLASS, GRID_SHAPE, NUM_CLASSES
from dataset.tokens import UPSTREAM_LATENT_SCALE, LatentCodec
from model.rollout import preset_window_conditions
from model.pipeline import load_tokenizer
from utils.checkpoint import atomic_save, load_checkpoint
from tests.pipeline import LATENT_SHAPE, NUM_FRAMES, REPO, run_script

NUM_SAMPLES = 2
PANEL_SIZE = (160, 120)           # width, height of one rendered panel
TITLE_HEIGHT = 24                 # evaluation.render.compose_panels' title strip


def latest(run_dir):
    return os.path.join(run_dir, 'checkpoints', 'latest.pt')


def sample_command(ckpt, out, sampler='ddim', *options, num_samples=NUM_SAMPLES):
    return ('sample.py', '--ckpt', ckpt, '--sampler', sampler, '--num-sampling-steps', 3, '--num-samples',
            num_samples, '--seed', 0, '--out', out, *options)


def run_in_process(monkeypatch, script, *args):
    """Run ``python script args`` in this process (same CLI, no new interpreter); the global RNG is restored."""
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, 'argv', [script, *map(str, args)])
    with torch.random.fork_rng():
        runpy.run_path(os.path.join(REPO, script), run_name='__main__')


def check_sample_file(path, num_samples=NUM_SAMPLES):
    """The arrays of a sample .npz, after checking their shapes and dtypes."""
    with np.load(path) as data:
        sample = {key: data[key] for key in data.files}
    assert sample['latents'].shape == (num_samples, *LATENT_SHAPE) and sample['latents'].dtype == np.float32
    assert np.isfinite(sample['latents']).all()
    assert sample['occupancy'].shape == (num_samples, NUM_FRAMES, *GRID_SHAPE)
    assert sample['occupancy'].dtype == np.uint8 and sample['occupancy'].max() < NUM_CLASSES
    assert sample['traj'].shape == (num_samples, NUM_FRAMES, 2) and sample['traj'].dtype == np.float32
    return sample


def decoded(tokenizer_run, token_dir, latents, snap):
    """What sample.py must have decoded from ``latents``: (N, T, X, Y, Z) uint8."""
    tokenizer, _ = load_tokenizer(os.path.join(tokenizer_run, 'latest.pth'), 'cpu')
    z = torch.from_numpy(latents)
    with torch.no_grad():
        logits = tokenizer.decode_indices(LatentCodec(token_dir).nearest_indices(z)) if snap else tokenizer.decode(z)
    return logits.argmax(-1).to(torch.uint8).numpy()


# ---------------------------------------------------------------------------------------------------------------
# sample.py

@pytest.mark.parametrize('sampler, options', [
    ('ddpm', ('--traj', 'straight', '--cfg-scale', 2, '--snap', '--save-upstream')),
    ('ddim', ('--traj', 'left', '--cfg-scale', 1)),
    ('dpm-solver', ('--traj', 'none', '--cfg-scale', 1)),
])
def test_sample_writes_latents_occupancy_and_trajectories(sampler, options, dit_run, tokenizer_run, token_dir,
                                                          monkeypatch, tmp_path):
    out = tmp_path / f'{sampler}.npz'
    command = sample_command(latest(dit_run), out, sampler, *options)
    if sampler == 'ddpm':
        run_script(*command)
    else:
        run_in_process(monkeypatch, *command)
    sample = check_sample_file(out)
    traj = options[1]
    assert str(sample['sampler']) == sampler and str(sample['condition']) == 'traj_xy'
    assert bool(sample['unconditional']) == (traj == 'none')
    if traj == 'none':
        np.testing.assert_array_equal(sample['traj'], 0)
    else:
        clip = preset_window_conditions(traj, num_frames=NUM_FRAMES, starts=[0], condition='traj_xy')[0]
        expected = np.broadcast_to(clip, (NUM_SAMPLES, NUM_FRAMES, 2))
        np.testing.assert_array_equal(sample['traj'], expected)
    snap = '--snap' in options
    np.testing.assert_array_equal(sample['occupancy'], decoded(tokenizer_run, token_dir, sample['latents'], snap))
    if '--save-upstream' in options:
        upstream = np.load(tmp_path / 'samples_array.npy')
        np.testing.assert_allclose(upstream, sample['latents'] * UPSTREAM_LATENT_SCALE, rtol=1e-6)


def test_sample_is_reproducible_and_takes_dataset_and_file_trajectories(monkeypatch, dit_run, token_dir, tmp_path):
    ckpt = latest(dit_run)
    run_in_process(monkeypatch, *sample_command(ckpt, tmp_path / 'a.npz', 'ddpm'))
    run_in_process(monkeypatch, *sample_command(ckpt, tmp_path / 'b.npz', 'ddpm'))
    first, second = check_sample_file(tmp_path / 'a.npz'), check_sample_file(tmp_path / 'b.npz')
    np.testing.assert_array_equal(first['latents'], second['latents'])          # same seed, same sample

    # 'dataset' draws val clips' trajectories (in metres); more samples than the 3 val clips reuse them
    run_in_process(monkeypatch, *sample_command(ckpt, tmp_path / 'dataset.npz', 'ddim', '--traj', 'dataset',
                                                num_samples=4))
    traj = check_sample_file(tmp_path / 'dataset.npz', num_samples=4)['traj']
    val = [np.load(path)['traj_xy'] for path in sorted(glob.glob(os.path.join(token_dir, 'val', '*.npz')))]
    matches = [[i for i, v in enumerate(val) if np.allclose(t, v, atol=1e-5)] for t in traj]
    assert all(len(m) == 1 for m in matches) and len({m[0] for m in matches[:3]}) == 3

    # a (T, 2) file is one trajectory for every sample, an (N, T, 2) file one per sample
    one = np.array([[0.0, 0.0], [2.5, 0.5]], np.float32)
    for name, array in (('one.npy', one), ('each.npy', np.stack([one, -one]))):
        np.save(tmp_path / name, array)
        out = tmp_path / f'{name}.npz'
        run_in_process(monkeypatch, *sample_command(ckpt, out, 'ddim', '--traj', tmp_path / name))
        expected = np.broadcast_to(array, (NUM_SAMPLES, NUM_FRAMES, 2))
        np.testing.assert_array_equal(check_sample_file(out)['traj'], expected)


def test_sample_refuses_a_tokenizer_other_than_the_tokens_one(monkeypatch, dit_run, token_dir, tmp_path):
    """train_1.py trained on overwrites the latest.pth meta.json names: decoding must not silently use it."""
    copy = tmp_path / 'vqvae'
    shutil.copytree(token_dir, copy / 'tokens')
    checkpoint = load_checkpoint(os.path.join(os.path.dirname(token_dir), 'latest.pth'))
    checkpoint['step'] += 1                                                   # another file, same network
    atomic_save(checkpoint, str(copy / 'latest.pth'))
    out = tmp_path / 'sample.npz'
    command = (*sample_command(latest(dit_run), out, 'ddim'), '--data-path', copy / 'tokens')
    with pytest.raises(ValueError, match='is not the tokenizer checkpoint the tokens in .* were made with'):
        run_in_process(monkeypatch, *command)
    with pytest.warns(UserWarning, match='is not the tokenizer checkpoint'):
        run_in_process(monkeypatch, *command, '--allow-tokenizer-mismatch')
    assert out.exists()


def test_sample_rejects_bad_requests_clearly(monkeypatch, dit_run, dit_run_without_dropout, tmp_path):
    out = tmp_path / 'never.npz'
    np.save(tmp_path / 'wrong.npy', np.zeros((NUM_FRAMES + 1, 2), np.float32))
    with pytest.raises(ValueError, match=r'wrong.npy: trajectory shape \(2, 3, 2\), expected'):
        run_in_process(monkeypatch, *sample_command(latest(dit_run), out, 'ddim', '--traj', tmp_path / 'wrong.npy'))
    nan_traj = np.zeros((NUM_FRAMES, 2), np.float32)
    nan_traj[1, 0] = np.nan
    np.save(tmp_path / 'nan.npy', nan_traj)
    with pytest.raises(ValueError, match=r'nan.npy: the trajectory holds NaN or infinite values'):
        run_in_process(monkeypatch, *sample_command(latest(dit_run), out, 'ddim', '--traj', tmp_path / 'nan.npy'))
    for flag, value, message in (('--cfg-scale', -2, '--cfg-scale must be >= 0'),
                                 ('--num-samples', 0, '--num-samples and --num-sampling-steps must be at least 1')):
        with pytest.raises(ValueError, match=message):
            run_in_process(monkeypatch, *sample_command(latest(dit_run), out, 'ddim'), flag, value)
    with pytest.raises(FileNotFoundError, match="'strait' is neither one of"):
        run_in_process(monkeypatch, *sample_command(latest(dit_run), out, 'ddim', '--traj', 'strait'))
    with pytest.raises(ValueError, match='--model DiT-XL/2 but .* holds a DiT-demo'):
        run_in_process(monkeypatch, *sample_command(latest(dit_run), out, 'ddim', '--model', 'DiT-XL/2'))
    with pytest.raises(ValueError, match='--traj none samples from the null condition alone'):
        run_in_process(monkeypatch, *sample_command(latest(dit_run), out, 'ddim', '--traj', 'none'))
    # guidance needs the null trajectory that only condition dropout trains
    with pytest.raises(ValueError, match='--cfg-scale 4 needs a DiT trained with condition dropout'):
        run_in_process(monkeypatch, *sample_command(latest(dit_run_without_dropout), out, 'ddim'))
    with pytest.raises(ValueError, match='--traj none needs a DiT trained with condition dropout'):
        run_in_process(monkeypatch, *sample_command(latest(dit_run_without_dropout), out, 'ddim', '--traj', 'none',
                                                    '--cfg-scale', 1))
    run_in_process(monkeypatch, *sample_command(latest(dit_run_without_dropout), out, 'ddim', '--cfg-scale', 1))
    check_sample_file(out)


# ---------------------------------------------------------------------------------------------------------------
# visualize_demo.py

def colour_pixels(image, rgb, tolerance=40):
    """Number of pixels of ``image`` (PIL) within ``tolerance`` (per channel) of a shade of ``rgb``: the lighting
    scales a voxel's colour, so each pixel is compared with the colour scaled to the pixel's brightest channel."""
    pixels = np.asarray(image.convert('RGB'), np.float64)                              # (H, W, 3)
    rgb = np.asarray(rgb, np.float64)
    shade = rgb * pixels.max(-1, keepdims=True) / rgb.max()                            # (H, W, 3)
    return int((np.abs(pixels - shade).max(-1) < tolerance).sum())


def check_rendered_clip(out_dir, panel_titles):
    """The PNG frames, panels and the GIF of clip 0; returns {title: [panel images by frame]}."""
    clip_dir = os.path.join(out_dir, 'clip0')
    panels = {title: [Image.open(os.path.join(clip_dir, 'panels', f'{title}_{t:02d}.png')) for t in range(NUM_FRAMES)]
              for title in panel_titles}
    for images in panels.values():
        assert all(image.size == PANEL_SIZE for image in images)
    for t in range(NUM_FRAMES):
        frame = Image.open(os.path.join(clip_dir, f'frame_{t:02d}.png'))
        assert frame.size == (PANEL_SIZE[0] * len(panel_titles), PANEL_SIZE[1] + TITLE_HEIGHT)
    gif = Image.open(os.path.join(out_dir, 'clip0.gif'))
    assert gif.n_frames == NUM_FRAMES
    return panels


def test_visualize_npz_inputs(world, tmp_path):
    pytest.importorskip('mayavi')
    # panel 'scene': two val frames of the synthetic world, kept to a 40 m square around the ego to render fast
    paths = sorted(glob.glob(os.path.join(world, 'nuscenes', 'gts', 'scene-0002', '*', 'labels.npz')))[:NUM_FRAMES]
    scene = np.stack([np.load(path)['semantics'] for path in paths])                     # (T, X, Y, Z)
    keep = np.zeros(GRID_SHAPE[:2], bool)
    keep[50:150, 50:150] = True
    scene[:, ~keep] = FREE_CLASS
    # panel 'blocks': a vegetation block ahead of the ego in frame 0, nothing (but the ego car) in frame 1
    blocks = np.full((NUM_FRAMES, *GRID_SHAPE), FREE_CLASS, np.uint8)
    blocks[0, 120:140, 90:110, 2:10] = CLASS_ID['vegetation']
    np.savez(tmp_path / 'scene.npz', occupancy=scene[None])
    np.savez(tmp_path / 'blocks.npz', occupancy=blocks[None])

    out_dir = tmp_path / 'vis'
    run_script('visualize_demo.py', '--input', tmp_path / 'scene.npz', tmp_path / 'blocks.npz',
               '--size', *PANEL_SIZE, '--out-dir', out_dir)
    panels = check_rendered_clip(out_dir, ['scene', 'blocks'])
    green = CLASS_COLORS[CLASS_ID['vegetation']]
    assert colour_pixels(panels['blocks'][0], green) > 100 + colour_pixels(panels['blocks'][1], green)
    # the scene panel shows its classes in their own colours (those far from grey, which shading also makes)
    saturated = [c for c in np.unique(scene[0]) if c not in (0, FREE_CLASS) and np.ptp(CLASS_COLORS[c]) > 100]
    shown = [c for c in saturated if colour_pixels(panels['scene'][0], CLASS_COLORS[c]) > 20]
    assert len(saturated) >= 3 and len(shown) >= 3, (saturated, shown)


def test_visualize_dataset_ground_truth_and_reconstruction(tokenizer_config, tokenizer_run, tmp_path):
    pytest.importorskip('mayavi')
    out_dir = tmp_path / 'vis'
    run_script('visualize_demo.py', '--py-config', tokenizer_config, '--work-dir', tokenizer_run, '--num-clips', 1,
               '--size', *PANEL_SIZE, '--out-dir', out_dir)
    panels = check_rendered_clip(out_dir, ['ground_truth', 'reconstruction'])
    background = np.asarray(Image.new('RGB', PANEL_SIZE, 'white'))
    for images in panels.values():
        assert all((np.asarray(image.convert('RGB')) != background).any(-1).mean() > 0.02 for image in images)


def test_visualize_rejects_a_file_without_occupancy_grids(tmp_path):
    from visualize_demo import file_panels
    np.savez(tmp_path / 'latents.npz', latents=np.zeros((1, *LATENT_SHAPE), np.float32))
    with pytest.raises(KeyError, match="no 'occupancy' array"):
        file_panels([tmp_path / 'latents.npz'], 1)
    np.savez(tmp_path / 'small.npz', occupancy=np.zeros((1, NUM_FRAMES, 50, 50, 16), np.uint8))
    with pytest.raises(ValueError, match=r'small.npz: occupancy has shape \(1, 2, 50, 50, 16\)'):
        file_panels([tmp_path / 'small.npz'], 1)
