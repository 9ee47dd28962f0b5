"""Failure analysis: per-image metrics and attributes, and what goes with the bad cases.

The core, :func:`analyze_predictions`, takes decoded samples and probability maps (any source: a
PyTorch model here or on a GPU machine, an exported engine, an ``.npz`` written earlier) and needs
only numpy/scipy. :func:`analyze_checkpoint` adds the model in front of it.

What is computed, for probability maps thresholded at ``prob > threshold``:

* per image: Dice/IoU/precision/recall (``effiseg.training.metrics`` conventions) and every
  attribute of :mod:`.attributes`;
* per attribute: mean Dice / recall / precision and counts per bucket. Buckets are fixed bins
  where a natural scale exists (polyp size, number of polyps, border distance, yes/no flags) and
  quartiles of the analysed images otherwise (edges reported, so they are data-dependent);
* the worst decile by Dice (at least one image) against the rest: the mean of each attribute in
  both groups, and the Spearman rank correlation of each attribute with Dice over all images;
* a threshold sweep: mean Dice for thresholds 0.05..0.95 on the *sweep* set, which should be the
  validation split (choosing a threshold on test would leak);
* calibration at pixel level: a reliability table of predicted-probability bins against observed
  foreground frequency, the expected calibration error
  ``ECE = sum_b (n_b / N) * |mean_prob_b - freq_b|`` and the Brier score.
"""
from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..metrics import image_scores, summarize
from . import attributes as attr
from .postprocess import DEFAULT_THRESHOLDS, threshold_sweep

METRIC_KEYS = ("dice", "iou", "precision", "recall", "tp", "fp", "fn")


@dataclass(frozen=True)
class AttributeSpec:
    """How an attribute is bucketed and described.

    ``kind`` is "input" for properties of the image and its ground truth (candidate causes) and
    "outcome" for descriptions of the errors themselves (consequences; shown, not causes).
    ``edges`` are fixed right-closed bin edges; ``None`` means quartiles; ``categories`` lists
    discrete values (the last one collecting everything at or above it).
    """
    name: str
    label: str
    kind: str = "input"
    edges: tuple[float, ...] | None = None
    categories: tuple | None = None
    log_scale: bool = False


ATTRIBUTES: tuple[AttributeSpec, ...] = (
    AttributeSpec("area_fraction", "polyp area (fraction of image)",
                  edges=(0.0, 0.02, 0.05, 0.10, 0.20, 0.40, 1.0), log_scale=True),
    AttributeSpec("n_polyps", "number of polyps", categories=(0, 1, 2, 3)),
    AttributeSpec("border_distance", "polyp distance to image border (fraction of side)",
                  edges=(0.0, 0.0, 0.05, 0.15, 0.5)),
    AttributeSpec("touches_border", "polyp touches image border", categories=(False, True)),
    AttributeSpec("overlay_present", "scope overlay box present", categories=(False, True)),
    AttributeSpec("specular_fraction", "specular highlights (fraction of field of view)"),
    AttributeSpec("polyp_specular_fraction", "specular highlights inside the polyp"),
    AttributeSpec("luminance", "mean luminance of the field of view"),
    AttributeSpec("polyp_contrast", "polyp minus surrounding luminance"),
    AttributeSpec("blur_laplacian_var", "sharpness (variance of Laplacian)", log_scale=True),
    AttributeSpec("n_missed", "ground-truth polyps missed", kind="outcome", categories=(0, 1, 2)),
    AttributeSpec("n_fp_regions", "false-positive regions", kind="outcome", categories=(0, 1, 2)),
    AttributeSpec("boundary_error_fraction", "share of error pixels near the boundary", kind="outcome",
                  edges=(0.0, 0.25, 0.5, 0.75, 1.0)),
)


@dataclass
class CaseData:
    """One image kept for the report's case panels."""
    stem: str
    image: np.ndarray
    gt: np.ndarray
    prob: np.ndarray
    pred: np.ndarray
    row: dict


