"""Segmentation metrics, computed per image at the mask's native resolution.

Conventions (tested in tests/training/test_metrics.py):
* A prediction is ``sigmoid(logit) > threshold`` (0.5 by default), i.e. ``logit > logit(threshold)``.
* Empty ground truth and empty prediction: Dice = IoU = precision = recall = 1 (a correct "no polyp").
* Empty ground truth, non-empty prediction: Dice = IoU = precision = 0, recall = 1 (nothing to miss).
* Non-empty ground truth, empty prediction: Dice = IoU = recall = 0, precision = 1 (no false positive).
* Dataset figures are means over images, plus F1 from precision and recall pooled over all pixels of
  the split. The paper's mean Dice and mIoU are per-image means too; its code
  (ivezakis/effisegnet, ``network_module.py``) pools precision and recall over all pixels instead, so
  compare this module's per-image mean precision/recall with the paper's only after pooling (the
  shipped model: per-image means 0.9700 / 0.9119, pooled 0.9771 / 0.9021 on test). Kvasir-SEG has no
  empty masks, so the empty-mask conventions above do not touch its figures.
"""
from __future__ import annotations

import numpy as np

PER_IMAGE_KEYS = ("dice", "iou", "precision", "recall")


def confusion(pred: np.ndarray, target: np.ndarray) -> tuple[int, int, int]:
    pred = pred.astype(bool)
    target = target.astype(bool)
    tp = int(np.count_nonzero(pred & target))
    fp = int(np.count_nonzero(pred & ~target))
    fn = int(np.count_nonzero(~pred & target))
    return tp, fp, fn


def scores_from_counts(tp: int, fp: int, fn: int) -> dict[str, float]:
    def ratio(num, den, empty):
        return float(num) / den if den else empty
    return {
        "dice": ratio(2 * tp, 2 * tp + fp + fn, 1.0),
        "iou": ratio(tp, tp + fp + fn, 1.0),
        "precision": ratio(tp, tp + fp, 1.0),
        "recall": ratio(tp, tp + fn, 1.0),
    }


def image_scores(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    tp, fp, fn = confusion(pred, target)
    out = scores_from_counts(tp, fp, fn)
    out.update(tp=tp, fp=fp, fn=fn)
    return out


def summarize(rows: list[dict]) -> dict[str, float]:
    """Means over images plus pooled precision/recall/F1."""
    if not rows:
        raise ValueError("no images to summarise")
    out = {f"mean_{k}": float(np.mean([r[k] for r in rows])) for k in PER_IMAGE_KEYS}
    tp = sum(r["tp"] for r in rows)
    fp = sum(r["fp"] for r in rows)
    fn = sum(r["fn"] for r in rows)
    pooled = scores_from_counts(tp, fp, fn)
    out["pooled_precision"] = pooled["precision"]
    out["pooled_recall"] = pooled["recall"]
    p, r = pooled["precision"], pooled["recall"]
    out["f1_pooled"] = 2 * p * r / (p + r) if (p + r) else 0.0
    out["n_images"] = len(rows)
    return out
