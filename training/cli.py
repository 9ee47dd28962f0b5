"""``effiseg-train``, ``effiseg-eval`` and ``effiseg-model-card``."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from effiseg.runtime.cli import TTA_CHOICE_OPTION, TTA_SIZES_OPTION, tta_sizes_option
from effiseg.runtime.console import Command
from effiseg.runtime.hub import HubError, HubModel, ModelLocation, parse_hub_id, resolve_model

from .data import DEFAULT_DATA_ROOT as DEFAULT_DATA

CONTEXT = {"show_default": True, "help_option_names": ["-h", "--help"]}
PROBABILITY = click.FloatRange(0, 1, min_open=True, max_open=True)


def default_output_dir(checkpoint: Path | HubModel, kind: str, split: str) -> Path:
    """<run folder>/<kind>-<split> beside the checkpoint, except for a model shipped inside the
    package (the bundled default) or fetched from the Hub: results never go into site-packages,
    the source tree's weights or the Hugging Face cache, but into ./<kind>-<model>-<split>."""
    if isinstance(checkpoint, HubModel):
        return Path(f"{kind}-{checkpoint.name}-{split}")
    folder = Path(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint).parent
    package = Path(__file__).resolve().parent
    if package in folder.resolve().parents:
        return Path(f"{kind}-{folder.name}-{split}")
    return folder / f"{kind}-{split}"


@click.command(cls=Command, context_settings=CONTEXT)
@click.option("--data", "data_root", default=DEFAULT_DATA, help="Kvasir-SEG root holding train/ validation/ test/.")
@click.option("--variant", default="effisegnet-lite2", help="Model variant (see --list-variants).")
@click.option("--input-size", type=int, default=None, help="Square input size (default: the variant's).")
@click.option("--epochs", type=click.IntRange(1), default=100)
@click.option("--batch-size", type=click.IntRange(2), default=8, help="Images per step (BatchNorm needs two).")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=1e-4)
@click.option("--min-lr", type=click.FloatRange(0), default=1e-5, help="Cosine decay floor.")
@click.option("--seed", type=int, default=0)
@click.option("--seeds", default=None, metavar="S1,S2,...",
              help="Train several seeds in this one process, each on its own CUDA stream (fit_together); "
                   "--output must then hold {seed}, e.g. runs/lite2_s{seed}.")
@click.option("--step", type=click.Choice(["auto", "eager", "fast", "graph"]), default="auto",
              help="Train step: auto picks a CUDA graph on a GPU (fp32/bf16) and eager on the CPU; fast is the "
                   "graph's code uncaptured (training/README.md).")
@click.option("--plateau-patience", type=click.IntRange(1), default=None,
              help="Stop when validation Dice has not improved for N epochs (see also --set plateau_min_delta=...).")
@click.option("--device", default="auto",
              help="auto, cpu, cuda or cuda:N. With --resume, anything but auto replaces the run's recorded device.")
