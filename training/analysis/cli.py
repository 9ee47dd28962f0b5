"""``effiseg-analyze``: where a checkpoint answers wrong, and with which image attributes."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from effiseg.runtime.cli import TTA_CHOICE_OPTION, tta_sizes_option
from effiseg.runtime.console import Command
from effiseg.runtime.model_info import describe_tta

from ..data import DEFAULT_DATA_ROOT as DEFAULT_DATA


def _progress(desc: str):
    from tqdm.auto import tqdm

    def wrap(items):
        return tqdm(items, desc=desc, unit="img", file=sys.stderr, leave=False)
    return wrap


@click.command(cls=Command, context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.argument("checkpoint", type=click.Path(path_type=Path, exists=True), required=False)
@click.option("--data", "data_root", default=DEFAULT_DATA,
              help="Dataset root (with --split) or an images/+masks/ folder (with --split none).")
@click.option("--split", default="validation",
              help="train, validation, test, or 'none' to read --data/images and --data/masks. Validation by "
                   "default: what the analysis finds shapes the next change, and a change shaped on the test "
                   "split makes its test figure optimistic; give --split test for a final report.")
@click.option("--sweep-split", default="validation",
              help="Split whose predictions feed the threshold sweep; 'none' sweeps the analysed images "
                   "(never choose a threshold on test).")
@click.option("--probabilities", "prob_file", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              default=None, help="Analyse probability maps saved earlier (.npz from --save-probabilities) "
                                 "instead of running CHECKPOINT.")
@click.option("--sweep-probabilities", "sweep_prob_file",
              type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="With --probabilities: saved maps of the --sweep-split images.")
@click.option("--save-probabilities", "save_prob_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Write the analysed images' probability maps (float16 .npz) for re-analysis elsewhere; the "
                   "sweep split's go beside it with a '-<split>' suffix.")
@click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
@click.option("--batch-size", type=click.IntRange(1), default=8)
@click.option("--threshold", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Probability threshold (default: the --tta choice's recommended one, else the checkpoint's, "
                   "else 0.5).")
@TTA_CHOICE_OPTION
@click.option("--tta-sizes", default=None, callback=tta_sizes_option, metavar="SIZES",
              help="Replace the multi-scale sizes of --tta, e.g. 352,416 [default: those of the choice].")
@click.option("--cases", "n_cases", type=click.IntRange(0), default=8, help="Worst cases drawn as panels in the report.")
@click.option("--boundary-px", type=click.FloatRange(0, min_open=True), default=5.0,
              help="Errors within this many pixels of the true boundary are boundary errors.")
@click.option("--worst-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.1,
              help="Share of images (lowest Dice) compared with the rest.")
@click.option("--output", "out_dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Report folder (default: <checkpoint dir>/analysis-<split>).")
@click.option("--limit", type=click.IntRange(1), default=None, help="Analyse only the first N images (and N sweep images).")
@click.option("--title", default=None, help="Report title.")
@click.option("--no-report", is_flag=True, help="Write only the CSV/JSON tables, no Markdown or figures.")
def analyze_command(checkpoint, data_root, split, sweep_split, prob_file, sweep_prob_file, save_prob_file, device,
                    batch_size, threshold, tta, tta_sizes, n_cases, boundary_px, worst_fraction, out_dir, limit, title, no_report):
    """Failure analysis of CHECKPOINT on a split: per-image metrics and attributes (CSV/JSON), Dice by
    attribute bucket, worst cases vs the rest, threshold sweep, calibration, and a Markdown report."""
    from ..data import DatasetError, load_split
    from .analyze import (analyze_predictions, load_probabilities, match_probabilities, save_probabilities,
                          write_outputs)

    if checkpoint is None and prob_file is None:
        raise click.UsageError("give a CHECKPOINT or --probabilities")
    if checkpoint is not None and prob_file is not None:
        raise click.UsageError("give a CHECKPOINT or --probabilities, not both")
    if sweep_prob_file is not None and prob_file is None:
        raise click.UsageError("--sweep-probabilities goes with --probabilities")
    if out_dir is None:
        if checkpoint is None:
            raise click.UsageError("--output is required with --probabilities")
        from ..cli import default_output_dir
        out_dir = default_output_dir(checkpoint, "analysis", split)
    analysed_split = None if split == "none" else split
    sweep_name = None if sweep_split == "none" else sweep_split
    if analysed_split is None and sweep_name is not None and prob_file is None:
        click.echo(f"note: --split none reads a folder without splits; sweeping the analysed images "
                   f"instead of '{sweep_name}'", err=True)
        sweep_name = None

    t0 = time.perf_counter()
    try:
        samples = load_split(data_root, analysed_split)[:limit]
        click.echo(f"loaded {len(samples)} images from {data_root} ({split})", err=True)
        sweep_samples = None
        if sweep_name is not None and sweep_name != analysed_split and (prob_file is None or sweep_prob_file):
            sweep_samples = load_split(data_root, sweep_name)[:limit]
        meta = {"data": str(data_root), "split": split}
        sweep_probs = None
        if prob_file is not None:
            probs = match_probabilities(samples, load_probabilities(prob_file), prob_file)
            thr = 0.5 if threshold is None else float(threshold)
            meta["probabilities"] = str(prob_file)
            if sweep_samples is not None:
                sweep_probs = match_probabilities(sweep_samples, load_probabilities(sweep_prob_file), sweep_prob_file)
        else:
            from ..checkpoint import load_model
            from ..evaluate import predict_probabilities
            from ..tta import resolve_tta_choice
            from ..trainer import resolve_device
            dev = resolve_device(device)
            model, cfg = load_model(checkpoint, device=dev)
            # The run-time --tta choice, as effiseg-run and effiseg-eval take it (default: one pass).
            choice = tta
            tta, tta_sizes, recommended_threshold = resolve_tta_choice(cfg, choice, tta_sizes)
            if threshold is None:
                threshold = recommended_threshold
            thr = float(cfg.threshold if threshold is None else threshold)
            click.echo(f"predicting with {cfg.variant} on {dev} ({describe_tta(tta, tta_sizes)})", err=True)
            probs = predict_probabilities(model, cfg, [s.image for s in samples], device=dev,
                                          batch_size=batch_size, tta=tta, tta_sizes=tta_sizes)
            if sweep_samples is not None:
                sweep_probs = predict_probabilities(model, cfg, [s.image for s in sweep_samples], device=dev,
                                                    batch_size=batch_size, tta=tta, tta_sizes=tta_sizes)
            meta.update(checkpoint=str(checkpoint), variant=cfg.variant, input_size=cfg.input_size,
                        tta_choice=choice, tta=tta, device=str(dev))
            if tta_sizes:
                meta["tta_sizes"] = list(tta_sizes)
        if save_prob_file is not None:
            save_probabilities(save_prob_file, [s.stem for s in samples], probs)
            click.echo(f"wrote {save_prob_file}", err=True)
            if sweep_probs is not None and prob_file is None:
                extra = save_prob_file.with_name(f"{save_prob_file.stem}-{sweep_name}{save_prob_file.suffix}")
                save_probabilities(extra, [s.stem for s in sweep_samples], sweep_probs)
                click.echo(f"wrote {extra}", err=True)
        if sweep_name is not None and sweep_name == analysed_split:
            sweep_source = f"{sweep_name} split (the analysed images)"
        elif sweep_probs is not None:
            sweep_source = f"{sweep_name} split"
        else:
            sweep_source = f"the analysed images ({split})"
        if "test" in (sweep_name, split if sweep_probs is None else None):
            click.echo("warning: the threshold sweep runs on the test images; do not pick a threshold from it",
                       err=True)
        result = analyze_predictions(
            samples, probs, thr, sweep_probabilities=sweep_probs,
            sweep_masks=[s.mask for s in sweep_samples] if sweep_probs is not None else None,
            sweep_source=sweep_source, boundary_band_px=boundary_px, worst_fraction=worst_fraction,
            n_worst_cases=n_cases, meta=meta, progress=_progress("analysing"))
        paths = write_outputs(result, out_dir)
        report = None
        if not no_report:
            from .report import write_report
            report = write_report(result, out_dir, title=title or f"EffiSegNet failure analysis ({split})")
    except (FileNotFoundError, DatasetError, ValueError, KeyError, RuntimeError, ImportError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)

    s, det = result.summary, result.detection
    best = max(result.sweep, key=lambda p: p["mean_dice"])
    click.echo(f"{split} ({s['n_images']} images, threshold {thr:g}): mean Dice {s['mean_dice']:.4f}  "
               f"recall {s['mean_recall']:.4f}  precision {s['mean_precision']:.4f}")
    click.echo(f"polyps found {det['found']}/{det['gt_polyps']}, false-positive regions {det['fp_regions']}; "
               f"boundary share of error pixels {result.errors['boundary_share']:.1%}")
    top = [t for t in result.worst["attributes"] if t["kind"] == "input"][:3]
    click.echo("strongest input attributes (Spearman rho with Dice): "
               + ", ".join(f"{t['attribute']} {t['spearman_rho']:+.2f}" for t in top))
    click.echo(f"threshold sweep on {result.sweep_source}: best mean Dice {best['mean_dice']:.4f} at "
               f"{best['threshold']:g}; pixel ECE {result.calibration['ece']:.4f}")
    for p in list(paths.values()) + ([report] if report else []):
        click.echo(f"wrote {p}")
    click.echo(f"done in {time.perf_counter() - t0:.1f} s", err=True)


if __name__ == "__main__":  # pragma: no cover
    analyze_command()
