"""``effiseg-robustness``: Dice of a checkpoint under shifts that mimic other hospitals' endoscopes."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from effiseg.runtime.cli import TTA_CHOICE_OPTION, tta_sizes_option
from effiseg.runtime.console import Command

from ..data import DEFAULT_DATA_ROOT as DEFAULT_DATA
from .shifts import SHIFTS


@click.command(cls=Command, context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.argument("checkpoint", type=click.Path(path_type=Path, exists=True))
@click.option("--data", "data_root", default=DEFAULT_DATA,
              help="Dataset root (with --split) or an images/+masks/ folder (with --split none).")
@click.option("--split", default="validation",
              help="train, validation, test or 'none'. Validation by default: the score steers model "
                   "choices, and a choice steered by the test split makes its test figure optimistic.")
@click.option("--shifts", "shift_spec", default="all", help=f"Comma-separated shifts, or all: {', '.join(SHIFTS)}.")
@click.option("--strengths", default="0.25,0.5,1", help="Strengths in (0, 1] per shift; the clean pass (0) always runs.")
@click.option("--score-strength", type=click.FloatRange(0, 1, min_open=True), default=0.5,
              help="Strength at which the robustness score (mean Dice over the shifts) is taken; one of --strengths.")
@click.option("--seed", type=int, default=0, help="Seed of the shifts' random draws (noise, warm or cool, axis).")
@click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
@click.option("--batch-size", type=click.IntRange(1), default=4)
@click.option("--threshold", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Probability threshold (default: the checkpoint's, else 0.5).")
@TTA_CHOICE_OPTION
@click.option("--tta-sizes", default=None, callback=tta_sizes_option, metavar="SIZES",
              help="Replace the multi-scale sizes of --tta, e.g. 352,416 [default: those of the choice].")
@click.option("--limit", type=click.IntRange(1), default=None, help="Only the first N images.")
@click.option("--output", "out_dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Result folder (default: <checkpoint dir>/robustness-<split>).")
@click.option("--no-figure", is_flag=True, help="Write only JSON, CSV and Markdown, no PNG.")
def robustness_command(checkpoint, data_root, split, shift_spec, strengths, score_strength, seed, device, batch_size,
                       threshold, tta, tta_sizes, limit, out_dir, no_figure):
    """Evaluate CHECKPOINT on a split clean and under controlled, seeded shifts (colour temperature,
    gamma, contrast, JPEG, defocus, sensor noise, resolution, vignetting, border layout, aspect):
    Dice against strength (CSV/JSON/PNG) and a robustness score (mean Dice over the shifts at
    --score-strength) with its drop from clean and a bootstrap interval."""
    from .robustness import parse_strengths
    from .shifts import parse_shifts
    try:
        names = parse_shifts(shift_spec)
        levels = parse_strengths(strengths)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    if score_strength not in levels:
        raise click.BadParameter(f"--score-strength {score_strength:g} is not one of --strengths {strengths}")
    if out_dir is None:
        from ..cli import default_output_dir
        out_dir = default_output_dir(checkpoint, "robustness", split)

    t0 = time.perf_counter()
    try:
        from ..checkpoint import load_model
        from ..data import DatasetError, load_split
        from ..trainer import resolve_device
        from .robustness import run_robustness, write_outputs
        samples = load_split(data_root, None if split == "none" else split, limit)
        dev = resolve_device(device)
        model, cfg = load_model(checkpoint, device=dev)
        # The run-time --tta choice, as effiseg-run and effiseg-eval take it (default: one pass).
        from ..tta import resolve_tta_choice
        flips, sizes, recommended_threshold = resolve_tta_choice(cfg, tta, tta_sizes)
        if threshold is None:
            threshold = recommended_threshold  # None: the checkpoint's own
        n_passes = 1 + len(names) * len(levels)
        click.echo(f"{len(samples)} images from {data_root} ({split}); {cfg.variant} on {dev}, "
                   f"{'flip TTA' if flips else 'one pass'}{f', sizes {list(sizes)}' if sizes else ''}; "
                   f"{n_passes} passes ({len(names)} shifts x {len(levels)} strengths + clean)", err=True)
        result = run_robustness(model, cfg, samples, names, levels, score_strength, seed=seed, device=dev,
                                batch_size=batch_size, threshold=threshold, tta=flips, tta_sizes=sizes,
                                log=lambda m: click.echo(m, err=True))
        result["settings"].update(checkpoint=str(checkpoint), data=str(data_root), split=split,
                                  variant=cfg.variant, device=str(dev))
        paths = write_outputs(result, out_dir, figure=not no_figure, example=samples[0])
    except (FileNotFoundError, DatasetError, ValueError, KeyError, RuntimeError, ImportError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)

    score = result["score"]
    d = score["drop"]
    click.echo(f"{split} ({len(samples)} images): clean Dice {score['clean_dice']:.4f}; robustness score "
               f"{score['robustness_score']:.4f} at strength {score_strength:g} (change {d['mean_diff']:+.4f}, "
               f"95 % CI [{d['low']:+.4f}, {d['high']:+.4f}])")
    worst = score["shifts_by_harm"][:3]
    click.echo("hurt most: " + ", ".join(f"{n} {score['per_shift_drop'][n]['mean_diff']:+.4f}" for n in worst))
    for p in paths:
        click.echo(f"wrote {p}")
    click.echo(f"done in {time.perf_counter() - t0:.1f} s", err=True)


if __name__ == "__main__":  # pragma: no cover
    robustness_command()