@click.option("--output", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Run folder (default: runs/<variant>-s<seed>-<time>).")
@click.option("--resume", "resume_dir", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="Continue an interrupted run folder exactly where it stopped.")
@click.option("--deterministic", is_flag=True, help="Deterministic kernels (slower on GPU).")
@click.option("--amp", type=click.Choice(["auto", "bf16", "fp16", "off"]), default="auto")
@click.option("--no-pretrained", is_flag=True, help="Random encoder initialisation (no ImageNet weights).")
@click.option("--deep-supervision", is_flag=True)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Any setting, e.g. --set augment.overlay_box_p=0.5 --set loss.boundary_weight=2.")
@click.option("--limit-train", type=click.IntRange(2), default=None, help="Use only the first N training images.")
@click.option("--limit-val", type=click.IntRange(1), default=None)
@click.option("--limit-test", type=click.IntRange(1), default=None)
@click.option("--no-test", is_flag=True, help="Skip the test-split evaluation at the end.")
@click.option("--no-progress", is_flag=True, help="One log line per epoch instead of a progress bar.")
@click.option("--stop-after-epochs", type=click.IntRange(1), default=None,
              help="End this session after N more epochs (continue later with --resume).")
@click.option("--list-variants", is_flag=True, help="Print the known variants and exit.")
def train_command(data_root, variant, input_size, epochs, batch_size, lr, min_lr, seed, seeds, step, plateau_patience,
                  device, out_dir, resume_dir, deterministic, amp, no_pretrained, deep_supervision, overrides,
                  limit_train, limit_val, limit_test, no_test, no_progress, stop_after_epochs, list_variants):
    """Train EffiSegNet on Kvasir-SEG (the paper's recipe by default)."""
    from .variants import get_variant, list_variants as names
    if list_variants:
        for n in names():
            v = get_variant(n)
            click.echo(f"{n:20s} encoder={v.encoder:24s} size={v.input_size} weights={v.weights_source}")
        return
    from .trainer import TrainConfig, Trainer, fit_together
    seed_list = _seed_list(seeds, out_dir) if seeds else None
    try:
        if resume_dir:
            trainer = Trainer(TrainConfig(), resume_dir, progress=not no_progress)
            result = trainer.fit(resume=True, stop_after_epochs=stop_after_epochs,
                                 device=None if device == "auto" else device)
            out = resume_dir
        else:
            cfg = TrainConfig(data_root=str(data_root), variant=variant, input_size=input_size, epochs=epochs,
                              batch_size=batch_size, lr=lr, min_lr=min_lr, seed=seed, device=device,
                              deterministic=deterministic, amp=amp, pretrained=not no_pretrained,
                              deep_supervision=deep_supervision, eval_test=not no_test, limit_train=limit_train,
                              limit_val=limit_val, limit_test=limit_test, step=step, plateau_patience=plateau_patience)
            cfg.apply_overrides(list(overrides))
            cfg.check()  # --set can reach what the options' ranges guard
            get_variant(cfg.variant)
            if seed_list:
                import dataclasses
                outs = [Path(str(out_dir).replace("{seed}", str(s))) for s in seed_list]
                for o in outs:
                    if (o / "resume_state.pt").exists():
                        raise click.UsageError(f"{o} already holds a run; use another --output")
                trainers = [Trainer(dataclasses.replace(cfg, seed=s), o, progress=False) for s, o in zip(seed_list, outs)]
                results = fit_together(trainers)
                for o, r in zip(outs, results):
                    click.echo(json.dumps({"run_folder": str(o), **r}, indent=2))
                return
            out = out_dir or Path("runs") / f"{cfg.variant}-s{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
            if (Path(out) / "resume_state.pt").exists():
                raise click.UsageError(f"{out} already holds a run; use --resume {out} or another --output")
            result = Trainer(cfg, out, progress=not no_progress).fit(stop_after_epochs=stop_after_epochs)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    click.echo(json.dumps(result, indent=2))
    click.echo(f"run folder: {out}")


def _seed_list(seeds: str, out_dir: Path | None) -> list[int]:
    try:
        values = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise click.BadParameter(f"expected whole numbers separated by commas, got {seeds!r}", param_hint="--seeds") from None
    if not values or len(set(values)) != len(values):
        raise click.BadParameter(f"give distinct seeds, got {seeds!r}", param_hint="--seeds")
    if out_dir is None or "{seed}" not in str(out_dir):
        raise click.UsageError("--seeds needs --output with {seed} in it, e.g. --output runs/lite2_s{seed}")
    return values


@click.command(cls=Command, context_settings=CONTEXT)
@click.argument("checkpoint", type=ModelLocation(exists=True))
@click.option("--data", "data_root", default=DEFAULT_DATA, help="Dataset root (with --split) or an images/+masks/ folder.")
@click.option("--split", default="test", help="train, validation, test, or 'none' to read --data/images and --data/masks.")
@click.option("--device", default="auto")
@click.option("--batch-size", type=click.IntRange(1), default=8)
@click.option("--threshold", type=PROBABILITY, default=None, help="Probability threshold (default: the checkpoint's).")
@TTA_CHOICE_OPTION
@click.option("--tta-sizes", default=None, callback=tta_sizes_option, metavar="SIZES",
              help="Replace the multi-scale sizes of --tta, e.g. 352,416 (multiples of 32; 'none': the input size "
                   "only) [default: those of the choice].")
@click.option("--min-region", type=click.IntRange(0), default=None,
              help="Remove predicted regions smaller than N pixels (default: the checkpoint's setting, else 0).")
@click.option("--output", "out_dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Folder for metrics.json and per_image.csv (default: <run folder>/eval-<split>; for a model "
                   "inside the installed package, ./eval-<model>-<split>).")
@click.option("--save-masks", is_flag=True, help="Also write predicted masks as PNG.")
def eval_command(checkpoint, data_root, split, device, batch_size, threshold, tta, tta_sizes, min_region, out_dir,
                 save_masks):
    """Evaluate a checkpoint (a folder, its config.json or .safetensors, or a Hugging Face Hub model
    hf://OWNER/NAME[@REVISION]) on a split: metrics JSON, per-image CSV, optional mask PNGs."""
    from .checkpoint import load_model
    from .data import DatasetError, load_split
    from .evaluate import evaluate_samples, write_mask_pngs
    from .result_files import write_json, write_rows_csv
    from .tta import resolve_tta_choice
    from .trainer import resolve_device
    try:
        dev = resolve_device(device)
        local = resolve_model(checkpoint, "checkpoint")  # a Hub id: its snapshot in the Hugging Face cache
        model, cfg = load_model(local, device=dev)
        samples = load_split(data_root, None if split == "none" else split)
        choice = tta
        tta, tta_sizes, recommended_threshold = resolve_tta_choice(cfg, choice, tta_sizes)
        if threshold is None:
            threshold = recommended_threshold  # None: the checkpoint's own
        min_region = cfg.min_region_px if min_region is None else min_region
        t0 = time.perf_counter()
        summary, rows, logits = evaluate_samples(model, cfg, samples, dev, batch_size, threshold, tta, min_region,
                                                 tta_sizes=tta_sizes)
    except (FileNotFoundError, DatasetError, ValueError, KeyError, RuntimeError, HubError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    summary.update(checkpoint=str(checkpoint), variant=cfg.variant, data=str(data_root), split=split, tta_choice=choice,
                   device=str(dev), seconds=time.perf_counter() - t0)
    if isinstance(checkpoint, HubModel):
        summary["hub_snapshot"] = str(local)  # .../snapshots/<commit>: which commit was measured
    out = out_dir or default_output_dir(checkpoint, "eval", split)
    write_json(out / "metrics.json", summary)
    write_rows_csv(out / "per_image.csv", rows)
    if save_masks:
        write_mask_pngs(out / "masks", samples, logits, summary["threshold"])
    click.echo(f"{cfg.variant} on {split} ({summary['n_images']} images): mean Dice {summary['mean_dice']:.4f}  "
               f"mIoU {summary['mean_iou']:.4f}  precision {summary['mean_precision']:.4f}  "
               f"recall {summary['mean_recall']:.4f}  F1(pooled) {summary['f1_pooled']:.4f}")
    click.echo(f"wrote {out / 'metrics.json'} and {out / 'per_image.csv'}")


@click.command(cls=Command, context_settings=CONTEXT)
@click.argument("checkpoint", type=click.Path(path_type=Path, exists=True))
@click.option("--output", "out_dir", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="Folder to write (config.json, model.safetensors, README.md, and model.onnx with its "
                   "export report): everything a Hugging Face model repository needs.")
@click.option("--data", "data_root", default=DEFAULT_DATA, help="Kvasir-SEG root; the card's metrics are measured on it.")
@click.option("--provenance", type=click.Path(path_type=Path, exists=True), default=None,
              help="JSON of training facts for the card (data, recipe, epochs, seed, hardware, wall time).")
@click.option("--protocol-summary", type=click.Path(path_type=Path, exists=True), default=None,
              help="A Markdown file summarising the multi-seed evidence.")
@click.option("--threshold", type=PROBABILITY, default=None, help="[default: the checkpoint's]")
@click.option("--tta/--no-tta", default=None, help="[default: the checkpoint's]")
@TTA_SIZES_OPTION
@click.option("--min-region", type=click.IntRange(0), default=None, help="[default: the checkpoint's]")
@click.option("--device", default="auto")
@click.option("--role", default=None, help="Shown in the card's title, e.g. 'effiseg default model'.")
@click.option("--onnx/--no-onnx", default=True,
              help="Also export model.onnx (as effiseg-export does, checked against PyTorch; needs effiseg[export]) "
                   "with its report model.onnx.export.json.")
@click.option("--repo", "repo_id", default=None, metavar="OWNER/NAME",
              help="The Hub repository it will be published as: named in the card's commands (hf://OWNER/NAME) "
                   "and metadata [default: placeholders].")
@click.option("--speeds", "speeds_file", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="tta_choices.json of python -m effiseg.benchmarks.tta_choices on this model: the card's images/s "
                   "per --tta choice.")
def model_card_command(checkpoint, out_dir, data_root, provenance, protocol_summary, threshold, tta, tta_sizes,
                       min_region, device, role, onnx, repo_id, speeds_file):
    """Write a publishable model folder (Hugging Face layout) with a measured model card; publish it
    with `hf upload OWNER/NAME FOLDER`."""
    from .model_card import make_model_folder, read_speeds
    from .trainer import resolve_device
    try:
        speeds = read_speeds(speeds_file) if speeds_file else None
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--speeds") from None
    if repo_id is not None:
        try:
            if "@" in repo_id:
                raise ValueError
            parse_hub_id(f"hf://{repo_id}")
        except ValueError:
            raise click.BadParameter(f"expected OWNER/NAME, got {repo_id!r}", param_hint="--repo") from None
    settings = {k: v for k, v in (("threshold", threshold), ("tta", tta), ("min_region_px", min_region),
                                  ("tta_sizes", None if tta_sizes is None else list(tta_sizes))) if v is not None}
    prov = json.loads(Path(provenance).read_text(encoding="utf-8")) if provenance else {}
    proto = {"summary": Path(protocol_summary).read_text(encoding="utf-8")} if protocol_summary else None
    try:
        out = make_model_folder(checkpoint, out_dir, data_root, prov, proto, settings, str(resolve_device(device)),
                                role=role, onnx=onnx, repo_id=repo_id, log=lambda m: click.echo(m, err=True),
                                speeds=speeds)
    except (FileNotFoundError, FileExistsError, ValueError, KeyError, RuntimeError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    files = "config.json, model.safetensors, " + ("model.onnx, model.onnx.export.json, " if onnx else "") + "README.md"
    click.echo(f"wrote {out} ({files}); publish it with: hf upload {repo_id or 'OWNER/NAME'} {out}")


@click.command(cls=Command, context_settings=CONTEXT)
@click.argument("predictions", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--data", "data_root", default=DEFAULT_DATA, help="Dataset root (with --split) or an images/+masks/ folder.")
@click.option("--split", default="test", help="train, validation, test, or 'none'.")
@click.option("--output", "out_json", type=click.Path(path_type=Path), default=None,
              help="Metrics JSON file, with the per-image CSV beside it (same name, .csv); a folder gets "
                   "score-<split>.json/.csv inside (default: PREDICTIONS/score-<split>.json).")
def score_command(predictions, data_root, split, out_json):
    """Score a folder of predicted masks (<stem>.png, e.g. from effiseg-run) against the ground truth,
    with the same metrics as effiseg-eval."""
    from .data import DatasetError, load_split, read_mask, read_or_note
    from .metrics import image_scores, summarize
    from .result_files import write_json, write_rows_csv
    try:
        samples = load_split(data_root, None if split == "none" else split)
    except (FileNotFoundError, DatasetError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    rows, problems = [], []
    for s in samples:
        candidates = [predictions / f"{s.stem}.png", predictions / f"{s.image_path.name}.png"]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            problems.append(f"{s.stem}: no predicted mask ({candidates[0].name}) in {predictions}")
            continue
        pred = read_or_note(read_mask, path, "mask", problems)
        if pred is None:
            continue
        if pred.shape != s.mask.shape:
            problems.append(f"{path}: size {pred.shape[::-1]} differs from the ground truth {s.mask.shape[::-1]}")
            continue
        rows.append({"stem": s.stem, **image_scores(pred, s.mask)})
    if problems:
        more = [f"... and {len(problems) - 20} more"] if len(problems) > 20 else []
        click.echo("error: " + "\n  ".join([f"{len(problems)} problem(s):"] + problems[:20] + more), err=True)
        sys.exit(2)
    summary = summarize(rows)
    summary.update(predictions=str(predictions), data=str(data_root), split=split)
    out_json = out_json or predictions / f"score-{split}.json"
    if out_json.is_dir():
        out_json = out_json / f"score-{split}.json"
    write_json(out_json, summary)
    write_rows_csv(out_json.with_suffix(".csv"), rows)
    click.echo(f"{split} ({summary['n_images']} images): mean Dice {summary['mean_dice']:.4f}  mIoU {summary['mean_iou']:.4f}  "
               f"precision {summary['mean_precision']:.4f}  recall {summary['mean_recall']:.4f}")
