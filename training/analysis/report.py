"""A Markdown failure-analysis report with small PNG figures, readable on GitHub.

Layout of ``out_dir``: ``REPORT.md`` plus ``figures/*.png`` linked relatively. Figures are
palette-quantised PNGs (photographic panels at half resolution) so each stays well under
~200 KB and the folder can be committed.

Error overlays use Okabe-Ito colours, distinguishable with the common colour-vision deficiencies:
true positive bluish green, false positive vermillion, false negative sky blue, drawn over a
dimmed grey copy of the image so the colours are not confused with the mucosa.
"""
from __future__ import annotations

import io
import math
import re
from pathlib import Path

import numpy as np

from .analyze import ATTRIBUTES, AnalysisResult, AttributeSpec, CaseData, _values

TP_COLOUR = "#009E73"   # Okabe-Ito bluish green
FP_COLOUR = "#D55E00"   # Okabe-Ito vermillion
FN_COLOUR = "#56B4E9"   # Okabe-Ito sky blue
LINE_COLOUR = "#0072B2"  # Okabe-Ito blue
ACCENT_COLOUR = "#E69F00"  # Okabe-Ito orange
FIGURE_DIR = "figures"
REPORT_NAME = "REPORT.md"
PANEL_PX = 176          # each case panel is drawn at this many pixels (half of Kvasir's 352)


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("matplotlib is needed for the report: pip install \"effiseg[train]\"") from e
    return plt


def _save_png(fig, path: Path, dpi: int = 100, colours: int = 256) -> Path:
    """Render, quantise to a palette and write an optimised PNG (keeps committed figures small)."""
    from PIL import Image
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    buf.seek(0)
    with Image.open(buf) as im:
        rgb = im.convert("RGB")
    rgb.quantize(colors=colours, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        path, format="PNG", optimize=True)
    return path


def _hex_rgb(colour: str) -> np.ndarray:
    return np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)], dtype=np.float32)


def error_overlay(image: np.ndarray, gt: np.ndarray, pred: np.ndarray, alpha: float = 0.65) -> np.ndarray:
    """RGB uint8: the image in dimmed grey, TP/FP/FN pixels blended with their colours."""
    grey = (0.299 * image[..., 0] + 0.587 * image[..., 1] + 0.114 * image[..., 2]).astype(np.float32) * 0.6
    out = np.repeat(grey[..., None], 3, axis=2)
    gt, pred = gt.astype(bool), pred.astype(bool)
    for region, colour in ((gt & pred, TP_COLOUR), (pred & ~gt, FP_COLOUR), (gt & ~pred, FN_COLOUR)):
        out[region] = (1 - alpha) * out[region] + alpha * _hex_rgb(colour)
    return np.clip(out, 0, 255).astype(np.uint8)


def _downscale(arr: np.ndarray, size: int, resample) -> np.ndarray:
    from PIL import Image
    h, w = arr.shape[:2]
    scale = size / max(h, w)
    if scale >= 1:
        return arr
    im = Image.fromarray(arr)
    return np.asarray(im.resize((max(1, round(w * scale)), max(1, round(h * scale))), resample))


