"""Referring-segmentation metrics under LISA's protocol (its evaluation code, which GenMask's table follows).

Per expression, intersection I and union U are counted over pixels not marked ignore, at the
image's original size. Then
  gIoU = mean_i I_i / (U_i + 1e-5), an empty prediction on an empty target counting 1 (as LISA);
  cIoU = oIoU = sum_i I_i / (sum_i U_i + 1e-10);
  mIoU = gIoU (the name RefCOCO tables use for the per-expression mean);
  precision@k = fraction of expressions with I / U >= k (the LAVT/ReLA convention, not CRIS's >).
"""

from collections.abc import Iterable, Sequence

import numpy as np

PRECISION_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def intersection_and_union(pred: np.ndarray, gt: np.ndarray,
                           ignore: np.ndarray | None = None) -> tuple[int, int]:
    """Pixel counts for one `(H, W)` pair of boolean masks, ignore pixels excluded."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and target {gt.shape} differ in size")
    keep = np.ones_like(gt) if ignore is None else ~np.asarray(ignore, bool)
    inter = np.count_nonzero(pred & gt & keep)
    union = np.count_nonzero((pred | gt) & keep)
    return inter, union


def per_sample_iou(intersections: np.ndarray, unions: np.ndarray) -> np.ndarray:
    """I / (U + 1e-5), with U = 0 (empty prediction on an empty target) counting 1."""
    intersections = np.asarray(intersections, np.float64)
    unions = np.asarray(unions, np.float64)
    return np.where(unions == 0, 1.0, intersections / (unions + 1e-5))


def metrics_from_counts(intersections: Sequence[int], unions: Sequence[int]) -> dict[str, float]:
    """All metrics from per-sample intersection and union counts."""
    inter = np.asarray(intersections, np.float64)
    union = np.asarray(unions, np.float64)
    if inter.size == 0:
        raise ValueError("no samples to evaluate")
    iou = per_sample_iou(inter, union)
    out = {
        "giou": float(iou.mean()),
        "ciou": float(inter.sum() / (union.sum() + 1e-10)),
        "num_samples": int(inter.size),
    }
    out["miou"] = out["giou"]
    out["oiou"] = out["ciou"]
    # Thresholds compare the exact ratio: with LISA's epsilon an IoU of exactly k would fall below k.
    exact = np.where(union == 0, 1.0, inter / np.maximum(union, 1))
    for k in PRECISION_THRESHOLDS:
        out[f"precision@{k}"] = float(np.mean(exact >= k))
    return out


def segmentation_metrics(pred_masks: Iterable[np.ndarray], gt_masks: Iterable[np.ndarray],
                         ignore_masks: Iterable[np.ndarray | None] | None = None) -> dict[str, float]:
    """gIoU, cIoU (= oIoU), mIoU (= gIoU) and precision@0.5..0.9 over lists of `(H, W)` bool masks.

    Masks of one sample must share a size; samples may differ (each at its image's original size).
    """
    pred_masks, gt_masks = list(pred_masks), list(gt_masks)
    if len(pred_masks) != len(gt_masks):
        raise ValueError(f"{len(pred_masks)} predictions for {len(gt_masks)} targets")
    ignores = [None] * len(gt_masks) if ignore_masks is None else list(ignore_masks)
    if len(ignores) != len(gt_masks):
        raise ValueError(f"{len(ignores)} ignore masks for {len(gt_masks)} targets")
    counts = [intersection_and_union(p, g, i) for p, g, i in zip(pred_masks, gt_masks, ignores)]
    inter, union = zip(*counts) if counts else ((), ())
    return metrics_from_counts(inter, union)


class MetricsAccumulator:
    """Streams per-sample counts so an evaluation never holds every mask at once."""

    def __init__(self):
        self.intersections: list[int] = []
        self.unions: list[int] = []

    def add(self, pred: np.ndarray, gt: np.ndarray, ignore: np.ndarray | None = None) -> float:
        """Adds one sample; returns its IoU."""
        inter, union = intersection_and_union(pred, gt, ignore)
        self.intersections.append(inter)
        self.unions.append(union)
        return float(per_sample_iou(np.array([inter]), np.array([union]))[0])

    def result(self) -> dict[str, float]:
        return metrics_from_counts(self.intersections, self.unions)
