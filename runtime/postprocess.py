"""Host-side numerics shared by every backend: resizing into the model's input, filling a host
buffer, resizing outputs back to each image's size, thresholding, and per-mask statistics.

All of it is numpy + PIL so the runtime needs neither torch nor scipy. The conventions are
training's (``effiseg.training.data.resize_rgb`` and ``effiseg.training.evaluate``):
* image -> model input: PIL bilinear resize of the uint8 RGB image;
* model output -> image size: bilinear with half-pixel centres and no antialiasing, i.e.
  ``F.interpolate(mode="bilinear", align_corners=False)``, applied to logits (or probabilities),
  and *then* the threshold; logits are cut at ``log(t / (1 - t))``, which equals
  ``sigmoid(logit) > t``;
* mask outputs (already thresholded in the graph) are resized with nearest neighbour.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

from .model_info import ModelInfo


def resize_rgb(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (height, width, 3) uint8 with PIL's bilinear filter (as training)."""
    if rgb.shape[:2] == (height, width):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((width, height), Image.BILINEAR))


def fill_host_row(row: np.ndarray, rgb: np.ndarray, info: ModelInfo) -> None:
    """Write one model-sized RGB image into one row of a backend's host buffer.

    uint8-nhwc models take the bytes as they are (the graph normalises); float32-nchw models get
    exactly the graph's arithmetic done here: ``(x / 255 - mean) / std``, channels first.
    """
    if info.input_format == "uint8-nhwc":
        row[...] = rgb
        return
    x = rgb.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)
    mean = np.asarray(info.mean, np.float32).reshape(3, 1, 1)
    std = np.asarray(info.std, np.float32).reshape(3, 1, 1)
    row[...] = (x - mean) / std


def _bilinear_axis(n_in: int, n_out: int):
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    src = np.maximum(src, 0.0)
    i0 = np.minimum(src.astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0).astype(np.float32)


def resize_bilinear(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """(h, w) float -> (height, width) float32; F.interpolate(bilinear, align_corners=False)."""
    values = np.asarray(values, dtype=np.float32)
    h, w = values.shape
    if (h, w) == (height, width):
        return values
    r0, r1, rl = _bilinear_axis(h, height)
    c0, c1, cl = _bilinear_axis(w, width)
    # Columns first on the small map, then rows: the large (height, width) array is touched by
    # as few full passes as possible.
    cols = values[:, c0] * (1.0 - cl) + values[:, c1] * cl
    out = cols[r0]
    out *= (1.0 - rl)[:, None]
    lower = cols[r1]
    lower *= rl[:, None]
    out += lower
    return out


def resize_nearest(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest neighbour with half-pixel centres (torch's ``nearest-exact``)."""
    h, w = values.shape
    if (h, w) == (height, width):
        return values
    rows = np.minimum(((np.arange(height) + 0.5) * (h / height)).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * (w / width)).astype(np.int64), w - 1)
    return values[rows[:, None], cols[None, :]]


def logit_threshold(threshold: float) -> float:
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    return math.log(threshold / (1.0 - threshold))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def output_to_mask(output: np.ndarray, output_format: str, threshold: float, height: int,
                   width: int) -> tuple[np.ndarray, float | None]:
    """One model output map -> (bool mask at (height, width), maximum probability or None).

    The maximum probability is taken at the model's resolution (bilinear resizing cannot exceed
    it); mask outputs carry no probability.
    """
    if output_format == "logits":
        mask = resize_bilinear(output, height, width) > logit_threshold(threshold)
        return mask, sigmoid(float(output.max()))
    if output_format == "probabilities":
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        probs = output.astype(np.float32, copy=False)
        return resize_bilinear(probs, height, width) > threshold, float(probs.max())
    if output_format == "mask":
        return resize_nearest(output, height, width).astype(bool), None
    raise ValueError(f"unknown output format {output_format!r}")


def output_to_probabilities(output: np.ndarray, output_format: str, height: int, width: int) -> np.ndarray:
    """Probabilities (float32) at (height, width): sigmoid of the resized logits, or the resized
    probabilities of a probability-output model."""
    if output_format == "logits":
        return 1.0 / (1.0 + np.exp(-resize_bilinear(output, height, width)))
    if output_format == "probabilities":
        return resize_bilinear(output.astype(np.float32, copy=False), height, width)
    raise ValueError("a mask-output model has no probabilities; export with --output-format logits")


try:  # optional: never a dependency of the runtime
    from scipy.ndimage import label as _ndimage_label
    _EIGHT = np.ones((3, 3), dtype=bool)
except ImportError:  # pragma: no cover - depends on the install
    _ndimage_label = None


def count_regions(mask: np.ndarray) -> int:
    """Number of 8-connected foreground regions of a 2-D boolean mask.

    Runs of foreground pixels are found per row with numpy; runs in consecutive rows that touch
    (overlap or meet diagonally) are joined with a union-find. Work grows with the number of runs,
    not pixels, so smooth segmentation masks cost little at any resolution.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError("count_regions takes a 2-D mask")
    h, w = mask.shape
    if not mask.any():
        return 0
    if _ndimage_label is not None:
        # Compiled labelling when SciPy happens to be installed (it is not required): the union-find
        # below runs a Python loop under the GIL, the largest host cost per image in the pipeline
        # (benchmarks/RESULTS.md, "Host-side cost of the pipeline").
        return int(_ndimage_label(mask, structure=_EIGHT)[1])
    padded = np.zeros((h, w + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    change = np.diff(padded, axis=1)            # +1 where a run starts, -1 one past its end
    start_rows, starts = np.nonzero(change == 1)
    end_rows, ends = np.nonzero(change == -1)   # same order: row-major, runs never interleave
    n_runs = len(starts)
    stride = w + 2
    start_keys = start_rows * stride + starts
    end_keys = end_rows * stride + ends         # ends are exclusive
    # Run b (row r+1, [s_b, e_b)) touches run a (row r, [s_a, e_a)) with 8-connectivity when
    # s_a <= e_b and e_a >= s_b. Runs of a row are sorted and disjoint, so the runs of row r that
    # touch b form one contiguous range [lo, hi) of the global run order.
    prev = start_rows - 1
    lo = np.searchsorted(end_keys, prev * stride + starts, side="left")
    hi = np.searchsorted(start_keys, prev * stride + ends, side="right")
    lo = np.maximum(lo, np.searchsorted(start_rows, prev, side="left"))
    hi = np.minimum(hi, np.searchsorted(start_rows, prev, side="right"))
    counts = np.maximum(hi - lo, 0)
    if not counts.any():
        return n_runs
    b = np.repeat(np.arange(n_runs), counts)
    a = np.repeat(lo, counts) + (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts))
    parent = list(range(n_runs))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    regions = n_runs
    for x, y in zip(a.tolist(), b.tolist()):
        rx, ry = find(x), find(y)
        if rx != ry:
            parent[rx] = ry
            regions -= 1
    return regions