@dataclass
class AnalysisResult:
    threshold: float
    rows: list[dict]
    summary: dict
    detection: dict
    errors: dict
    buckets: dict
    worst: dict
    sweep: list[dict]
    sweep_source: str
    calibration: dict
    cases: list[CaseData] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Everything except the per-image rows and the case images, JSON-ready (NaN -> null)."""
        return _jsonable({
            "meta": self.meta, "threshold": self.threshold, "summary": self.summary,
            "detection": self.detection, "errors": self.errors, "buckets": self.buckets,
            "worst": self.worst, "threshold_sweep": {"source": self.sweep_source, "points": self.sweep},
            "calibration": self.calibration, "worst_case_stems": [c.stem for c in self.cases],
        })


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return None if not math.isfinite(float(obj)) else float(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


# ----------------------------------------------------------------------------------------------
# Buckets, worst cases, correlation
# ----------------------------------------------------------------------------------------------

def _values(rows: list[dict], name: str) -> np.ndarray:
    return np.array([float(r[name]) if r[name] is not None else np.nan for r in rows], dtype=np.float64)


def _fmt(x: float) -> str:
    """Three significant digits, no exponent for the ranges attributes take."""
    if x == 0:
        return "0"
    if abs(x) >= 1000:
        return f"{x:.0f}"
    return f"{x:.3g}"


def bucket_assignments(spec: AttributeSpec, rows: list[dict]) -> tuple[list[str], list[str], list | None]:
    """(bucket label per image, ordered labels, edges used or None).

    Fixed edges are right-closed: a value v goes to the first bin with v <= upper edge; a
    zero-width first bin ``(0, 0)`` holds exactly 0. NaN (e.g. no polyp) goes to "n/a".
    """
    vals = _values(rows, spec.name)
    if spec.categories is not None:
        cats = list(spec.categories)
        last = cats[-1]
        is_bool = isinstance(last, bool)
        labels = [str(c) if (is_bool or c != last or len(cats) == 1) else f">={c}" for c in cats]
        out = []
        for v in vals:
            if np.isnan(v):
                out.append("n/a")
                continue
            if is_bool:
                out.append(str(bool(v)))
            else:
                idx = next((i for i, c in enumerate(cats[:-1]) if v == c), None)
                out.append(labels[idx] if idx is not None else (labels[-1] if v >= last else str(v)))
        return out, labels + (["n/a"] if "n/a" in out else []), None
    finite = vals[np.isfinite(vals)]
    if spec.edges is not None:
        edges = list(spec.edges)
    elif finite.size:
        edges = [float(e) for e in np.quantile(finite, [0.0, 0.25, 0.5, 0.75, 1.0])]
        edges = [e for i, e in enumerate(edges) if i == 0 or e > edges[i - 1]]  # ties collapse bins
    else:
        edges = []
    labels = []
    for i in range(1, len(edges)):
        lo, hi = edges[i - 1], edges[i]
        if lo == hi:
            labels.append(f"= {_fmt(lo)}")
        elif i == 1:                                  # the first bin also holds its lower edge
            labels.append(f"[{_fmt(lo)}, {_fmt(hi)}]")
        else:
            labels.append(f"({_fmt(lo)}, {_fmt(hi)}]")
    if len(edges) == 1:                               # every value equal: one bin
        labels = [f"= {_fmt(edges[0])}"]
    out = []
    for v in vals:
        if not np.isfinite(v):
            out.append("n/a")
        elif len(edges) == 1:
            out.append(labels[0])
        else:
            # First bin whose upper edge is >= v; values beyond the last fixed edge join the last bin.
            idx = int(np.searchsorted(np.asarray(edges[1:]), v, side="left"))
            out.append(labels[min(idx, len(labels) - 1)])
    if "n/a" in out:
        labels.append("n/a")
    return out, labels, edges


def bucket_table(spec: AttributeSpec, rows: list[dict]) -> dict:
    """Mean Dice/recall/precision and counts per bucket of one attribute."""
    assigned, labels, edges = bucket_assignments(spec, rows)
    buckets = []
    for label in labels:
        members = [r for r, a in zip(rows, assigned) if a == label]
        if not members:
            buckets.append({"bucket": label, "n": 0, "mean_dice": None, "mean_recall": None,
                            "mean_precision": None, "missed_polyps": 0, "fp_regions": 0})
            continue
        buckets.append({
            "bucket": label, "n": len(members),
            "mean_dice": float(np.mean([r["dice"] for r in members])),
            "mean_recall": float(np.mean([r["recall"] for r in members])),
            "mean_precision": float(np.mean([r["precision"] for r in members])),
            "missed_polyps": int(sum(r["n_missed"] for r in members)),
            "fp_regions": int(sum(r["n_fp_regions"] for r in members)),
        })
    rule = "categories" if spec.categories is not None else ("fixed bins" if spec.edges is not None else "quartiles")
    return {"label": spec.label, "kind": spec.kind, "rule": rule, "edges": edges, "buckets": buckets}


def spearman(x: np.ndarray, y: np.ndarray) -> tuple[float, float, int]:
    """(rho, two-sided p, n) over finite pairs; NaN rho when fewer than 3 pairs or a constant."""
    from scipy.stats import spearmanr
    ok = np.isfinite(x) & np.isfinite(y)
    n = int(ok.sum())
    if n < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return float("nan"), float("nan"), n
    res = spearmanr(x[ok], y[ok])
    return float(res.statistic), float(res.pvalue), n


def worst_vs_rest(rows: list[dict], specs: Sequence[AttributeSpec] = ATTRIBUTES, fraction: float = 0.1) -> dict:
    """Attribute means in the worst ``fraction`` of images by Dice vs the rest, and Spearman with Dice.

    The worst group has ``max(1, ceil(fraction * n))`` images (lowest Dice; ties by stem). Rows are
    sorted input attributes first, then outcomes, each by |rho| (NaN last), so the attributes that
    go with failure come first.
    """
    n = len(rows)
    order = sorted(range(n), key=lambda i: (rows[i]["dice"], str(rows[i]["stem"])))
    n_worst = max(1, int(math.ceil(fraction * n)))
    worst_idx = set(order[:n_worst])
    is_worst = np.array([i in worst_idx for i in range(n)])
    dice = _values(rows, "dice")
    table = []
    for spec in specs:
        vals = _values(rows, spec.name)
        w, r = vals[is_worst], vals[~is_worst]
        rho, p, n_pairs = spearman(vals, dice)
        table.append({
            "attribute": spec.name, "label": spec.label, "kind": spec.kind,
            "mean_worst": float(np.nanmean(w)) if np.isfinite(w).any() else float("nan"),
            "mean_rest": float(np.nanmean(r)) if np.isfinite(r).any() else float("nan"),
            "spearman_rho": rho, "spearman_p": p, "n_pairs": n_pairs,
        })
    table.sort(key=lambda t: (t["kind"] != "input", not math.isfinite(t["spearman_rho"]),
                              -abs(t["spearman_rho"]) if math.isfinite(t["spearman_rho"]) else 0.0))
    return {"fraction": fraction, "n_worst": n_worst, "n_rest": n - n_worst,
            "dice_cutoff": float(dice[order[n_worst - 1]]) if n else float("nan"),
            "worst_stems": [rows[i]["stem"] for i in order[:n_worst]], "attributes": table}


# ----------------------------------------------------------------------------------------------
# Calibration
# ----------------------------------------------------------------------------------------------

class CalibrationAccumulator:
    """Pixel-level reliability statistics accumulated image by image (equal-width bins on [0, 1])."""

    def __init__(self, n_bins: int = 10):
        if n_bins < 1:
            raise ValueError(f"n_bins must be positive, got {n_bins}")
        self.n_bins = n_bins
        self.count = np.zeros(n_bins, dtype=np.int64)
        self.sum_prob = np.zeros(n_bins)
        self.sum_fg = np.zeros(n_bins)
        self.sum_sq_err = 0.0

    def add(self, prob: np.ndarray, mask: np.ndarray) -> None:
        p = np.clip(np.asarray(prob, dtype=np.float64).ravel(), 0.0, 1.0)
        y = np.asarray(mask, dtype=bool).ravel()
        idx = np.minimum((p * self.n_bins).astype(np.int64), self.n_bins - 1)
        self.count += np.bincount(idx, minlength=self.n_bins)
        self.sum_prob += np.bincount(idx, weights=p, minlength=self.n_bins)
        self.sum_fg += np.bincount(idx, weights=y.astype(np.float64), minlength=self.n_bins)
        self.sum_sq_err += float(np.sum((p - y) ** 2))

    def result(self) -> dict:
        total = int(self.count.sum())
        bins, ece = [], 0.0
        for b in range(self.n_bins):
            c = int(self.count[b])
            mean_p = self.sum_prob[b] / c if c else float("nan")
            freq = self.sum_fg[b] / c if c else float("nan")
            if c:
                ece += c / total * abs(mean_p - freq)
            bins.append({"low": b / self.n_bins, "high": (b + 1) / self.n_bins, "n_pixels": c,
                         "mean_predicted": float(mean_p), "observed_frequency": float(freq)})
        return {"n_bins": self.n_bins, "n_pixels": total, "ece": float(ece) if total else float("nan"),
                "brier": self.sum_sq_err / total if total else float("nan"), "bins": bins}


def calibration(probs: Sequence[np.ndarray], masks: Sequence[np.ndarray], n_bins: int = 10) -> dict:
    """Reliability table, ECE and Brier score over all pixels of all images."""
    acc = CalibrationAccumulator(n_bins)
    for p, m in zip(probs, masks):
        acc.add(p, m)
    return acc.result()


# ----------------------------------------------------------------------------------------------
# The analysis
# ----------------------------------------------------------------------------------------------

def _check_inputs(samples, probabilities) -> None:
    if len(samples) != len(probabilities):
        raise ValueError(f"{len(samples)} samples but {len(probabilities)} probability maps")
    if not samples:
        raise ValueError("no images to analyse")
    for s, p in zip(samples, probabilities):
        if np.shape(p) != s.mask.shape:
            raise ValueError(f"{s.image_path}: probability map {np.shape(p)} differs from mask {s.mask.shape}")


def analyze_predictions(samples, probabilities: Sequence[np.ndarray], threshold: float = 0.5, *,
                        sweep_probabilities: Sequence[np.ndarray] | None = None,
                        sweep_masks: Sequence[np.ndarray] | None = None,
                        sweep_source: str | None = None,
                        thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                        calibration_bins: int = 10,
                        boundary_band_px: float = attr.BOUNDARY_BAND_PX,
                        worst_fraction: float = 0.1,
                        n_worst_cases: int = 8,
                        meta: dict | None = None,
                        progress: Callable | None = None) -> AnalysisResult:
    """Analyse probability maps against samples (objects with ``stem``, ``image``, ``mask``).

    ``probabilities[i]`` is the foreground probability map of ``samples[i]`` at its native size.
    The threshold sweep runs on ``sweep_probabilities``/``sweep_masks`` when given (pass the
    validation split's) and otherwise on the analysed images, labelled ``sweep_source``.
    ``progress`` optionally wraps the per-image loop (e.g. ``tqdm``).
    """
    _check_inputs(samples, probabilities)
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    rows: list[dict] = []
    cal = CalibrationAccumulator(calibration_bins)
    pairs = list(zip(samples, probabilities))
    for s, prob in (progress(pairs) if progress else pairs):
        pred = np.asarray(prob) > threshold
        row = {"stem": s.stem, **image_scores(pred, s.mask)}
        row.update(attr.image_attributes(s.image, s.mask, pred, band_px=boundary_band_px))
        rows.append(row)
        cal.add(prob, s.mask)

    summary = summarize(rows)
    detection = {
        "gt_polyps": int(sum(r["n_gt_regions"] for r in rows)),
        "found": int(sum(r["n_found"] for r in rows)),
        "missed": int(sum(r["n_missed"] for r in rows)),
        "fp_regions": int(sum(r["n_fp_regions"] for r in rows)),
        "images_with_missed_polyp": int(sum(r["n_missed"] > 0 for r in rows)),
        "images_with_fp_region": int(sum(r["n_fp_regions"] > 0 for r in rows)),
        "min_coverage_to_count_as_found": attr.DETECTION_MIN_COVERAGE,
        "min_region_pixels": attr.MIN_REGION_PIXELS,
    }
    detection["polyp_recall"] = detection["found"] / detection["gt_polyps"] if detection["gt_polyps"] else float("nan")
    total_err = sum(r["error_px"] for r in rows)
    errors = {
        "band_px": boundary_band_px,
        "error_px": int(total_err),
        "boundary_share": sum(r["boundary_error_px"] for r in rows) / total_err if total_err else float("nan"),
        "far_fp_share": sum(r["far_fp_px"] for r in rows) / total_err if total_err else float("nan"),
        "far_fn_share": sum(r["far_fn_px"] for r in rows) / total_err if total_err else float("nan"),
        "fp_region_px_share": sum(r["fp_region_pixels"] for r in rows) / total_err if total_err else float("nan"),
    }
    buckets = {spec.name: bucket_table(spec, rows) for spec in ATTRIBUTES}
    worst = worst_vs_rest(rows, ATTRIBUTES, worst_fraction)

    if sweep_probabilities is not None:
        if sweep_masks is None:
            raise ValueError("sweep_probabilities given without sweep_masks")
        sweep = threshold_sweep(sweep_probabilities, sweep_masks, thresholds)
        source = sweep_source or "sweep set"
    else:
        sweep = threshold_sweep(list(probabilities), [s.mask for s in samples], thresholds)
        source = sweep_source or "analysed images"

    order = sorted(range(len(rows)), key=lambda i: (rows[i]["dice"], str(rows[i]["stem"])))
    cases = []
    for i in order[:max(0, n_worst_cases)]:
        s, prob = samples[i], np.asarray(probabilities[i])
        cases.append(CaseData(s.stem, s.image, s.mask, prob, prob > threshold, rows[i]))

    return AnalysisResult(threshold=float(threshold), rows=rows, summary=summary, detection=detection,
                          errors=errors, buckets=buckets, worst=worst, sweep=sweep, sweep_source=source,
                          calibration=cal.result(), cases=cases, meta=dict(meta or {}))


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------

def row_columns(rows: list[dict]) -> list[str]:
    first = ["stem", *METRIC_KEYS]
    return first + [k for k in rows[0] if k not in first]


def write_outputs(result: AnalysisResult, out_dir: str | Path) -> dict[str, Path]:
    """per_image.csv, per_image.json and analysis.json in ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"per_image_csv": out / "per_image.csv", "per_image_json": out / "per_image.json",
             "analysis_json": out / "analysis.json"}
    cols = row_columns(result.rows)
    with paths["per_image_csv"].open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in result.rows:
            w.writerow({k: ("" if isinstance(r[k], float) and not math.isfinite(r[k]) else r[k]) for k in cols})
    paths["per_image_json"].write_text(json.dumps(_jsonable(result.rows), indent=1), encoding="utf-8")
    paths["analysis_json"].write_text(json.dumps(result.to_dict(), indent=2), encoding="utf-8")
    return paths


