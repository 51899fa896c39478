"""Generation metrics of sampled 4D occupancy: a protocol anyone can rerun.

    python -m evaluation.evaluate --samples S.npz [--out metrics.json]
    python -m evaluation.evaluate --samples S.npz --reference R.npz --features out/features.pt --out metrics.json
    python -m evaluation.evaluate --samples S.npz --reference-config config/demo_vqvae.py --reference-split val \\
        --features out/features.pt
    python -m evaluation.evaluate --calibrate --py-config config/demo_vqvae.py --features out/features.pt

S is a samples file of sample.py (.npz with `occupancy` (N, T, 200, 200, 16) uint8 and `traj` (N, T, 2) in the
'traj_xy' convention); R an .npz with `occupancy` (and optionally `traj`) or a dataset split read through
dataset.loader.build_dataset in 'sliding' mode with the samples' clip length. Each set is read once, clip by clip
(an .npz is streamed, never loaded whole). Prints one JSON object:

  adherence_ade_m, adherence_fde_m  trajectory adherence: the ego trajectory recovered from each clip's static
                  classes (evaluation/ego_motion.py) against its conditioning `traj`; ADE = mean over clips and frames
                  1..T-1 (frame 0 is the origin of both) of the Euclidean error in metres, FDE = the same at the
                  last frame. Per-clip values in adherence_per_clip. shuffled_adherence_ade_m scores every clip
                  against another clip's trajectory: the ceiling that conditioning must beat. The reference gets
                  the same when it has `traj` (reference_adherence_*: the floor of what registration error alone
                  costs).
  static_consistency, reference_static_consistency  fraction of static-class voxels of frame t found with the same
                  class in frame t+1 after moving them by the recovered ego motion (pooled over pairs and clips).
  class_js_divergence  Jensen-Shannon divergence, in bits (0 = same, 1 = disjoint), between the class-frequency
                  histograms of samples and reference over the semantic classes (free left out).
  frechet_distance  ||mu_s - mu_r||^2 + Tr(S_s + S_r - 2 (S_s S_r)^(1/2)) of the features of the occupancy
                  feature extractor (evaluation/occ_features.py), as FID does with Inception features;
  mmd             unbiased squared MMD with the cubic polynomial kernel k(a, b) = (a.b / D + 1)^3 (KID's
                  estimator, over the whole sets); features.sha256 names the extractor checkpoint.
Fréchet distance is biased upwards for small sets (compare only sets of equal size); MMD is unbiased.
"""
import argparse
import logging
import math
import os
import zipfile

import numpy as np
import torch
from tqdm import tqdm

from dataset.constants import CLASS_NAMES, GRID_SHAPE, NUM_CLASSES, SEMANTIC_CLASSES
from dataset.loader import build_dataset
from evaluation.ego_motion import recover_poses, static_consistency_counts
from evaluation.occ_features import extract_features, load_feature_extractor
from utils.checkpoint import file_sha256
from utils.config import add_config_args, load_config
from utils.run_log import json_text

FEATURE_BATCH = 4          # clips per feature-extractor batch
logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Metrics on features and histograms
# ----------------------------------------------------------------------------------------------------------------

