"""Reconstruction metrics of a 4D occupancy clip: IoU (occupied vs free) and mIoU over the semantic classes,
per frame position of the clip and averaged over the frames (as upstream's `train_1.py` validates).

Counts are accumulated over a whole evaluation pass, separately for every frame position t of the clip, and
only turned into ratios at the end, as upstream's `multi_step_MeanIou` does:

    IoU_c(t) = tp_c(t) / (tp_c(t) + fp_c(t) + fn_c(t))          c in SEMANTIC_CLASSES (0..16)
    mIoU(t)  = mean of IoU_c(t) over the classes that count      IoU(t) = the same for the class "occupied"

Which classes count (``mode``):
    'exclude_absent' (default): a class absent from both the ground truth and the prediction at frame t
        (tp + fp + fn = 0) is left out of that frame's mean; one absent from the ground truth but predicted
        scores 0. A frame where no class counts at all has mIoU None (NaN), and is left out of the mean
        over frames (None as well when no frame counts).
    'upstream': upstream exactly: a class with no ground-truth voxel (tp + fn = 0) scores 1, even when
        predicted, and mIoU(t) is the mean over all 17 classes.
Every number is a percentage (0..100), as upstream logs it.
"""
import math

import torch
import torch.distributed as dist

from dataset.constants import CLASS_NAMES, FREE_CLASS, NUM_CLASSES, SEMANTIC_CLASSES
from utils.distributed import is_distributed

MODES = ('exclude_absent', 'upstream')


def _iou_percent(true_positive, false_positive, false_negative, mode):
    """Element-wise IoU in percent of float64 count tensors (any shape), NaN where the class does not count."""
    union = true_positive + false_positive + false_negative
    iou = 100 * true_positive / union                       # NaN where union = 0
    if mode == 'upstream':
        seen = true_positive + false_negative
        iou = torch.where(seen == 0, torch.full_like(iou, 100.0), iou)
    return iou


def _nan_to_none(value):
    return None if math.isnan(value) else value


def mean_or_none(values):
    """Mean of the values that are not None (None if there are none)."""
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


