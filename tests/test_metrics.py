"""IoU / mIoU counters: hand-computed small cases in both modes, the camera mask, per-frame separation, a numpy
reference on random data, and the two-process all_reduce."""
import json

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dataset.constants import CLASS_ID, CLASS_NAMES, FREE_CLASS, NUM_CLASSES, SEMANTIC_CLASSES
from evaluation.metrics import OccupancyMetrics

CAR, ROAD, MANMADE = CLASS_ID['car'], CLASS_ID['driveable_surface'], CLASS_ID['manmade']
PEDESTRIAN, BUS = CLASS_ID['pedestrian'], CLASS_ID['bus']
F = FREE_CLASS


def clip(frames):
    """(1, T, 2, 2, 2) int64 clip from T lists of 8 class ids (voxel v = 4x + 2y + z)."""
    return torch.tensor(frames, dtype=torch.int64).view(1, len(frames), 2, 2, 2)


# Frame 0: car 1/3 (v0 hit, v1 missed as road, v6 false alarm), road 2/3, manmade 0 (missed), the rest absent;
# occupied: tp 4 (v0..v3), fp 1 (v6), fn 1 (v4).
# Frame 1: pedestrian missed (v0), bus predicted where there is none (v1); occupied: tp 0, fp 1, fn 1.
TARGET = clip([[CAR, CAR, ROAD, ROAD, MANMADE, F, F, F],
               [PEDESTRIAN, F, F, F, F, F, F, F]])
PRED = clip([[CAR, ROAD, ROAD, ROAD, F, F, CAR, F],
             [F, BUS, F, F, F, F, F, F]])
NUM_SEMANTIC = len(SEMANTIC_CLASSES)


def test_exclude_absent_hand_computed():
    metrics = OccupancyMetrics(2)
    metrics.update(PRED, TARGET)
    result = metrics.compute()
    frame0, frame1 = (100 / 3 + 200 / 3 + 0) / 3, (0 + 0) / 2       # the bus absent from the target scores 0
    assert result['miou_per_frame'] == pytest.approx([frame0, frame1])
    assert result['miou'] == pytest.approx((frame0 + frame1) / 2)
    assert result['iou_per_frame'] == pytest.approx([400 / 6, 0])
    assert result['iou'] == pytest.approx(200 / 6)
    assert result['frames'] == 2
    class_iou = result['class_iou']
    assert list(class_iou) == [CLASS_NAMES[c] for c in SEMANTIC_CLASSES]
    assert class_iou['car'] == pytest.approx(100 / 3)
    assert class_iou['driveable_surface'] == pytest.approx(200 / 3)
    assert class_iou['manmade'] == class_iou['pedestrian'] == class_iou['bus'] == 0
    assert class_iou['truck'] is None and class_iou['others'] is None
    per_frame = result['class_iou_per_frame']
    assert per_frame['car'] == pytest.approx([100 / 3, None]) and per_frame['bus'] == [None, 0]
    assert per_frame['pedestrian'] == [None, 0] and per_frame['truck'] == [None, None]
    # 6 occupied target voxels: car 2, road 2, manmade 1, pedestrian 1
    assert result['class_share'] == pytest.approx({name: {'car': 2 / 6, 'driveable_surface': 2 / 6, 'manmade': 1 / 6,
                                                          'pedestrian': 1 / 6}.get(name, 0.0) for name in class_iou})
    json.dumps(result)                                                   # plain Python numbers only


def test_upstream_mode_scores_classes_absent_from_target_as_one():
    metrics = OccupancyMetrics(2, mode='upstream')
    metrics.update(PRED, TARGET)
    result = metrics.compute()
    # frame 0: 14 absent classes score 1, car 1/3, road 2/3, manmade 0; frame 1: pedestrian 0, the other 16 score 1
    frame0, frame1 = 100 * (14 + 1 / 3 + 2 / 3) / NUM_SEMANTIC, 100 * 16 / NUM_SEMANTIC
    assert result['miou_per_frame'] == pytest.approx([frame0, frame1])
    assert result['miou'] == pytest.approx((frame0 + frame1) / 2)
    assert result['iou_per_frame'] == pytest.approx([400 / 6, 0])
    assert result['class_iou']['bus'] == 100 and result['class_iou']['truck'] == 100
    assert result['class_iou']['pedestrian'] == 0