def frechet_distance(features_a, features_b):
    """Fréchet distance between Gaussians fitted to two feature sets (N, D) and (M, D), N, M >= 2."""
    features_a, features_b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    mean_a, mean_b = features_a.mean(0), features_b.mean(0)
    cov_a, cov_b = np.cov(features_a, rowvar=False), np.cov(features_b, rowvar=False)
    # Tr((A B)^(1/2)) = sum of the square roots of the eigenvalues of A^(1/2) B A^(1/2), a symmetric PSD matrix
    values, vectors = np.linalg.eigh(cov_a)
    sqrt_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a), 0, None)).sum()
    distance = ((mean_a - mean_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt
    return float(max(distance, 0.0))


def polynomial_mmd(features_a, features_b):
    """Unbiased squared MMD (KID's estimator) with the kernel (a.b / D + 1)^3 between (N, D) and (M, D), N, M >= 2."""
    features_a, features_b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    dim = features_a.shape[1]
    k_aa = (features_a @ features_a.T / dim + 1) ** 3
    k_bb = (features_b @ features_b.T / dim + 1) ** 3
    k_ab = (features_a @ features_b.T / dim + 1) ** 3
    n, m = len(features_a), len(features_b)
    within_a = (k_aa.sum() - np.trace(k_aa)) / (n * (n - 1))
    within_b = (k_bb.sum() - np.trace(k_bb)) / (m * (m - 1))
    return float(within_a + within_b - 2 * k_ab.mean())


def js_divergence_bits(counts_a, counts_b):
    """Jensen-Shannon divergence in bits (0..1) between two histograms (any non-negative counts, same length)."""
    p = np.asarray(counts_a, np.float64) / np.sum(counts_a)
    q = np.asarray(counts_b, np.float64) / np.sum(counts_b)
    mixture = (p + q) / 2

    def kl_bits(x):
        kept = x > 0
        return float((x[kept] * np.log2(x[kept] / mixture[kept])).sum())

    return 0.5 * kl_bits(p) + 0.5 * kl_bits(q)


# ----------------------------------------------------------------------------------------------------------------
# Reading clip sets
# ----------------------------------------------------------------------------------------------------------------

def npz_clips(path, key='occupancy'):
    """Stream the clips of array ``key`` (N, T, X, Y, Z) uint8 of an .npz one by one, without loading it whole.
    Returns (N, T) and a generator of (T, X, Y, Z) uint8 arrays."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'missing clip file: {path}')
    if not zipfile.is_zipfile(path):
        raise ValueError(f'{path}: not an .npz file')
    with zipfile.ZipFile(path) as archive:
        if f'{key}.npy' not in archive.namelist():
            raise KeyError(f'{path}: no {key!r} array (found {[n[:-4] for n in archive.namelist()]}); expected '
                           f'(N, T, {", ".join(map(str, GRID_SHAPE))}) uint8 occupancy')
        with archive.open(f'{key}.npy') as f:
            version = np.lib.format.read_magic(f)
            shape, fortran_order, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                           else np.lib.format.read_array_header_2_0(f))
    if len(shape) != 5 or shape[2:] != GRID_SHAPE or dtype != np.uint8 or fortran_order or shape[0] == 0:
        raise ValueError(f'{path}: {key!r} is {shape} {dtype}{" Fortran-ordered" if fortran_order else ""}, expected '
                         f'C-ordered (N >= 1, T, {", ".join(map(str, GRID_SHAPE))}) uint8')

    def generate():
        clip_bytes = math.prod(shape[1:])
        with zipfile.ZipFile(path) as archive, archive.open(f'{key}.npy') as f:
            version = np.lib.format.read_magic(f)
            (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)(f)
            for index in range(shape[0]):
                clip = np.frombuffer(f.read(clip_bytes), np.uint8).reshape(shape[1:])
                if clip.max() >= NUM_CLASSES:
                    raise ValueError(f'{path}: clip {index} of {key!r} holds class {clip.max()}, '
                                     f'expected 0..{NUM_CLASSES - 1}')
                yield clip

    return shape[:2], generate()


def npz_trajectories(path, shape, required):
    """The (N, T, 2) float32 `traj` of an .npz checked against the occupancy's (N, T); None when absent and not
    ``required``."""
    with np.load(path) as npz:
        if 'traj' not in npz.files:
            if required:
                raise KeyError(f"{path}: no 'traj' array; trajectory adherence needs the conditioning trajectories, "
                               f"(N, T, 2) float32 metres in the 'traj_xy' convention (as sample.py writes them)")
            return None
        traj = npz['traj'].astype(np.float32)
    if traj.shape != (*shape, 2):
        raise ValueError(f"{path}: 'traj' has shape {traj.shape}, expected {(*shape, 2)} to match 'occupancy'")
    return traj


def adherence_applicable(path):
    """(True, None), or (False, why) when the samples' `traj` is no 'traj_xy' path (other condition, unconditional)."""
    with np.load(path) as npz:
        condition = str(npz['condition']) if 'condition' in npz.files else 'traj_xy'
        unconditional = bool(npz['unconditional']) if 'unconditional' in npz.files else False
    if unconditional:
        return False, 'samples are unconditional: no trajectory to adhere to'
    if condition != 'traj_xy':
        return False, f"samples are conditioned on {condition!r}, not 'traj_xy' positions"
    return True, None


def dataset_clips(cfg, split, num_frames, stride=None, max_clips=None):
    """Clips of a dataset split in 'sliding' mode: (count, generator of (clip (T, X, Y, Z) uint8, traj (T, 2)))."""
    overrides = dict(mode='sliding', num_frames=num_frames, conditions=('traj_xy',))
    if stride is not None:
        overrides['stride'] = stride
    dataset = build_dataset(cfg, split, **overrides)
    count = len(dataset) if max_clips is None else min(len(dataset), max_clips)

    def generate():
        for index in range(count):
            item = dataset[index]
            yield item['occupancy'].numpy(), item['traj_xy'].numpy()

    return count, generate()


# ----------------------------------------------------------------------------------------------------------------
# One pass over a set
# ----------------------------------------------------------------------------------------------------------------

def measure_set(name, count, clips, feature_model=None, register=True):
    """Everything the metrics need from one set, in one pass over ``clips`` (``count`` items, each a clip
    (T, X, Y, Z) uint8 or a (clip, traj (T, 2) or None) pair).

    Returns dict: 'features' (N, D) or None, 'class_counts' (17,) int64 over SEMANTIC_CLASSES, and with
    ``register``: 'recovered' (N, T, 2) recovered trajectories, 'static' (matches, compared) and 'traj'
    (N, T, 2) or None."""
    class_counts = np.zeros(NUM_CLASSES, np.int64)
    features, batch, recovered, trajectories = [], [], [], []
    matches = compared = 0
    for item in tqdm(clips, total=count, desc=f'{name}: {"registration, " if register else ""}classes, features'):
        clip, traj = item if isinstance(item, tuple) else (item, None)
        class_counts += np.bincount(clip.ravel(), minlength=NUM_CLASSES)
        if register:
            poses = recover_poses(clip)                                              # (T, 3)
            recovered.append(poses[:, :2])
            trajectories.append(traj)
            clip_matches, clip_compared = static_consistency_counts(clip, poses)
            matches, compared = matches + clip_matches, compared + clip_compared
        if feature_model is not None:
            batch.append(clip)
            if len(batch) == FEATURE_BATCH:
                features.append(extract_features(feature_model, batch))
                batch = []
    if feature_model is not None and batch:
        features.append(extract_features(feature_model, batch))
    result = {'features': np.concatenate(features) if features else None,
              'class_counts': class_counts[list(SEMANTIC_CLASSES)]}
    if register:
        result.update(recovered=np.stack(recovered), static=(matches, compared),
                      traj=None if any(t is None for t in trajectories) else np.stack(trajectories))
    return result


def adherence(recovered, traj):
    """ADE and FDE (metres) of recovered (N, T, 2) against traj (N, T, 2): per clip (N,) each, frames 1..T-1."""
    errors = np.linalg.norm(recovered - traj, axis=-1)                                # (N, T)
    return errors[:, 1:].mean(1), errors[:, -1]


def deranged(traj):
    """Every clip's trajectory given to another clip (the set rolled by half its size): the adherence ceiling."""
    return np.roll(traj, len(traj) // 2, axis=0)


def _consistency(stats):
    """Static consistency of a measured set (None when no static voxel could be compared)."""
    matches, compared = stats['static']
    return matches / compared if compared else None


def _class_frequencies(counts):
    """Class name -> fraction of the semantic (non-free) voxels, from counts (17,) over SEMANTIC_CLASSES."""
    total = max(int(counts.sum()), 1)
    return {CLASS_NAMES[c]: int(n) / total for c, n in zip(SEMANTIC_CLASSES, counts)}


def compare(samples, reference, feature_info=None):
    """Metrics of two measured sets (`measure_set`): dict of JSON-ready values."""
    result = {'class_js_divergence': js_divergence_bits(samples['class_counts'], reference['class_counts']),
              'reference_static_consistency': _consistency(reference)}
    if reference.get('traj') is not None:
        ade, fde = adherence(reference['recovered'], reference['traj'])
        result.update(reference_adherence_ade_m=float(ade.mean()), reference_adherence_fde_m=float(fde.mean()))
    if samples['features'] is not None and reference['features'] is not None:
        if min(len(samples['features']), len(reference['features'])) < 2:
            raise ValueError('Fréchet distance and MMD need at least 2 clips in each set')
        result.update(frechet_distance=frechet_distance(samples['features'], reference['features']),
                      mmd=polynomial_mmd(samples['features'], reference['features']), features=feature_info)
    result['class_frequencies'] = {'samples': _class_frequencies(samples['class_counts']),
                                   'reference': _class_frequencies(reference['class_counts'])}
    return result


# ----------------------------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------------------------

def _feature_model(path):
    """(model, JSON description) of a feature-extractor checkpoint, or (None, None) without one."""
    if path is None:
        return None, None
    model, checkpoint = load_feature_extractor(path)
    return model, {'checkpoint': os.path.abspath(path), 'sha256': file_sha256(path),
                   'feature_dim': checkpoint['model_args']['feature_dim'], 'training': checkpoint['training']}


def evaluate(args):
    """The metrics of ``args.samples`` (against the reference, if any): a JSON-ready dict."""
    shape, sample_clips = npz_clips(args.samples)
    applicable, why_not = adherence_applicable(args.samples)
    traj = npz_trajectories(args.samples, shape, required=True)
    feature_model, feature_info = _feature_model(args.features)
    if feature_info is not None and feature_info['training'].get('num_frames') != shape[1]:
        logger.warning('the feature extractor was trained on clips of %s frames, the samples have %d',
                       feature_info['training'].get('num_frames'), shape[1])
    has_reference = args.reference or args.reference_config
    if has_reference and feature_model is None:
        logger.warning('no --features checkpoint: frechet_distance and mmd are left out')
    result = {'samples': os.path.abspath(args.samples), 'num_samples': shape[0], 'num_frames': shape[1]}

    samples = measure_set('samples', shape[0], zip(sample_clips, traj), feature_model if has_reference else None)
    result['static_consistency'] = _consistency(samples)
    if applicable:
        ade, fde = adherence(samples['recovered'], traj)
        result.update(adherence_ade_m=float(ade.mean()), adherence_fde_m=float(fde.mean()),
                      adherence_per_clip=[{'ade_m': float(a), 'fde_m': float(f)} for a, f in zip(ade, fde)])
        if shape[0] > 1:
            shuffled_ade, _ = adherence(samples['recovered'], deranged(traj))
            result['shuffled_adherence_ade_m'] = float(shuffled_ade.mean())
    else:
        result.update(adherence_ade_m=None, adherence_fde_m=None, adherence_note=why_not)

    if has_reference:
        if args.reference:
            reference_shape, reference_clips = npz_clips(args.reference)
            if reference_shape[1] != shape[1]:
                raise ValueError(f'{args.reference}: clips of {reference_shape[1]} frames, the samples have {shape[1]}')
            reference_traj = npz_trajectories(args.reference, reference_shape, required=False)
            count, clips = reference_shape[0], (reference_clips if reference_traj is None
                                                else zip(reference_clips, reference_traj))
            result['reference'] = os.path.abspath(args.reference)
        else:
            cfg = load_config(argparse.Namespace(py_config=args.reference_config, cfg_options=args.cfg_options))
            count, clips = dataset_clips(cfg, args.reference_split, shape[1], args.reference_stride, args.max_clips)
            result['reference'] = f'{args.reference_config}:{args.reference_split}'
        reference = measure_set('reference', count, clips, feature_model)
        result['num_reference'] = count
        result.update(compare(samples, reference, feature_info))
    return result


def calibrate(args):
    """Floors and ceilings of every metric on a dataset's clips: a JSON-ready dict."""
    cfg = load_config(args)
    num_frames = args.num_frames or cfg.dataset.common.num_frames
    feature_model, feature_info = _feature_model(args.features)

    def val_clips():
        """(count, generator of (clip, traj)) of the val split; read anew for each pass to hold one clip at a time."""
        return dataset_clips(cfg, 'val', num_frames, args.reference_stride, args.max_clips)

    val_count = val_clips()[0]
    if val_count < 2:
        raise ValueError(f'calibration needs at least 2 val clips of {num_frames} frames, got {val_count}')
    val = measure_set('val', *val_clips(), feature_model)
    train_count, train_clips = dataset_clips(cfg, 'train', num_frames, args.reference_stride, args.max_clips)
    train = measure_set('train', train_count, train_clips, feature_model, register=False)
    # Trivial baselines built from the val clips: a frozen world, and real frames in a random order
    order = np.random.default_rng(0).permutation(num_frames)
    baselines = {
        'first_frame_repeated': measure_set('first frame repeated', val_count,
                                            (np.repeat(clip[:1], num_frames, 0) for clip, _ in val_clips()[1]),
                                            feature_model),
        'frames_shuffled': measure_set('frames shuffled', val_count, (clip[order] for clip, _ in val_clips()[1]),
                                       feature_model)}
    true_ade, true_fde = adherence(val['recovered'], val['traj'])
    wrong_ade, wrong_fde = adherence(val['recovered'], deranged(val['traj']))
    result = {'config': args.py_config, 'num_frames': num_frames, 'val_clips': val_count, 'train_clips': train_count,
              'adherence': {'true_traj': {'ade_m': float(true_ade.mean()), 'fde_m': float(true_fde.mean()),
                                          'max_fde_m': float(true_fde.max())},
                            'shuffled_traj': {'ade_m': float(wrong_ade.mean()), 'fde_m': float(wrong_fde.mean())}},
              'static_consistency': {'val': _consistency(val),
                                     **{name: _consistency(stats) for name, stats in baselines.items()}},
              'class_js_divergence': {'train_vs_val': js_divergence_bits(train['class_counts'], val['class_counts'])}}
    if feature_model is not None:
        pairs = {'train_vs_val': (train, val), **{f'val_vs_{name}': (val, stats) for name, stats in baselines.items()}}
        result['frechet_distance'] = {k: frechet_distance(a['features'], b['features']) for k, (a, b) in pairs.items()}
        result['mmd'] = {k: polynomial_mmd(a['features'], b['features']) for k, (a, b) in pairs.items()}
        result['features'] = feature_info
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description='Generation metrics of sampled 4D occupancy (module docstring).')
    parser.add_argument('--samples', help='samples .npz (sample.py): occupancy (N, T, X, Y, Z) uint8 + traj (N, T, 2)')
    parser.add_argument('--reference', help='reference .npz with occupancy (+ traj)')
    parser.add_argument('--reference-config', help='or: a dataset config whose split is the reference')
    parser.add_argument('--reference-split', default='val', choices=('train', 'val'))
    parser.add_argument('--reference-stride', type=int, help='sliding-window stride (default: the config\'s)')
    parser.add_argument('--max-clips', type=int, help='use at most this many dataset clips per split')
    parser.add_argument('--features', help='feature-extractor checkpoint (python -m evaluation.occ_features train)')
    parser.add_argument('--calibrate', action='store_true', help='floors and ceilings on the --py-config dataset')
    parser.add_argument('--num-frames', type=int, help='clip length for --calibrate (default: the config\'s)')
    parser.add_argument('--out', help='also write the JSON here')
    add_config_args(parser, 'config/demo_vqvae.py')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    if args.calibrate == bool(args.samples):
        parser.error('give either --samples S.npz or --calibrate')
    if args.reference and args.reference_config:
        parser.error('give --reference or --reference-config, not both')
    with torch.no_grad():            # scoped: main() is also called in-process by the tests
        result = calibrate(args) if args.calibrate else evaluate(args)
    text = json_text(result, indent=2)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, 'w') as f:
            f.write(text + '\n')
    print(text)
    return result


if __name__ == '__main__':
    main()