def save_probabilities(path: str | Path, stems: Sequence[str], probabilities: Sequence[np.ndarray]) -> Path:
    """Store probability maps (float16, compressed) keyed by stem, for analysis elsewhere."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if len(stems) != len(probabilities):
        raise ValueError(f"{len(stems)} stems but {len(probabilities)} probability maps")
    arrays = {f"p_{i}": np.asarray(p, dtype=np.float16) for i, p in enumerate(probabilities)}
    np.savez_compressed(path, stems=np.array([str(s) for s in stems]), **arrays)
    return path


def load_probabilities(path: str | Path) -> dict[str, np.ndarray]:
    """Stem -> float32 probability map, as written by :func:`save_probabilities`."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            stems = [str(s) for s in data["stems"]]
            return {s: data[f"p_{i}"].astype(np.float32) for i, s in enumerate(stems)}
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"{path}: not a probability file written by effiseg-analyze ({e})") from e


def match_probabilities(samples, probs_by_stem: dict[str, np.ndarray], source: str | Path) -> list[np.ndarray]:
    """Probability maps in ``samples`` order; every sample must have one of the right shape."""
    missing = [s.stem for s in samples if s.stem not in probs_by_stem]
    if missing:
        raise ValueError(f"{source}: no probability map for {len(missing)} image(s), e.g. {missing[:5]}")
    return [probs_by_stem[s.stem] for s in samples]