class OccupancyMetrics:
    """Per-frame IoU / mIoU counters for clips of ``num_frames`` frames.

    Args:
        num_frames: T, the clip length every ``update`` must have.
        mode: 'exclude_absent' or 'upstream' (see the module docstring).
        use_camera_mask: evaluate only the voxels a camera sees; then every ``update`` needs a ``mask``.

    Counters (int64, on the device of the last input): ``true_positive``, ``false_positive``,
    ``false_negative`` of shape (T, len(SEMANTIC_CLASSES)) and ``occupied_true_positive``,
    ``occupied_false_positive``, ``occupied_false_negative`` of shape (T,).
    """

    def __init__(self, num_frames, mode='exclude_absent', use_camera_mask=False):
        if mode not in MODES:
            raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
        if num_frames < 1:
            raise ValueError(f'num_frames must be a positive integer, got {num_frames}')
        self.num_frames, self.mode, self.use_camera_mask = num_frames, mode, use_camera_mask
        self.reset()

    def reset(self):
        """Zero every counter."""
        num_semantic = len(SEMANTIC_CLASSES)
        self.true_positive = torch.zeros(self.num_frames, num_semantic, dtype=torch.int64)
        self.false_positive = torch.zeros(self.num_frames, num_semantic, dtype=torch.int64)
        self.false_negative = torch.zeros(self.num_frames, num_semantic, dtype=torch.int64)
        self.occupied_true_positive = torch.zeros(self.num_frames, dtype=torch.int64)
        self.occupied_false_positive = torch.zeros(self.num_frames, dtype=torch.int64)
        self.occupied_false_negative = torch.zeros(self.num_frames, dtype=torch.int64)

    def _check(self, pred, target, mask):
        for name, tensor in (('pred', pred), ('target', target)):
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f'{name} must be a torch.Tensor, got {type(tensor).__name__}')
            if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
                raise ValueError(f'{name} must hold integer class ids, got dtype {tensor.dtype}')
            if tensor.dim() != 5 or tensor.shape[1] != self.num_frames:
                raise ValueError(f'{name} must have shape (B, T={self.num_frames}, X, Y, Z), got {tuple(tensor.shape)}')
        if pred.shape != target.shape:
            raise ValueError(f'pred shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}')
        if mask is None and self.use_camera_mask:
            raise ValueError('mask is required: these metrics were built with use_camera_mask=True')
        if mask is not None:
            if not self.use_camera_mask:
                raise ValueError('mask given but these metrics were built with use_camera_mask=False')
            if mask.shape != target.shape:
                raise ValueError(f'mask shape {tuple(mask.shape)} differs from target shape {tuple(target.shape)}')
        for name, tensor in (('pred', pred), ('target', target)):
            if tensor.numel() == 0:
                continue
            low, high = int(tensor.min()), int(tensor.max())
            if low < 0 or high >= NUM_CLASSES:
                raise ValueError(f'{name} holds class ids {low}..{high}, expected 0..{NUM_CLASSES - 1}')

    @torch.no_grad()
    def update(self, pred, target, mask=None):
        """Add one batch.

        Args:
            pred, target: integer tensors (B, T, X, Y, Z), classes 0..NUM_CLASSES - 1 (FREE_CLASS = free).
            mask: optional (B, T, X, Y, Z) {0, 1} tensor (Occ3D's mask_camera); only voxels with 1 count.
        """
        self._check(pred, target, mask)
        device = pred.device
        # One bincount over (frame, target class, predicted class) gives every frame's confusion matrix.
        frame = torch.arange(self.num_frames, device=device).view(1, -1, 1, 1, 1)
        cell = (frame * NUM_CLASSES + target.long()) * NUM_CLASSES + pred.long()       # (B, T, X, Y, Z)
        if mask is not None:
            cell = cell[mask.to(device) != 0]                                             # (kept voxels,)
        confusion = torch.bincount(cell.flatten(), minlength=self.num_frames * NUM_CLASSES ** 2)
        confusion = confusion.view(self.num_frames, NUM_CLASSES, NUM_CLASSES)             # (T, target, pred)

        semantic = list(SEMANTIC_CLASSES)
        correct = confusion.diagonal(dim1=1, dim2=2)                                      # (T, C)
        true_positive = correct[:, semantic]
        false_positive = confusion.sum(dim=1)[:, semantic] - true_positive                # predicted c, target not c
        false_negative = confusion.sum(dim=2)[:, semantic] - true_positive                # target c, predicted not c
        occupied = [c for c in range(NUM_CLASSES) if c != FREE_CLASS]

        self._to(device)
        self.true_positive += true_positive
        self.false_positive += false_positive
        self.false_negative += false_negative
        self.occupied_true_positive += confusion[:, occupied][:, :, occupied].sum(dim=(1, 2))
        self.occupied_false_positive += confusion[:, FREE_CLASS, occupied].sum(dim=1)
        self.occupied_false_negative += confusion[:, occupied, FREE_CLASS].sum(dim=1)

    def _counters(self):
        return [self.true_positive, self.false_positive, self.false_negative,
                self.occupied_true_positive, self.occupied_false_positive, self.occupied_false_negative]

    def _set_counters(self, counters):
        (self.true_positive, self.false_positive, self.false_negative,
         self.occupied_true_positive, self.occupied_false_positive, self.occupied_false_negative) = counters

    def _to(self, device):
        self._set_counters([c.to(device) for c in self._counters()])

    def all_reduce(self):
        """Sum the counters over all processes when torch.distributed is initialised; a no-op otherwise
        (upstream reduced unconditionally and so crashed without a process group)."""
        if not is_distributed():
            return
        # NCCL reduces only CUDA tensors; a rank that saw no batch still holds CPU counters.
        device = torch.device('cuda', torch.cuda.current_device()) if dist.get_backend() == 'nccl' \
            else torch.device('cpu')
        counters = [c.to(device) for c in self._counters()]
        flat = torch.cat([c.flatten() for c in counters])                                # one collective call
        dist.all_reduce(flat)
        self._set_counters([part.view_as(c) for part, c in zip(flat.split([c.numel() for c in counters]), counters)])

    def compute(self):
        """The metrics as plain Python numbers (percent), ready for JSON:

            'iou', 'miou'                      mean over the frames of the per-frame values
            'iou_per_frame', 'miou_per_frame'  lists of T values (None for a frame where nothing counts)
            'class_iou'                        class name -> IoU of the counts summed over all frames, by the
                                               mode's rule (None: absent from target and prediction,
                                               'exclude_absent'; 100: absent from target, 'upstream')
            'class_iou_per_frame'              class name -> list of T values, frame by frame, by the same rule
            'class_share'                      class name -> its share (0..1) of the occupied ground-truth voxels
            'frames'                           T
        """
        tp, fp, fn = (c.double().cpu() for c in self._counters()[:3])                   # (T, C) each
        class_iou = _iou_percent(tp, fp, fn, self.mode)                                  # (T, C), NaN = left out
        miou_per_frame = class_iou.nanmean(dim=1).tolist()                               # all-NaN row -> NaN
        occupied = [c.double().cpu() for c in self._counters()[3:]]                     # (T,) each
        iou_per_frame = _iou_percent(*occupied, self.mode).tolist()
        iou_per_frame = [_nan_to_none(v) for v in iou_per_frame]
        miou_per_frame = [_nan_to_none(v) for v in miou_per_frame]
        overall = _iou_percent(tp.sum(dim=0), fp.sum(dim=0), fn.sum(dim=0), self.mode).tolist()   # (C,)
        ground_truth = (tp + fn).sum(dim=0)                                              # (C,) voxels per class
        share = (ground_truth / ground_truth.sum().clamp(min=1)).tolist()
        return {
            'iou': mean_or_none(iou_per_frame),
            'miou': mean_or_none(miou_per_frame),
            'iou_per_frame': iou_per_frame,
            'miou_per_frame': miou_per_frame,
            'class_iou': {CLASS_NAMES[c]: _nan_to_none(v) for c, v in zip(SEMANTIC_CLASSES, overall)},
            'class_iou_per_frame': {CLASS_NAMES[c]: [_nan_to_none(v) for v in column]
                                    for c, column in zip(SEMANTIC_CLASSES, class_iou.T.tolist())},
            'class_share': {CLASS_NAMES[c]: v for c, v in zip(SEMANTIC_CLASSES, share)},
            'frames': self.num_frames,
        }
