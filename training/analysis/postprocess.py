"""Candidate post-processing fixes, as pure functions of masks and probabilities.

Each takes and returns (H, W) arrays and touches nothing else, so the improvement protocol can
evaluate it on validation, pick its setting there, and apply it once to the test split.
Dice follows ``effiseg.training.metrics`` (empty prediction on empty truth scores 1).
A pixel is foreground when its probability is strictly above the threshold, as in metrics.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from ..metrics import scores_from_counts

_EIGHT = np.ones((3, 3), dtype=bool)

# The default threshold grid: 0.05, 0.10, ..., 0.95.
DEFAULT_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))


def remove_small_regions(mask: np.ndarray, min_pixels: int) -> np.ndarray:
    """Drop 8-connected foreground regions smaller than ``min_pixels`` (a new bool array)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
    if min_pixels <= 1 or not mask.any():
        return mask.copy()
    labels, n = ndimage.label(mask, structure=_EIGHT)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_pixels
    keep[0] = False
    return keep[labels]


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill background regions fully enclosed by foreground (4-connected background, as scipy).

    Background touching the image border is never a hole.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
    return ndimage.binary_fill_holes(mask)


def keep_largest_region(mask: np.ndarray) -> np.ndarray:
    """Keep only the largest 8-connected foreground region (Kvasir images mostly hold one polyp)."""
    mask = np.asarray(mask, dtype=bool)
    labels, n = ndimage.label(mask, structure=_EIGHT)
    if n <= 1:
        return mask.copy()
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def binarize(prob: np.ndarray, threshold: float = 0.5, min_pixels: int = 0, holes: bool = False) -> np.ndarray:
    """Threshold, then optionally remove small regions and fill holes (in that order)."""
    pred = np.asarray(prob) > threshold
    if min_pixels > 1:
        pred = remove_small_regions(pred, min_pixels)
    if holes:
        pred = fill_holes(pred)
    return pred


def _check_pairs(probs: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> None:
    if len(probs) != len(masks):
        raise ValueError(f"{len(probs)} probability maps but {len(masks)} masks")
    if not probs:
        raise ValueError("no images to evaluate")
    for i, (p, m) in enumerate(zip(probs, masks)):
        if np.shape(p) != np.shape(m):
            raise ValueError(f"image {i}: probability map {np.shape(p)} and mask {np.shape(m)} differ in shape")


def dice_per_threshold(prob: np.ndarray, mask: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """Dice of ``prob > t`` against ``mask`` for every t (one image)."""
    prob = np.asarray(prob)
    if not np.issubdtype(prob.dtype, np.floating):
        prob = prob.astype(np.float32)
    prob = prob.ravel()
    mask = np.asarray(mask, dtype=bool).ravel()
    fg, bg = prob[mask], prob[~mask]
    # Sorted probabilities turn every threshold's pixel count into one binary search.
    fg.sort()
    bg.sort()
    t = np.asarray(thresholds, dtype=prob.dtype)  # compare in the map's precision, as `prob > t` does
    tp = fg.size - np.searchsorted(fg, t, side="right")
    fp = bg.size - np.searchsorted(bg, t, side="right")
    fn = fg.size - tp
    return np.array([scores_from_counts(int(a), int(b), int(c))["dice"] for a, b, c in zip(tp, fp, fn)])


def threshold_sweep(probs: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                    grid: Sequence[float] = DEFAULT_THRESHOLDS) -> list[dict]:
    """Mean per-image Dice (and its sd) at each threshold of ``grid``: ``[{threshold, mean_dice, std_dice}]``."""
    _check_pairs(probs, masks)
    grid = [float(t) for t in grid]
    if not grid:
        raise ValueError("empty threshold grid")
    dice = np.stack([dice_per_threshold(p, m, grid) for p, m in zip(probs, masks)])  # (images, thresholds)
    return [{"threshold": t, "mean_dice": float(dice[:, i].mean()), "std_dice": float(dice[:, i].std())}
            for i, t in enumerate(grid)]


def choose_threshold(val_probs: Sequence[np.ndarray], val_masks: Sequence[np.ndarray],
                     grid: Sequence[float] = DEFAULT_THRESHOLDS) -> float:
    """The threshold of ``grid`` with the best mean validation Dice.

    Ties (equal mean Dice) go to the threshold closest to 0.5, then to the lower one, so a flat
    curve keeps the conventional default.
    """
    sweep = threshold_sweep(val_probs, val_masks, grid)
    best = max(sweep, key=lambda r: (r["mean_dice"], -abs(r["threshold"] - 0.5), -r["threshold"]))
    return best["threshold"]


def choose_min_region(val_probs: Sequence[np.ndarray], val_masks: Sequence[np.ndarray], threshold: float = 0.5,
                      grid: Sequence[int] = (0, 50, 100, 200, 400, 800)) -> int:
    """The small-region size of ``grid`` with the best mean validation Dice (ties: the smallest)."""
    _check_pairs(val_probs, val_masks)
    best_score, best_size = -1.0, 0
    for size in sorted(int(s) for s in grid):
        dice = [scores_from_counts(*_counts(binarize(p, threshold, size), m))["dice"]
                for p, m in zip(val_probs, val_masks)]
        score = float(np.mean(dice))
        if score > best_score:
            best_score, best_size = score, size
    return best_size


def _counts(pred: np.ndarray, mask: np.ndarray) -> tuple[int, int, int]:
    mask = np.asarray(mask, dtype=bool)
    return (int(np.count_nonzero(pred & mask)), int(np.count_nonzero(pred & ~mask)),
            int(np.count_nonzero(~pred & mask)))