def analyze_checkpoint(checkpoint: str | Path, samples, *, device: str = "cpu", batch_size: int = 8,
                       tta: bool = False, threshold: float | None = None, sweep_samples=None,
                       sweep_source: str | None = None, tta_sizes=(), **kwargs) -> tuple[AnalysisResult, list[np.ndarray]]:
    """Predict with a checkpoint, then :func:`analyze_predictions`; returns (result, probabilities).

    ``threshold`` defaults to the checkpoint config's. ``sweep_samples`` (the validation split)
    are predicted too when given, for the threshold sweep.
    """
    from ..checkpoint import load_model
    from ..evaluate import predict_probabilities
    model, config = load_model(checkpoint, device=device)
    thr = float(config.threshold if threshold is None else threshold)
    probs = predict_probabilities(model, config, [s.image for s in samples], device=device,
                                  batch_size=batch_size, tta=tta, tta_sizes=tta_sizes)
    sweep_probs = sweep_masks = None
    if sweep_samples is not None:
        sweep_probs = predict_probabilities(model, config, [s.image for s in sweep_samples], device=device,
                                            batch_size=batch_size, tta=tta, tta_sizes=tta_sizes)
        sweep_masks = [s.mask for s in sweep_samples]
    meta = {"checkpoint": str(checkpoint), "variant": config.variant,
            "input_size": config.input_size, "tta": tta, **kwargs.pop("meta", {})}
    if tta_sizes:
        meta["tta_sizes"] = list(tta_sizes)
    result = analyze_predictions(samples, probs, thr, sweep_probabilities=sweep_probs, sweep_masks=sweep_masks,
                                 sweep_source=sweep_source, meta=meta, **kwargs)
    return result, probs
