"""Which multi-scale TTA sizes to use: a study on one checkpoint and one split (validation).

    python -m effiseg.training.tta_study training/weights/default --out training/reports/multiscale-tta-validation

The network runs once per candidate size (with the checkpoint's flip setting); every combination
of up to ``--max-sizes`` sizes is then scored at every threshold of the grid from those logits,
because the multi-scale logits are the plain mean of the per-size logits (training/tta.py), so no
combination needs another pass. Cost: the network's pixels per image relative to one pass at the
input size (a size s costs (s / input size)^2). The rule: the highest mean Dice among combinations
costing at most ``--max-cost``, ties to the cheaper. Writes ``study.json`` (every row), ``study.csv``,
``STUDY.md`` and ``dice_vs_cost.png``.

Choose on validation; read the test split once afterwards with ``effiseg-eval``. The command warns
when pointed at the test split.
"""
from __future__ import annotations

import csv
import itertools
import json
import sys
import time
from pathlib import Path

import click
import numpy as np

from effiseg.runtime.console import Command
from effiseg.runtime.model_info import TTA_SIZE_STEP, network_passes, parse_tta_sizes
from effiseg.runtime.postprocess import logit_threshold

from .data import DEFAULT_DATA_ROOT
from .protocol_common import THRESHOLDS  # the protocol's grid, so the study and the protocol choose alike


def default_candidates(input_size: int) -> tuple[int, ...]:
    """Two steps of 32 px below the input size to three above: 352 -> 288 ... 448."""
    return parse_tta_sizes([input_size + k * TTA_SIZE_STEP for k in range(-2, 4) if input_size + k * TTA_SIZE_STEP >= 64])


def relative_cost(sizes, input_size: int) -> float:
    return float(sum((s / input_size) ** 2 for s in sizes))


def score_combinations(logits_by_size: dict[int, list[np.ndarray]], masks: list[np.ndarray], input_size: int,
                       max_sizes: int = 3, thresholds=THRESHOLDS) -> list[dict]:
    """One row per (combination, threshold): mean Dice and the per-image Dice list."""
    from .metrics import image_scores
    rows = []
    sizes = sorted(logits_by_size)
    for k in range(1, min(max_sizes, len(sizes)) + 1):
        for combo in itertools.combinations(sizes, k):
            mean_logits = [np.mean([logits_by_size[s][i] for s in combo], axis=0) for i in range(len(masks))]
            for thr in thresholds:
                cut = logit_threshold(thr)
                dice = [image_scores(lg > cut, m)["dice"] for lg, m in zip(mean_logits, masks)]
                rows.append({"sizes": list(combo), "threshold": float(thr), "mean_dice": float(np.mean(dice)),
                             "cost": relative_cost(combo, input_size), "dice": [round(float(d), 6) for d in dice]})
    return rows


def choose(rows: list[dict], max_cost: float) -> dict:
    """Highest mean Dice among rows costing at most ``max_cost``; ties go to the cheaper, then the
    fewer sizes, then the threshold nearer 0.5."""
    allowed = [r for r in rows if r["cost"] <= max_cost + 1e-9]
    if not allowed:
        raise ValueError(f"no combination costs at most {max_cost}x one pass at the input size")
    return max(allowed, key=lambda r: (round(r["mean_dice"], 10), -r["cost"], -len(r["sizes"]),
                                       -abs(r["threshold"] - 0.5)))


def _best_per_combination(rows: list[dict]) -> list[dict]:
    best: dict[tuple, dict] = {}
    for r in rows:
        key = tuple(r["sizes"])
        if key not in best or r["mean_dice"] > best[key]["mean_dice"]:
            best[key] = r
    return sorted(best.values(), key=lambda r: -r["mean_dice"])