def test_counters_hold_true_false_positives_and_negatives():
    metrics = OccupancyMetrics(2)
    metrics.update(PRED, TARGET)
    assert metrics.true_positive.dtype == torch.int64 and metrics.true_positive.shape == (2, NUM_SEMANTIC)
    assert metrics.true_positive[0, CAR] == 1 and metrics.false_positive[0, CAR] == 1
    assert metrics.false_negative[0, CAR] == 1 and metrics.false_positive[1, BUS] == 1
    assert metrics.occupied_true_positive.tolist() == [4, 0]
    assert metrics.occupied_false_positive.tolist() == [1, 1]
    assert metrics.occupied_false_negative.tolist() == [1, 1]


def test_camera_mask_keeps_only_visible_voxels():
    mask = torch.ones_like(TARGET)
    mask.view(2, 8)[0, 6] = 0                 # hides the false car of frame 0
    mask.view(2, 8)[1, 1] = 0                 # hides the false bus of frame 1
    metrics = OccupancyMetrics(2, use_camera_mask=True)
    metrics.update(PRED, TARGET, mask)
    result = metrics.compute()
    assert result['miou_per_frame'] == pytest.approx([(50 + 200 / 3 + 0) / 3, 0])   # the bus no longer counts
    assert result['iou_per_frame'] == pytest.approx([80, 0])
    assert result['class_iou']['bus'] is None


def test_frames_are_counted_separately_and_batches_accumulate():
    metrics = OccupancyMetrics(2)
    metrics.update(PRED, TARGET)
    swapped = OccupancyMetrics(2)
    swapped.update(PRED.flip(1), TARGET.flip(1))
    assert swapped.compute()['miou_per_frame'] == metrics.compute()['miou_per_frame'][::-1]
    # two updates add up to one update with both clips in the batch
    twice = OccupancyMetrics(2)
    twice.update(PRED, TARGET)
    twice.update(PRED.flip(1), TARGET.flip(1))
    batched = OccupancyMetrics(2)
    batched.update(torch.cat([PRED, PRED.flip(1)]), torch.cat([TARGET, TARGET.flip(1)]))
    assert twice.compute() == batched.compute()
    assert torch.equal(twice.true_positive, batched.true_positive)
    # pooling the frames would give car tp 1, fp 1, fn 1 in both frames; per frame they stay apart
    assert twice.true_positive[:, CAR].tolist() == [1, 1]


def test_frame_with_nothing_present():
    empty = clip([[F] * 8, [CAR] * 8])
    metrics = OccupancyMetrics(2)
    metrics.update(empty, empty)
    result = metrics.compute()
    assert result['miou_per_frame'] == [None, 100] and result['iou_per_frame'] == [None, 100]
    assert result['miou'] == 100 and result['iou'] == 100            # the empty frame is left out of the mean
    upstream = OccupancyMetrics(2, mode='upstream')
    upstream.update(empty, empty)
    assert upstream.compute()['miou_per_frame'] == [100, 100]
    nothing = OccupancyMetrics(1)
    nothing.update(empty[:, :1], empty[:, :1])
    assert nothing.compute()['miou'] is None


def test_reset_and_all_reduce_without_process_group():
    metrics = OccupancyMetrics(2)
    metrics.update(PRED, TARGET)
    before = metrics.compute()
    metrics.all_reduce()                      # single process: nothing to reduce, and no crash
    assert metrics.compute() == before
    metrics.reset()
    assert metrics.true_positive.sum() == 0 and metrics.compute()['miou'] is None


def reference(pred, target, mask, mode):
    """Per-frame mIoU and IoU by explicit loops over frames and classes (numpy)."""
    mious, ious = [], []
    for t in range(pred.shape[1]):
        p, g = pred[:, t][mask[:, t]], target[:, t][mask[:, t]]
        scores = []
        for c in SEMANTIC_CLASSES:
            tp, fp, fn = np.sum((p == c) & (g == c)), np.sum((p == c) & (g != c)), np.sum((p != c) & (g == c))
            if mode == 'upstream' and tp + fn == 0:
                scores.append(100.0)
            elif tp + fp + fn > 0:
                scores.append(100.0 * tp / (tp + fp + fn))
        mious.append(np.mean(scores))
        po, go = p != FREE_CLASS, g != FREE_CLASS
        ious.append(100.0 * np.sum(po & go) / np.sum(po | go))
    return mious, ious


