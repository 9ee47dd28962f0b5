"""Robustness without foreign data: Dice under controlled device shifts (training/analysis/shifts.py).

One clean pass, then one pass per (shift, strength) over the same images, each scored by the
evaluation code (training/evaluate.py: logits resized back, metrics at the native mask resolution).
The robustness score is the mean Dice over the shifts at one stated strength; its drop from the
clean Dice gets a paired bootstrap interval over images (the per-image mean over shifts against the
same image clean), and so does each shift's drop, so "which shift hurts most" comes with its noise.
The per-image robustness scores are written too, for the protocol's paired comparisons of arms.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from ..data import Sample
from .shifts import SHIFTS, apply_shift

CURVES_CSV = "curves.csv"
PER_IMAGE_CSV = "per_image.csv"
RESULT_JSON = "robustness.json"
FIGURE_PNG = "robustness.png"
EXAMPLES_PNG = "shift_examples.png"
SUMMARY_MD = "summary.md"


def parse_strengths(spec: str) -> list[float]:
    """'0.25,0.5,1' -> [0.25, 0.5, 1.0]: sorted, each once, each in (0, 1] (0, the clean pass, always runs)."""
    try:
        values = sorted({float(v) for v in spec.split(",") if v.strip()})
    except ValueError:
        raise ValueError(f"strengths must be numbers separated by commas, got {spec!r}") from None
    values = [v for v in values if v != 0.0]
    bad = [v for v in values if not 0.0 < v <= 1.0]
    if bad or not values:
        raise ValueError(f"strengths must lie in (0, 1] (0 is the clean pass, always run), got {spec!r}")
    return values


def shifted_samples(samples: list[Sample], shift: str, strength: float, seed: int) -> list[Sample]:
    out = []
    for s in samples:
        image, mask = apply_shift(shift, s.image, s.mask, strength, seed=seed, stem=s.stem)
        out.append(Sample(s.stem, image, mask, s.image_path, s.mask_path))
    return out


def run_robustness(model, config: dict, samples: list[Sample], shifts: list[str], strengths: list[float],
                   score_strength: float, seed: int = 0, device="cpu", batch_size: int = 4,
                   threshold: float | None = None, tta: bool = False, tta_sizes=(),
                   log: Callable[[str], None] = lambda m: None) -> dict:
    """Evaluate ``model`` on ``samples`` clean and under every (shift, strength). Returns a plain,
    JSON-ready dict (see :func:`write_outputs` for the files made from it)."""
    from ..evaluate import evaluate_samples
    from .stats import paired_bootstrap_ci

    if score_strength not in strengths:
        raise ValueError(f"the score's strength {score_strength:g} is not among the strengths evaluated "
                         f"({', '.join(f'{s:g}' for s in strengths)})")

    def evaluate(batch):
        summary, rows, _ = evaluate_samples(model, config, batch, device=device, batch_size=batch_size,
                                            threshold=threshold, tta=tta, tta_sizes=tta_sizes)
        return summary, np.array([r["dice"] for r in rows])

    t0 = time.perf_counter()
    clean, clean_dice = evaluate(samples)
    log(f"clean: mean Dice {clean['mean_dice']:.4f} ({time.perf_counter() - t0:.0f} s)")
    curves, per_image = [], []
    dice_at: dict[tuple[str, float], np.ndarray] = {}
    for name in shifts:
        shift = SHIFTS[name]
        curves.append(_curve_row(shift, 0.0, clean, clean["mean_dice"]))
        for strength in strengths:
            t = time.perf_counter()
            summary, dice = evaluate(shifted_samples(samples, name, strength, seed))
            dice_at[name, strength] = dice
            curves.append(_curve_row(shift, strength, summary, clean["mean_dice"]))
            per_image += [{"shift": name, "strength": strength, "stem": s.stem, "dice": float(d)}
                          for s, d in zip(samples, dice)]
            log(f"{name} {strength:g}: mean Dice {summary['mean_dice']:.4f} "
                f"({summary['mean_dice'] - clean['mean_dice']:+.4f}; {time.perf_counter() - t:.0f} s)")
    per_image = [{"shift": "clean", "strength": 0.0, "stem": s.stem, "dice": float(d)}
                 for s, d in zip(samples, clean_dice)] + per_image

    robust_per_image = np.mean([dice_at[n, score_strength] for n in shifts], axis=0)
    drops = {n: paired_bootstrap_ci(clean_dice, dice_at[n, score_strength], seed=seed) for n in shifts}
    score = {
        "strength": score_strength,
        "robustness_score": float(robust_per_image.mean()),
        "clean_dice": float(clean["mean_dice"]),
        "drop": paired_bootstrap_ci(clean_dice, robust_per_image, seed=seed),
        "per_shift_drop": drops,
        "shifts_by_harm": sorted(shifts, key=lambda n: drops[n]["mean_diff"]),
        "per_image": {s.stem: float(v) for s, v in zip(samples, robust_per_image)},
        "at_each_strength": {f"{st:g}": float(np.mean([dice_at[n, st].mean() for n in shifts]))
                             for st in strengths},
    }
    return {"clean": clean, "curves": curves, "score": score, "per_image_rows": per_image,
            "settings": {"shifts": list(shifts), "strengths": list(strengths), "seed": int(seed),
                         "threshold": clean["threshold"], "tta": bool(tta), "tta_sizes": list(tta_sizes or ()),
                         "n_images": len(samples), "seconds": round(time.perf_counter() - t0, 1),
                         "shift_definitions": {n: {"kind": SHIFTS[n].kind, "at_full_strength": SHIFTS[n].at_full}
                                               for n in shifts}}}


def _curve_row(shift, strength: float, summary: dict, clean_dice: float) -> dict:
    return {"shift": shift.name, "kind": shift.kind, "strength": strength,
            "mean_dice": summary["mean_dice"], "mean_iou": summary["mean_iou"],
            "mean_precision": summary["mean_precision"], "mean_recall": summary["mean_recall"],
            "dice_change": summary["mean_dice"] - clean_dice}


def curves_figure(result: dict, path: Path) -> Path:
    from .report import _pyplot, _save_png
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    names = result["settings"]["shifts"]
    cmap = plt.get_cmap("tab10")
    for i, name in enumerate(names):
        rows = [r for r in result["curves"] if r["shift"] == name]
        ax.plot([r["strength"] for r in rows], [r["mean_dice"] for r in rows], marker="o", ms=3.5,
                color=cmap(i % 10), label=name, linestyle="-" if i < 10 else "--")
    score = result["score"]
    ax.axhline(score["clean_dice"], color="0.4", lw=0.8, ls=":", label="clean")
    ax.axvline(score["strength"], color="0.6", lw=0.8, ls="--")
    ax.set_xlabel("shift strength (0 = clean, 1 = far end of another device)")
    ax.set_ylabel("mean Dice (validation)")
    ax.set_title(f"Robustness score {score['robustness_score']:.4f} at strength {score['strength']:g} "
                 f"(clean {score['clean_dice']:.4f})", fontsize=10)
    ax.legend(fontsize=7.5, loc="lower left", ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save_png(fig, path)


def examples_figure(sample: Sample, shifts: list[str], strengths: list[float], seed: int, path: Path) -> Path:
    """One image under every shift and strength (the true outline drawn in green): what the curves mean."""
    from .report import _pyplot, _save_png
    plt = _pyplot()
    levels = [0.0] + list(strengths)
    fig, axes = plt.subplots(len(shifts), len(levels), figsize=(1.6 * len(levels), 1.6 * len(shifts)), squeeze=False)
    for row, name in zip(axes, shifts):
        for ax, strength in zip(row, levels):
            image, mask = apply_shift(name, sample.image, sample.mask, strength, seed=seed, stem=sample.stem)
            edge = mask & ~(np.roll(mask, 2, 0) & np.roll(mask, -2, 0) & np.roll(mask, 2, 1) & np.roll(mask, -2, 1))
            shown = image.copy()
            shown[edge] = (0, 220, 0)
            ax.imshow(shown)
            ax.set_xticks([])
            ax.set_yticks([])
            if ax is row[0]:
                ax.set_ylabel(name, fontsize=7)
            if name == shifts[0]:
                ax.set_title(f"strength {strength:g}", fontsize=8)
    fig.tight_layout(pad=0.3)
    return _save_png(fig, path)


def summary_markdown(result: dict) -> str:
    score, st = result["score"], result["settings"]
    d = score["drop"]
    lines = [f"Robustness score (mean Dice over {len(st['shifts'])} shifts at strength {score['strength']:g}): "
             f"**{score['robustness_score']:.4f}**; clean {score['clean_dice']:.4f}; change "
             f"{d['mean_diff']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}] (95 % paired bootstrap over "
             f"{d['n']} images). Threshold {st['threshold']:g}, "
             f"{'TTA' if st['tta'] or st['tta_sizes'] else 'one pass'}, seed {st['seed']}.", "",
             "| shift | kind | at strength 1 | " + " | ".join(f"Dice @{s:g}" for s in st["strengths"])
             + f" | change @{score['strength']:g} [95 % CI] |",
             "|---|---|---|" + "---:|" * (len(st["strengths"]) + 1)]
    for name in score["shifts_by_harm"]:
        rows = {r["strength"]: r for r in result["curves"] if r["shift"] == name}
        c = score["per_shift_drop"][name]
        lines.append(f"| {name} | {st['shift_definitions'][name]['kind']} | "
                     f"{st['shift_definitions'][name]['at_full_strength']} | "
                     + " | ".join(f"{rows[s]['mean_dice']:.4f}" for s in st["strengths"])
                     + f" | {c['mean_diff']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}] |")
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, out_dir: Path, figure: bool = True, example: Sample | None = None) -> list[Path]:
    """The files of a study; ``example``: also draw that image under every condition."""
    from ..result_files import write_json, write_rows_csv
    from effiseg.runtime.images import atomic_write_text
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / RESULT_JSON, out_dir / CURVES_CSV, out_dir / PER_IMAGE_CSV, out_dir / SUMMARY_MD]
    write_json(paths[0], {k: v for k, v in result.items() if k != "per_image_rows"})
    write_rows_csv(paths[1], result["curves"])
    write_rows_csv(paths[2], result["per_image_rows"])
    atomic_write_text(paths[3], summary_markdown(result))
    if figure:
        paths.append(curves_figure(result, out_dir / FIGURE_PNG))
        if example is not None:
            st = result["settings"]
            paths.append(examples_figure(example, st["shifts"], st["strengths"], st["seed"], out_dir / EXAMPLES_PNG))
    return paths