def _plot(rows: list[dict], chosen: dict, reference: dict, max_cost: float, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    best = _best_per_combination(rows)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for n, marker in ((1, "o"), (2, "s"), (3, "^"), (4, "D")):
        pts = [r for r in best if len(r["sizes"]) == n]
        if pts:
            ax.scatter([r["cost"] for r in pts], [r["mean_dice"] for r in pts], marker=marker, alpha=0.7,
                       label=f"{n} size{'s' if n > 1 else ''} (best threshold each)")
    ax.scatter([reference["cost"]], [reference["mean_dice"]], s=160, facecolors="none", edgecolors="black",
               label=f"current: {'+'.join(map(str, reference['sizes']))} @ {reference['threshold']:.2f}")
    ax.scatter([chosen["cost"]], [chosen["mean_dice"]], s=220, marker="*", color="black",
               label=f"chosen: {'+'.join(map(str, chosen['sizes']))} @ {chosen['threshold']:.2f}")
    ax.axvline(max_cost, color="grey", linestyle="--", linewidth=1, label=f"cost cap {max_cost:g}x")
    ax.set_xlabel("network pixels per image, relative to one pass at the input size")
    ax.set_ylabel("mean Dice")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _markdown(meta: dict, rows: list[dict], chosen: dict, reference: dict, gain: dict) -> str:
    f = lambda r: (f"| {'+'.join(map(str, r['sizes']))} | {r['threshold']:.2f} | {r['cost']:.2f} | "
                   f"{network_passes(meta['flips'], r['sizes'])} | {r['mean_dice']:.4f} |")
    head = ["| sizes | threshold | cost | passes/image | mean Dice |", "|---|---|---|---|---|"]
    singles = sorted((r for r in _best_per_combination(rows) if len(r["sizes"]) == 1), key=lambda r: r["sizes"])
    lines = [f"# Multi-scale TTA study ({meta['split']})", "",
             f"Checkpoint `{meta['checkpoint']}` ({meta['variant']}, input {meta['input_size']}), "
             f"{meta['n_images']} {meta['split']} images of `{meta['data']}`, flips "
             f"{'on' if meta['flips'] else 'off'}, device {meta['device']}, {meta['seconds']:.0f} s. Candidate sizes "
             f"{', '.join(map(str, meta['candidates']))}; every combination of up to {meta['max_sizes']} of them at "
             f"thresholds {meta['thresholds'][0]:.2f}-{meta['thresholds'][-1]:.2f}. Cost: network pixels per image "
             "relative to one pass at the input size (the flips multiply every row alike).", "",
             f"Rule: the highest mean Dice costing at most {meta['max_cost']:g}x; ties to the cheaper.", "",
             "## Chosen", "", *head, f(chosen), "",
             f"Against the checkpoint's current setting ({'+'.join(map(str, reference['sizes']))} at threshold "
             f"{reference['threshold']:.2f}, mean Dice {reference['mean_dice']:.4f}): per-image Dice difference "
             f"{gain['mean_diff']:+.4f}, paired bootstrap 95% interval [{gain['low']:+.4f}, {gain['high']:+.4f}] "
             f"({gain['n_boot']} resamples of these {meta['n_images']} images; one checkpoint, so training noise "
             "is not in this interval).", "",
             f"**This interval is optimistic:** the chosen row is the best of "
             f"{sum(r['cost'] <= meta['max_cost'] for r in rows)} within the cost cap ({len(rows)} scored) on these "
             f"same {meta['n_images']} images, so it also holds the luck of the choice. Measure the gain on images "
             "the choice did not see (the test split, once).", "",
             "## One size alone (best threshold each)", "",
             "A network trained with random zoom sees polyps larger than a plain test image shows them; larger "
             "sizes than the input size can score better on their own (the train/test resolution discrepancy).", "",
             *head, *(f(r) for r in singles), "",
             "## Best combinations (best threshold each)", "", *head,
             *(f(r) for r in _best_per_combination(rows)[:15]), "",
             "![mean Dice against cost](dice_vs_cost.png)", "",
             "All rows: `study.json` / `study.csv` beside this file."]
    return "\n".join(lines) + "\n"


@click.command(cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("checkpoint", type=click.Path(path_type=Path, exists=True))
@click.option("--data", "data_root", default=DEFAULT_DATA_ROOT, show_default=True, help="Kvasir-SEG root ($EFFISEG_DATA).")
@click.option("--split", default="validation", show_default=True, help="Split to choose on (validation; not test).")
@click.option("--sizes", "candidates", default=None, metavar="SIZES",
              help="Candidate sizes, e.g. 288,320,352,384,416,448 [default: input size -64 ... +96 in steps of 32].")
@click.option("--max-sizes", type=click.IntRange(1, 4), default=3, show_default=True)
@click.option("--max-cost", type=click.FloatRange(1.0), default=2.5, show_default=True,
              help="Largest cost allowed for the choice, in passes at the input size.")
@click.option("--flips/--no-flips", default=None, help="Flip TTA at every size [default: the checkpoint's setting].")
@click.option("--device", default="auto", show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True)
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), required=True, help="Folder to write.")
def main(checkpoint, data_root, split, candidates, max_sizes, max_cost, flips, device, batch_size, out):
    """Choose multi-scale TTA sizes and a threshold for CHECKPOINT on a split (validation)."""
    from .analysis.stats import paired_bootstrap_ci
    from .checkpoint import load_model
    from .data import DatasetError, load_split
    from .evaluate import predict_logits
    from .trainer import resolve_device
    try:
        sizes = parse_tta_sizes(candidates) if candidates else None
        dev = resolve_device(device)
        model, cfg = load_model(checkpoint, device=dev)
        samples = load_split(data_root, split)
    except (FileNotFoundError, DatasetError, ValueError, KeyError, RuntimeError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    if split == "test":
        click.echo("warning: choosing on the test split; the choice should be made on validation", err=True)
    base = cfg.input_size
    sizes = sizes or default_candidates(base)
    if min(relative_cost((s,), base) for s in sizes) > max_cost + 1e-9:
        click.echo(f"error: no candidate size costs at most --max-cost {max_cost:g} passes at {base}x{base}", err=True)
        sys.exit(2)
    flips = cfg.tta if flips is None else flips
    t0 = time.perf_counter()
    logits = {}
    for i, size in enumerate(sizes, 1):
        click.echo(f"[{i}/{len(sizes)}] {len(samples)} images at {size}x{size} "
                   f"({'with' if flips else 'without'} flips) ...", err=True)
        logits[size] = predict_logits(model, cfg, [s.image for s in samples], dev, batch_size, flips, tta_sizes=(size,))
    masks = [s.mask for s in samples]
    rows = score_combinations(logits, masks, base, max_sizes)
    # The checkpoint's sizes and threshold, with the flips as run here (--flips/--no-flips); a size
    # that is not a candidate is run now, after the candidates' rows are scored.
    current_sizes = list(cfg.tta_sizes) or [base]
    for size in current_sizes:
        if size not in logits:
            logits[size] = predict_logits(model, cfg, [s.image for s in samples], dev, batch_size, flips,
                                          tta_sizes=(size,))
    # The last row is the combination of all the current sizes (at the one threshold given).
    reference = score_combinations({s: logits[s] for s in current_sizes}, masks, base, len(current_sizes),
                                   thresholds=(cfg.threshold,))[-1]
    chosen = choose(rows, max_cost)
    gain = paired_bootstrap_ci(np.asarray(reference["dice"]), np.asarray(chosen["dice"]))
    meta = {"checkpoint": str(checkpoint), "variant": cfg.variant, "input_size": base, "data": str(data_root),
            "split": split, "n_images": len(samples), "flips": flips, "device": str(dev), "candidates": list(sizes),
            "max_sizes": max_sizes, "max_cost": max_cost, "thresholds": list(THRESHOLDS),
            "seconds": time.perf_counter() - t0}
    out.mkdir(parents=True, exist_ok=True)
    summary = {k: v for k, v in chosen.items() if k != "dice"}
    (out / "study.json").write_text(json.dumps({"meta": meta, "chosen": summary,
                                                "reference": {k: v for k, v in reference.items() if k != "dice"},
                                                "gain_vs_reference": gain, "rows": rows,
                                                "stems": [s.stem for s in samples]}, indent=1), encoding="utf-8")
    with (out / "study.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["sizes", "threshold", "cost", "passes_per_image", "mean_dice"])
        for r in rows:
            w.writerow(["+".join(map(str, r["sizes"])), r["threshold"], round(r["cost"], 4),
                        network_passes(flips, r["sizes"]), round(r["mean_dice"], 6)])
    _plot(rows, chosen, reference, max_cost, out / "dice_vs_cost.png")
    (out / "STUDY.md").write_text(_markdown(meta, rows, chosen, reference, gain), encoding="utf-8")
    click.echo(f"chosen: sizes {'+'.join(map(str, chosen['sizes']))}, threshold {chosen['threshold']:.2f}: "
               f"mean Dice {chosen['mean_dice']:.4f} (current {reference['mean_dice']:.4f}; "
               f"difference {gain['mean_diff']:+.4f} [{gain['low']:+.4f}, {gain['high']:+.4f}]), cost "
               f"{chosen['cost']:.2f}x; wrote {out}/STUDY.md")


if __name__ == "__main__":
    main()
