import numpy as np
import pytest

from genmask_jax.eval.metrics import MetricsAccumulator, segmentation_metrics


def _box(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_known_answers():
    gt1, pred1 = _box(4, 4, 0, 2, 0, 2), _box(4, 4, 0, 2, 0, 4)  # I=4, U=8 -> 0.5
    gt2, pred2 = _box(4, 4, 0, 4, 0, 4), _box(4, 4, 0, 4, 0, 4)  # I=U=16 -> 1.0
    out = segmentation_metrics([pred1, pred2], [gt1, gt2])
    # 1e-5 in the per-sample denominator (LISA) moves values by < 1e-5 / 8.
    assert out["giou"] == pytest.approx(0.75, abs=1e-6)
    assert out["ciou"] == pytest.approx(20 / 24, abs=1e-9)
    assert out["miou"] == out["giou"] and out["oiou"] == out["ciou"]
    assert out["precision@0.5"] == 1.0  # >= convention: IoU of exactly 0.5 counts
    assert out["precision@0.6"] == 0.5 and out["precision@0.9"] == 0.5


def test_empty_prediction_on_empty_target_counts_one():
    empty = np.zeros((3, 5), bool)
    out = segmentation_metrics([empty, empty], [empty, _box(3, 5, 0, 1, 0, 1)])
    assert out["giou"] == pytest.approx(0.5)
    assert out["ciou"] == pytest.approx(0.0)


def test_ignore_region_excluded():
    gt = _box(4, 4, 0, 2, 0, 2)
    pred = _box(4, 4, 0, 2, 0, 4)
    ignore = _box(4, 4, 0, 4, 2, 4)  # the wrong half of the prediction is ignored
    out = segmentation_metrics([pred], [gt], [ignore])
    assert out["giou"] == pytest.approx(1.0, abs=1e-5)


def test_sizes_may_differ_between_samples_and_accumulator_matches():
    rng = np.random.default_rng(0)
    preds = [rng.random((5, 7)) > 0.5, rng.random((9, 3)) > 0.5]
    gts = [rng.random((5, 7)) > 0.5, rng.random((9, 3)) > 0.5]
    acc = MetricsAccumulator()
    for p, g in zip(preds, gts):
        acc.add(p, g)
    assert acc.result() == segmentation_metrics(preds, gts)


def test_bad_input():
    with pytest.raises(ValueError, match="differ in size"):
        segmentation_metrics([np.zeros((2, 2), bool)], [np.zeros((2, 3), bool)])
    with pytest.raises(ValueError, match="predictions for"):
        segmentation_metrics([], [np.zeros((2, 2), bool)])
    with pytest.raises(ValueError, match="no samples"):
        segmentation_metrics([], [])
