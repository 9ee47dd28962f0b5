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
from dataclasses import dataclass

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


_DECIDE_BY_CELLS_ABOVE = 3  # output pixels per map value above which resize_and_cut decides by cells
_MOST_UNDECIDED = 0.03  # share of undecided cells above which it interpolates every pixel instead


def resize_and_cut(values: np.ndarray, height: int, width: int, cut: float) -> np.ndarray:
    """``resize_bilinear(values, height, width) > cut`` as a bool mask, the same pixel for pixel,
    without interpolating every pixel.

    Why: upscaling a 352 x 352 map to a 1920 x 1080 image and cutting it cost about 26 ms per
    image on the 2-core EPYC, more than all the rest of the host's work on it
    (benchmarks/results/host-pipeline-2026-12-08/mask_upscale.json). Each output pixel is
    a weighted mean of the 2 x 2 source values around it, so where all four lie clearly above (or
    clearly below) the cut, so does the pixel: those cells are decided at the map's resolution and
    spread to the image by an index lookup of one byte per pixel. Only pixels of cells that straddle
    the cut (the mask's outline, a small fraction) are interpolated, with the very arithmetic of
    :func:`resize_bilinear`. "Clearly" leaves a margin of 1e-5 of the map's largest magnitude, far
    above the few float32 roundings the interpolation makes, so rounding can never flip a decided
    cell; a map with NaN or infinite values decides nothing early.
    """
    values = np.asarray(values, dtype=np.float32)
    h, w = values.shape
    if height * width <= _DECIDE_BY_CELLS_ABOVE * h * w:  # a small image: interpolating all is cheaper
        return resize_bilinear(values, height, width) > cut
    r0, r1, rl = _bilinear_axis(h, height)
    c0, c1, cl = _bilinear_axis(w, width)
    # "Clearly" above or below: by more than 1e-5 of the map's largest magnitude, so that rounding in
    # the interpolation (a few float32 ulps of the values) cannot cross the cut. Bool maps only: few
    # and small temporaries (float ones cost more in page faults than they save).
    with np.errstate(invalid="ignore", over="ignore"):
        margin = float(np.float32(1e-5) * np.abs(values).max())  # NaN/inf: nothing is decided early
        above = np.pad(values > cut + margin, ((0, 1), (0, 1)), mode="edge")
        below = np.pad(values <= cut - margin, ((0, 1), (0, 1)), mode="edge")
    # The 2 x 2 neighbourhood of source cell (i, j) is rows i, min(i+1, h-1) and the same for columns:
    # the last row and column repeated (the edge padding), as _bilinear_axis clamps them.
    inside = above[:-1, :-1] & above[1:, :-1] & above[:-1, 1:] & above[1:, 1:]
    outside = below[:-1, :-1] & below[1:, :-1] & below[:-1, 1:] & below[1:, 1:]
    undecided_i, undecided_j = np.nonzero(~(inside | outside))
    if len(undecided_i) > _MOST_UNDECIDED * h * w:
        # Outlines everywhere (noise, not a polyp): gathering pixel by pixel would cost more than
        # interpolating them all (lab/mask_upscale.py, random_blobs).
        return resize_bilinear(values, height, width) > cut
    # Decided cells spread to the image: each output pixel's cell is (r0[y], c0[x]); columns first on
    # the small map, then whole rows are copied.
    mask = inside.take(c0, axis=1).take(r0, axis=0)
    if len(undecided_i):
        ys, xs = _pixels_of_cells(undecided_i, undecided_j, r0, c0, h, w)
        # resize_bilinear's operations, in its order, on the undecided pixels only.
        wc, wr = cl[xs], rl[ys]
        upper = values[r0[ys], c0[xs]] * (1.0 - wc) + values[r0[ys], c1[xs]] * wc
        lower = values[r1[ys], c0[xs]] * (1.0 - wc) + values[r1[ys], c1[xs]] * wc
        upper *= (1.0 - wr)
        lower *= wr
        upper += lower
        mask[ys, xs] = upper > cut
    return mask


