"""Reading one Occ3D-nuScenes ground-truth frame (`gts/<scene>/<token>/labels.npz`), with every check a
user needs when pointing the loader at their own copy of the data."""
import os
import zipfile
import zlib

import numpy as np

from dataset.constants import GRID_SHAPE, NUM_CLASSES, OCC3D_KEYS


def labels_path(gts_root, scene_name, token):
    """Where Occ3D keeps the labels of one keyframe."""
    return os.path.join(gts_root, scene_name, token, 'labels.npz')


def load_labels(path, keys=('semantics',)):
    """Load the arrays ``keys`` (a subset of OCC3D_KEYS) of one labels.npz.

    Returns a dict key -> (200, 200, 16) uint8 array. Raises FileNotFoundError for a missing file and
    ValueError, naming the file and the key, for anything that is not Occ3D's format.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f'missing Occ3D labels file: {path}')
    try:
        npz = np.load(path)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f'{path}: not a readable .npz file ({error})') from error
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ValueError(f'{path}: not a readable .npz file (holds a single array)')
    with npz:
        missing = [k for k in keys if k not in npz.files]
        if missing:
            raise ValueError(f'{path}: missing key(s) {missing}; an Occ3D labels.npz holds {list(OCC3D_KEYS)}, '
                             f'found {npz.files}')
        try:
            arrays = {k: npz[k] for k in keys}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as error:
            raise ValueError(f'{path}: corrupt array in .npz file ({error})') from error
    for key, array in arrays.items():
        if array.shape != GRID_SHAPE or array.dtype != np.uint8:
            raise ValueError(f'{path}: {key!r} has shape {array.shape} dtype {array.dtype}, '
                             f'expected {GRID_SHAPE} uint8')
    if 'semantics' in arrays and arrays['semantics'].max() >= NUM_CLASSES:
        raise ValueError(f'{path}: semantics holds class {arrays["semantics"].max()}, expected 0..{NUM_CLASSES - 1}')
    return arrays