def _safe_name(stem: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", str(stem))[:60] or "image"


def case_figure(case: CaseData, threshold: float, path: Path, rank: int | None = None) -> Path:
    """Image / ground truth / probability with the threshold contour / TP-FP-FN overlay."""
    from matplotlib.patches import Patch
    from PIL import Image
    plt = _pyplot()
    image = _downscale(case.image, PANEL_PX, Image.BILINEAR)
    gt = _downscale(case.gt.astype(np.uint8) * 255, PANEL_PX, Image.NEAREST) > 127
    pred = _downscale(case.pred.astype(np.uint8) * 255, PANEL_PX, Image.NEAREST) > 127
    prob = _downscale(np.asarray(case.prob, dtype=np.float32), PANEL_PX, Image.BILINEAR)
    overlay = error_overlay(image, gt, pred)
    fig, axes = plt.subplots(1, 4, figsize=(8.0, 2.45))
    axes[0].imshow(image)
    axes[0].set_title("image", fontsize=8)
    axes[1].imshow(gt, cmap="gray", vmin=0, vmax=1)
    axes[1].set_title("ground truth", fontsize=8)
    axes[2].imshow(prob, cmap="gray", vmin=0, vmax=1)
    if prob.min() < threshold < prob.max():
        axes[2].contour(prob, levels=[threshold], colors=[ACCENT_COLOUR], linewidths=0.8)
    axes[2].set_title(f"probability (contour at {threshold:g})", fontsize=8)
    axes[3].imshow(overlay)
    axes[3].set_title("errors", fontsize=8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    r = case.row
    head = f"#{rank} " if rank is not None else ""
    fig.suptitle(f"{head}{case.stem}: Dice {r['dice']:.3f}, recall {r['recall']:.3f}, precision {r['precision']:.3f}",
                 fontsize=9)
    handles = [Patch(color=TP_COLOUR, label="true positive"), Patch(color=FP_COLOUR, label="false positive"),
               Patch(color=FN_COLOUR, label="false negative")]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.83, bottom=0.1, wspace=0.04)
    return _save_png(fig, path, dpi=100)


def sweep_figure(result: AnalysisResult, path: Path) -> Path:
    plt = _pyplot()
    t = [p["threshold"] for p in result.sweep]
    d = [p["mean_dice"] for p in result.sweep]
    best = max(result.sweep, key=lambda p: p["mean_dice"])
    fig, ax = plt.subplots(figsize=(4.2, 2.8))
    ax.plot(t, d, marker="o", markersize=3, color=LINE_COLOUR)
    ax.axvline(result.threshold, color="grey", linestyle="--", linewidth=0.8, label=f"used {result.threshold:g}")
    ax.axvline(best["threshold"], color=ACCENT_COLOUR, linestyle=":", linewidth=1.2,
               label=f"best {best['threshold']:g} ({best['mean_dice']:.4f})")
    ax.set_xlabel("threshold")
    ax.set_ylabel("mean Dice")
    ax.set_title(f"Threshold sweep ({result.sweep_source})", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save_png(fig, path)


def calibration_figure(result: AnalysisResult, path: Path) -> Path:
    plt = _pyplot()
    bins = [b for b in result.calibration["bins"] if b["n_pixels"] > 0]
    fig, (ax, ax_n) = plt.subplots(2, 1, figsize=(4.2, 4.2), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=0.8, label="perfect calibration")
    ax.plot([b["mean_predicted"] for b in bins], [b["observed_frequency"] for b in bins], marker="o",
            markersize=4, color=LINE_COLOUR, label="model")
    ax.set_ylabel("observed foreground frequency")
    ax.set_title(f"Pixel reliability (ECE {result.calibration['ece']:.4f})", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    centres = [(b["low"] + b["high"]) / 2 for b in bins]
    width = 1.0 / result.calibration["n_bins"]
    ax_n.bar(centres, [b["n_pixels"] for b in bins], width=width * 0.9, color=LINE_COLOUR)
    ax_n.set_yscale("log")
    ax_n.set_xlabel("predicted probability")
    ax_n.set_ylabel("pixels")
    ax_n.set_xlim(0, 1)
    fig.tight_layout()
    return _save_png(fig, path)


PLOTTED = ("area_fraction", "n_polyps", "border_distance", "specular_fraction", "polyp_specular_fraction",
           "luminance", "polyp_contrast", "blur_laplacian_var")


def attributes_figure(result: AnalysisResult, path: Path, names=PLOTTED) -> Path:
    """Dice against each input attribute (one small scatter each), Spearman rho in the title."""
    plt = _pyplot()
    specs = {s.name: s for s in ATTRIBUTES}
    rhos = {t["attribute"]: t["spearman_rho"] for t in result.worst["attributes"]}
    worst = set(result.worst["worst_stems"])
    dice = _values(result.rows, "dice")
    is_worst = np.array([r["stem"] in worst for r in result.rows])
    cols = 4
    rows_n = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(8.0, 2.0 * rows_n), sharey=True, squeeze=False)
    for ax, name in zip(axes.ravel(), names):
        spec: AttributeSpec = specs[name]
        x = _values(result.rows, name)
        ok = np.isfinite(x)
        if spec.log_scale:
            ok &= x > 0
        ax.scatter(x[ok & ~is_worst], dice[ok & ~is_worst], s=6, color=LINE_COLOUR, alpha=0.6, linewidths=0)
        ax.scatter(x[ok & is_worst], dice[ok & is_worst], s=10, color=FP_COLOUR, marker="x", linewidths=0.8)
        if spec.log_scale and ok.any():
            ax.set_xscale("log")
        rho = rhos.get(name, float("nan"))
        ax.set_title(f"{name}\nrho {rho:+.2f}" if math.isfinite(rho) else f"{name}\nrho n/a", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("Dice", fontsize=7)
    fig.tight_layout()
    return _save_png(fig, path)


# ----------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------

def _f(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else "no"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    return f"{x:.{digits}f}" if abs(x) >= 10 ** -digits or x == 0 else f"{x:.2e}"


def _pct(x) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{100 * x:.1f}%"


def _case_caption(case: CaseData) -> str:
    r = case.row
    bits = [f"polyp area {_pct(r['area_fraction'])}", f"{r['n_polyps']} polyp(s)",
            f"{r['n_missed']} missed", f"{r['n_fp_regions']} false-positive region(s)",
            f"boundary share of errors {_pct(r['boundary_error_fraction'])}",
            ("no polyp" if isinstance(r["touches_border"], float) and math.isnan(r["touches_border"])
             else "touches border" if r["touches_border"] else "clear of border"),
            f"overlay box {r['overlay_kind']}" if r["overlay_present"] else "no overlay box",
            f"highlights in polyp {_pct(r['polyp_specular_fraction'])}"]
    return "; ".join(bits)


def render_markdown(result: AnalysisResult, figures: dict[str, str], title: str) -> str:
    s, det, err = result.summary, result.detection, result.errors
    meta = result.meta
    lines = [f"# {title}", ""]
    about = [f"{s['n_images']} images", f"threshold {result.threshold:g}"]
    for key in ("split", "data", "checkpoint", "variant", "tta", "tta_sizes"):
        if key in meta and meta[key] not in (None, ""):
            about.append(f"{key} `{meta[key]}`")
    lines += ["Setup: " + ", ".join(about) + ".", "",
              "Files beside this report: `per_image.csv` / `per_image.json` (every metric and attribute per "
              "image), `analysis.json` (all tables below). Definitions: `training/analysis/attributes.py` "
              "(package `effiseg.training.analysis`).", ""]
    lines += ["## Summary", "",
              "| mean Dice | mean IoU | mean precision | mean recall | pooled F1 |", "|---|---|---|---|---|",
              f"| {_f(s['mean_dice'])} | {_f(s['mean_iou'])} | {_f(s['mean_precision'])} | {_f(s['mean_recall'])} | "
              f"{_f(s['f1_pooled'])} |", ""]
    lines += ["## Polyp-level detection", "",
              f"A ground-truth polyp (8-connected region of at least {det['min_region_pixels']} pixels) counts as "
              f"found when the prediction covers at least {det['min_coverage_to_count_as_found']:.0%} of it; a "
              "false-positive region is a predicted region touching no ground truth.", "",
              "| polyps | found | missed | polyp recall | images with a missed polyp | false-positive regions | "
              "images with one |", "|---|---|---|---|---|---|---|",
              f"| {det['gt_polyps']} | {det['found']} | {det['missed']} | {_pct(det['polyp_recall'])} | "
              f"{det['images_with_missed_polyp']} | {det['fp_regions']} | {det['images_with_fp_region']} |", ""]
    lines += ["## Where the error pixels are", "",
              f"Of all {err['error_px']} wrong pixels (false positives + false negatives), "
              f"{_pct(err['boundary_share'])} lie within {err['band_px']:g} px of the true polyp boundary "
              f"(delineation), {_pct(err['far_fn_share'])} are missed polyp farther inside, "
              f"{_pct(err['far_fp_share'])} are false positives farther out "
              f"({_pct(err['fp_region_px_share'])} in predicted regions touching no polyp).", ""]
    w = result.worst
    lines += ["## What goes with the worst cases", "",
              f"Worst {w['n_worst']} images by Dice (Dice <= {_f(w['dice_cutoff'], 3)}) against the other "
              f"{w['n_rest']}; Spearman rank correlation of each attribute with Dice over all images, strongest "
              "first (input attributes, then outcomes). *Input* attributes describe the image and its ground "
              "truth (candidate causes); *outcome* rows describe the errors themselves.", "",
              "| attribute | kind | mean, worst | mean, rest | Spearman rho with Dice | p |",
              "|---|---|---|---|---|---|"]
    for t in w["attributes"]:
        lines.append(f"| {t['label']} (`{t['attribute']}`) | {t['kind']} | {_f(t['mean_worst'])} | "
                     f"{_f(t['mean_rest'])} | {_f(t['spearman_rho'], 3)} | {_f(t['spearman_p'], 3)} |")
    lines += ["", f"![Dice against attributes]({figures['attributes']})", "",
              "Crosses: the worst images. Correlation is not cause: attributes are correlated with each other "
              "(large polyps touch the border more often, for instance).", ""]
    lines += ["## Dice by attribute bucket", "",
              "Fixed bins where the attribute has a natural scale, quartiles of these images otherwise "
              "(quartile edges depend on the data); `n/a` collects images where the attribute is undefined "
              "(e.g. no polyp).", ""]
    for name, table in result.buckets.items():
        lines += [f"### {table['label']} (`{name}`, {table['rule']}, {table['kind']})", "",
                  "| bucket | images | mean Dice | mean recall | mean precision | missed polyps | FP regions |",
                  "|---|---|---|---|---|---|---|"]
        for b in table["buckets"]:
            lines.append(f"| {b['bucket']} | {b['n']} | {_f(b['mean_dice'])} | {_f(b['mean_recall'])} | "
                         f"{_f(b['mean_precision'])} | {b['missed_polyps']} | {b['fp_regions']} |")
        lines.append("")
    best = max(result.sweep, key=lambda p: p["mean_dice"])
    at_used = min(result.sweep, key=lambda p: abs(p["threshold"] - result.threshold))
    lines += ["## Threshold sweep", "",
              f"Mean Dice against the threshold on **{result.sweep_source}**: best {_f(best['mean_dice'])} at "
              f"{best['threshold']:g}, against {_f(at_used['mean_dice'])} at {at_used['threshold']:g}. "
              "Choose thresholds on the validation split only.", "",
              f"![Threshold sweep]({figures['sweep']})", ""]
    cal = result.calibration
    lines += ["## Calibration", "",
              f"Pixel-level reliability over {cal['n_pixels']} pixels in {cal['n_bins']} equal-width probability "
              f"bins: expected calibration error {_f(cal['ece'])}, Brier score {_f(cal['brier'])}. "
              "Background pixels dominate the count, so the ECE mostly reflects confident background.", "",
              f"![Calibration]({figures['calibration']})", "",
              "| probability bin | pixels | mean predicted | observed foreground |", "|---|---|---|---|"]
    for b in cal["bins"]:
        lines.append(f"| [{b['low']:.1f}, {b['high']:.1f}) | {b['n_pixels']} | {_f(b['mean_predicted'])} | "
                     f"{_f(b['observed_frequency'])} |")
    lines.append("")
    if result.cases:
        lines += [f"## The {len(result.cases)} worst cases", "",
                  "Each panel: image, ground truth, predicted probability (threshold contour in orange), and the "
                  "errors: true positive bluish green, false positive vermillion, false negative sky blue.", ""]
        for i, case in enumerate(result.cases, 1):
            lines += [f"**{i}. `{case.stem}`** — Dice {_f(case.row['dice'], 3)}: {_case_caption(case)}.", "",
                      f"![case {case.stem}]({figures['cases'][i - 1]})", ""]
    return "\n".join(lines)


def write_report(result: AnalysisResult, out_dir: str | Path, title: str = "EffiSegNet failure analysis",
                 progress=None) -> Path:
    """Write ``REPORT.md`` and ``figures/`` into ``out_dir``; returns the Markdown path."""
    out = Path(out_dir)
    fig_dir = out / FIGURE_DIR
    fig_dir.mkdir(parents=True, exist_ok=True)
    figures: dict = {
        "sweep": sweep_figure(result, fig_dir / "threshold_sweep.png"),
        "calibration": calibration_figure(result, fig_dir / "calibration.png"),
        "attributes": attributes_figure(result, fig_dir / "attributes_vs_dice.png"),
    }
    cases = list(enumerate(result.cases, 1))
    figures["cases"] = [case_figure(c, result.threshold, fig_dir / f"case_{i:02d}_{_safe_name(c.stem)}.png", rank=i)
                        for i, c in (progress(cases) if progress else cases)]
    rel = {k: (f"{FIGURE_DIR}/{v.name}" if isinstance(v, Path) else [f"{FIGURE_DIR}/{p.name}" for p in v])
           for k, v in figures.items()}
    path = out / REPORT_NAME
    path.write_text(render_markdown(result, rel, title), encoding="utf-8")
    return path