def _pixels_of_cells(cell_i: np.ndarray, cell_j: np.ndarray, r0: np.ndarray, c0: np.ndarray, h: int,
                     w: int) -> tuple[np.ndarray, np.ndarray]:
    """The output pixels (rows, columns) whose source cell is one of (cell_i, cell_j). r0 and c0 never
    decrease, so each cell's pixels are a block: rows where r0 == i times columns where c0 == j."""
    rows_per = np.bincount(r0, minlength=h)
    cols_per = np.bincount(c0, minlength=w)
    first_row = np.cumsum(rows_per) - rows_per
    first_col = np.cumsum(cols_per) - cols_per
    n_rows, n_cols = rows_per[cell_i], cols_per[cell_j]
    sizes = n_rows * n_cols
    cell = np.repeat(np.arange(len(cell_i)), sizes)
    local = np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    width_of = n_cols[cell]
    ys = first_row[cell_i][cell] + local // width_of
    xs = first_col[cell_j][cell] + local % width_of
    return ys, xs


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


@dataclass(frozen=True)
class CutOutput:
    """A model output already cut into its mask where the image has the model's output size
    (:func:`cut_batch`), with the maximum probability."""
    mask: np.ndarray
    max_probability: float | None


def cut_batch(outputs: np.ndarray, output_format: str, threshold: float, sizes: list) -> list:
    """What the device runner copies out of a slot for each row of a batch (``sizes``: each image's
    (height, width), or None for a row with no image): a :class:`CutOutput` for every image that has
    the model's output size, cut for the whole batch in one comparison and copied out as bool (a
    quarter of the float map's bytes), else a copy of the row's map for :func:`output_to_mask` to
    resize and cut in a writer thread. The masks are those :func:`output_to_mask` gives."""
    n = len(sizes)
    outputs = outputs[:n]
    same = [size is not None and tuple(size) == outputs.shape[1:3] for size in sizes]
    rows: list = [None] * n
    if output_format in ("logits", "probabilities") and any(same):
        probabilities = output_format == "probabilities"
        if probabilities and not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        values = outputs.astype(np.float32, copy=False)
        masks = values > (threshold if probabilities else logit_threshold(threshold))
        maxima = values.reshape(n, -1).max(axis=1)
        for i in np.flatnonzero(same):
            top = float(maxima[i])
            rows[i] = CutOutput(masks[i], top if probabilities else sigmoid(top))
    for i, row in enumerate(rows):
        if row is None:
            rows[i] = np.array(outputs[i], copy=True)
    return rows


def output_to_mask(output, output_format: str, threshold: float, height: int,
                   width: int) -> tuple[np.ndarray, float | None]:
    """One model output map (or a :class:`CutOutput`) -> (bool mask at (height, width), maximum
    probability or None).

    The maximum probability is taken at the model's resolution (bilinear resizing cannot exceed
    it); mask outputs carry no probability.
    """
    if isinstance(output, CutOutput):
        return output.mask, output.max_probability
    if output_format == "logits":
        mask = resize_and_cut(output, height, width, logit_threshold(threshold))
        return mask, sigmoid(float(output.max()))
    if output_format == "probabilities":
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        probs = output.astype(np.float32, copy=False)
        return resize_and_cut(probs, height, width, threshold), float(probs.max())
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


def count_regions(mask: np.ndarray) -> int:
    """Number of 8-connected foreground regions of a 2-D boolean mask (:func:`count_regions_numpy`).

    The writer threads call this once per image. SciPy's compiled labelling (which releases the GIL)
    was used where SciPy happened to be installed; measured side by side on the 2-core EPYC, the
    numpy path is faster on one thread and on two (Kvasir-SEG test masks: 3753 against 1662
    masks/s on one thread, 4385 against 2424 on two; blob masks 1426/977 and 1562/1478), so it is
    the only path now (benchmarks/results/host-pipeline-2026-12-08/region_count.json).
    """
    return count_regions_numpy(mask)