@pytest.mark.parametrize('mode', ['exclude_absent', 'upstream'])
def test_matches_numpy_reference_on_random_data(mode):
    rng = np.random.default_rng(0)
    shape = (2, 3, 6, 5, 4)
    # a skewed class distribution leaves some classes absent from some frames
    probs = rng.dirichlet(np.full(NUM_CLASSES, 0.3))
    target = rng.choice(NUM_CLASSES, shape, p=probs)
    pred = np.where(rng.random(shape) < 0.6, target, rng.choice(NUM_CLASSES, shape, p=probs))
    mask = rng.random(shape) < 0.8
    metrics = OccupancyMetrics(3, mode=mode, use_camera_mask=True)
    for b in range(2):
        metrics.update(torch.from_numpy(pred[b:b + 1]), torch.from_numpy(target[b:b + 1]).to(torch.uint8),
                       torch.from_numpy(mask[b:b + 1]).to(torch.uint8))
    result = metrics.compute()
    mious, ious = reference(pred, target, mask, mode)
    assert result['miou_per_frame'] == pytest.approx(mious)
    assert result['iou_per_frame'] == pytest.approx(ious)
    assert result['miou'] == pytest.approx(np.mean(mious))


def test_bad_input_is_named():
    metrics = OccupancyMetrics(2)
    with pytest.raises(ValueError, match='pred shape .* differs from target'):
        metrics.update(PRED, TARGET[..., :1])
    with pytest.raises(ValueError, match=r'target must have shape \(B, T=2, X, Y, Z\), got \(1, 1, 2, 2, 2\)'):
        metrics.update(PRED, TARGET[:, :1])
    with pytest.raises(ValueError, match='pred must hold integer class ids'):
        metrics.update(PRED.float(), TARGET)
    with pytest.raises(ValueError, match='target holds class ids 0..18'):
        metrics.update(PRED, TARGET.clone().fill_(NUM_CLASSES).index_fill_(1, torch.tensor([0]), 0))
    with pytest.raises(ValueError, match='use_camera_mask=False'):
        metrics.update(PRED, TARGET, torch.ones_like(TARGET))
    with pytest.raises(ValueError, match='mask is required'):
        OccupancyMetrics(2, use_camera_mask=True).update(PRED, TARGET)
    with pytest.raises(ValueError, match='mask shape'):
        OccupancyMetrics(2, use_camera_mask=True).update(PRED, TARGET, torch.ones(1, 2, 2, 2, 1))
    with pytest.raises(ValueError, match="mode must be one of"):
        OccupancyMetrics(2, mode='absent_is_one')


def _reduce_worker(rank, init_file, out_dir):
    """One of two processes: each sees one clip of the batch, then the counters are all-reduced."""
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    metrics = OccupancyMetrics(2)
    batch_pred, batch_target = torch.cat([PRED, PRED.flip(1)]), torch.cat([TARGET, TARGET.flip(1)])
    metrics.update(batch_pred[rank:rank + 1], batch_target[rank:rank + 1])
    metrics.all_reduce()
    with open(f'{out_dir}/rank{rank}.json', 'w') as f:
        json.dump({'result': metrics.compute(), 'true_positive': metrics.true_positive.tolist()}, f)
    dist.destroy_process_group()


def test_all_reduce_over_two_processes_equals_one_process_seeing_everything(tmp_path):
    mp.spawn(_reduce_worker, args=(str(tmp_path / 'init'), str(tmp_path)), nprocs=2, join=True)
    single = OccupancyMetrics(2)
    single.update(torch.cat([PRED, PRED.flip(1)]), torch.cat([TARGET, TARGET.flip(1)]))
    expected = json.loads(json.dumps(single.compute()))
    for rank in range(2):
        with open(tmp_path / f'rank{rank}.json') as f:
            reduced = json.load(f)
        assert reduced['result'] == expected
        assert reduced['true_positive'] == single.true_positive.tolist()