def count_regions_numpy(mask: np.ndarray) -> int:
    """:func:`count_regions` with numpy only.

    Runs of foreground pixels are found per row; runs in consecutive rows that touch (overlap or
    meet diagonally) are edges of a graph whose connected components are the regions. The
    components are found with array operations only (a forest of first contacts, then min-label
    hooking and pointer jumping over the remaining edges; the roots left two rounds on are at most
    those hooked in between, so the rounds grow with the log of the runs), so no Python loop runs
    per run or pixel. Same counts as the all-edges hooking it replaced and as SciPy's labelling
    (3,000 random and blob masks, 400 Kvasir-SEG masks), 1.3-1.4x faster
    (benchmarks/results/host-pipeline-2026-12-08/round2/region_count_forest.json).
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError("count_regions takes a 2-D mask")
    h, w = mask.shape
    stride = w + 2  # a background pixel on both sides: runs never continue into the next row
    padded = np.zeros((h, stride), dtype=bool)
    padded[:, 1:-1] = mask
    flat = padded.ravel()
    flips = np.flatnonzero(flat[1:] != flat[:-1]) + 1  # run starts and run ends, alternating
    if len(flips) == 0:
        return 0
    start_keys, end_keys = flips[0::2], flips[1::2]  # flat positions; ends are exclusive
    n_runs = len(start_keys)
    rows = start_keys // stride
    # Run b (row r, [s_b, e_b)) touches run a (row r-1, [s_a, e_a)) with 8-connectivity when
    # e_a >= s_b and s_a <= e_b. In flat positions those runs form one contiguous range [lo, hi)
    # of the run order, and the padding keeps the range inside row r-1: a run of row r-2 ends
    # before (r-1) * stride + 1 and a run of row r starts after (r-1) * stride + w + 1.
    row_above = (rows - 1) * stride
    lo = np.searchsorted(end_keys, row_above + (start_keys - rows * stride), side="left")
    hi = np.searchsorted(start_keys, row_above + (end_keys - rows * stride), side="right")
    counts = np.maximum(hi - lo, 0)
    # First a forest: each run that touches the row above points to the first run it touches there
    # (an earlier run, so no cycles), and pointer jumping takes every run to its tree's root in
    # log2(rows) steps (a path climbs one row per step). Only the other edges, where a run touches
    # several runs above (blobs joining), can merge trees; they are few, so the rounds below see few
    # edges. Each numpy call on a long array hands the GIL over, which the writer threads pay per
    # mask: this takes a fixed dozen calls where hooking every edge took several per round.
    touches = counts > 0
    extra = counts - touches  # edges besides the forest's own, per run
    n_edges = int(extra.sum())
    if n_edges == 0:  # the forest is the whole graph: one region per root (most masks end here)
        return int(n_runs - np.count_nonzero(touches))
    runs = np.arange(n_runs)
    labels = np.where(touches, lo, runs)
    for _ in range(int(rows[-1] - rows[0]).bit_length()):
        labels = labels[labels]
    b = np.repeat(runs, extra)
    a = np.repeat(lo + 1 - (np.cumsum(extra) - extra), extra) + np.arange(n_edges)
    # labels[i]: the run i points to; a run pointing to itself is a root (every label is one now).
    # Every round hooks each root that has an edge to another root onto the smallest such root, then
    # compresses every path to its root, so that between rounds all labels are roots.
    while True:
        la, lb = labels[a], labels[b]
        differ = la != lb
        if not differ.any():
            break
        la, lb = la[differ], lb[differ]
        np.minimum.at(labels, np.maximum(la, lb), np.minimum(la, lb))
        while True:
            jumped = labels[labels]
            if np.array_equal(jumped, labels):
                break
            labels = jumped
    return int(np.count_nonzero(labels == runs))
