"""Ship the protocol's winner as the project's default model, in one step.

    python -m effiseg.training.protocol ship --out <protocol folder> --data <kvasir-seg root>

reads ``protocol_results.json`` (the winning arm and inference settings, chosen on validation, and the
run shipped for it: the winner's seed with the best validation Dice), then

1. builds the Hugging Face style folder (``effiseg-model-card``'s code: weights, config with the
   winner's threshold and TTA, a card whose metrics are measured now, on the same data the runtime and
   ``effiseg-eval`` read) with the training facts and the multi-seed evidence written from the
   protocol's own files;
2. exports the bundled ONNX model from that folder (parity-checked against PyTorch);
3. only when both succeeded, swaps the new folder and ONNX file in for the old ones, so a failure at
   any step leaves the shipped model as it was.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

from .protocol_common import describe_cut_short, run_training_extent
from .protocol_common import parse_config_key as parse_settings_key


WORK_NAME = ".effiseg-ship"


class ShipError(RuntimeError):
    pass


def _swap(folder: Path, new_folder: Path, folder_previous: Path, files: list[tuple[Path, Path]],
          files_previous: Path, log) -> None:
    """Put ``new_folder`` at ``folder`` and each new file at its place, keeping the old ones aside
    until all are in; on any failure undo what was done, so the old model stays whole."""
    done: list[tuple[Path, Path]] = []  # (moved from, moved to), undone in reverse order

    def move(src: Path, dst: Path) -> None:
        dst.parent.mkdir(parents=True, exist_ok=True)
        src.replace(dst) if src.is_file() else src.rename(dst)
        done.append((src, dst))

    try:
        if folder.exists():
            move(folder, folder_previous / folder.name)
        move(new_folder, folder)
        for target, new in files:
            if target.exists():
                move(target, files_previous / target.name)
            if new.exists():
                move(new, target)
    except BaseException as e:
        for src, dst in reversed(done):
            try:
                if src.exists() and src.is_dir():
                    shutil.rmtree(src)
                dst.replace(src) if dst.is_file() else dst.rename(src)
            except OSError as undo_error:
                raise ShipError(f"swapping in the new model failed ({e}) and undoing it failed too "
                                f"({undo_error}); the previous model is in {folder_previous} and "
                                f"{files_previous}") from None
        raise ShipError(f"swapping in the new model failed, the previous one is back in place: {e}") from None
    log(f"replaced {folder} and {', '.join(str(t) for t, _ in files if t.exists())}")


def parse_config_key(key: str) -> dict:
    """``"tta=1,thr=0.60,minreg=0"`` -> the checkpoint settings it stands for."""
    try:
        return parse_settings_key(key)
    except ValueError as e:
        raise ShipError(str(e)) from None


def _mean_sd(stat: dict) -> str:
    return f"{stat['mean']:.4f} ± {stat['std']:.4f} (n={stat['n']} seeds)"


def evidence_markdown(results: dict, protocol_dir: Path) -> str:
    """The card's evidence section, from protocol_results.json alone (numbers are not retyped)."""
    w, plan = results["winner"], results.get("plan", {})
    g = w["gain_vs_baseline"]
    spread = results.get("baseline_spread", {}).get("test_dice_per_seed", {})
    cut = describe_cut_short(results.get("training") or {})
    lines = [
        f"Multi-seed protocol (`{protocol_dir.name}/PROTOCOL.md`): {len(results.get('arms', {}))} training arms x "
        f"{len(plan.get('seeds', w['seeds']))} seeds, {plan.get('epochs', '?')} epochs {'planned ' if cut else ''}each; "
        "every choice made on the validation split, the test split read once at the end.",
        "",
        f"- Winner: arm `{w['arm']}` with inference settings `{w['config']}`.",
        f"- Test Dice over its seeds {_mean_sd(w['test_dice'])}; IoU {_mean_sd(w['test_iou'])}; precision "
        f"{_mean_sd(w['test_precision'])}; recall {_mean_sd(w['test_recall'])}.",
        f"- Per-image test Dice difference against the baseline (plain inference), paired by seed and image: "
        f"{g['mean_diff']:+.4f}, 95% bootstrap interval [{g['low']:+.4f}, {g['high']:+.4f}]"
        + (f"; per seed {', '.join(f'{d:+.4f}' for d in g['per_seed_diff'])}" if g.get("per_seed_diff") else "")
        + ".",
    ]
    t = w.get("gain_vs_tuned_baseline")
    if t:
        lines.append(f"- What the training change adds beyond inference: against the baseline with its own best "
                     f"inference (`{t['baseline_config']}`, chosen on validation) {t['mean_diff']:+.4f}, 95% interval "
                     f"[{t['low']:+.4f}, {t['high']:+.4f}]"
                     + (f"; per seed {', '.join(f'{d:+.4f}' for d in t['per_seed_diff'])}" if t.get("per_seed_diff") else "")
                     + ".")
    if cut:
        lines.append(f"- Training was cut short: {cut}.")
    if spread:
        values = list(spread.values())
        lines.append(f"- Run-to-run spread of the baseline itself: test Dice "
                     f"{', '.join(f'{v:.4f}' for v in values)} (range {max(values) - min(values):.4f}).")
    lines.append(f"- Shipped: `{w['ship_run']}`, the winner's seed with the best validation Dice.")
    return "\n".join(lines)


def _read_json(path: Path, default):
    """The JSON file's content, or ``default`` when there is no such file."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else default


def _epochs_fact(planned: int, completed: int, best: dict) -> str:
    text = (f"{planned}" if completed >= planned else
            f"{completed} of the planned {planned} (stopped early, e.g. at a session's deadline: the "
            "learning-rate schedule did not finish)")
    return text + (f" (best validation Dice at epoch {best['best_epoch']})" if best.get("best_epoch") else "")


def provenance(results: dict, run_dir: Path, protocol_dir: Path) -> dict:
    """Training facts for the card, read from the shipped run's own files."""
    run_config = json.loads((run_dir / "run_config.json").read_text(encoding="utf-8"))
    train = run_config["train"]
    history = _read_json(run_dir / "metrics.json", default=[])
    best = _read_json(run_dir / "best.json", default={})
    plan = results.get("plan", {})
    w = results["winner"]
    overrides = (plan.get("arms") or {}).get(w["arm"])
    speeds = [h["train_images_per_s"] for h in history if "train_images_per_s" in h]
    facts = {
        "Data": "Kvasir-SEG official EffiSegNet split: 800 train, 100 validation (checkpoint, arm and inference "
                "choices), 100 test (reported once)",
        "Recipe": (f"the paper's augmentation and Dice + BCE loss, AdamW lr {train['lr']}, weight decay "
                   f"{train['weight_decay']}, cosine to {train['min_lr']}, batch {train['batch_size']}, "
                   f"{run_config['model'].get('input_size')}x{run_config['model'].get('input_size')}; arm "
                   f"`{w['arm']}`: " + (", ".join(overrides) if overrides else "no changes")),
        "Epochs": _epochs_fact(train["epochs"], (run_training_extent(run_dir) or {}).get("completed", train["epochs"]),
                               best),
        "Seed": str(train["seed"]),
        "Hardware": f"{run_config.get('device_name', run_config.get('device'))} (torch {run_config.get('torch')}), "
                    f"{plan.get('parallel', '?')} runs at once",
        "Inference settings": f"`{w['config']}`, chosen on the validation split by the protocol",
        "Run log": f"{protocol_dir.name}/ (PROTOCOL.md, protocol_results.json, runs/{run_dir.name}/)",
    }
    if speeds:
        facts["Training speed"] = f"{sum(speeds) / len(speeds):.1f} images/s per run (mean over epochs)"
    return facts


def smoke_test_signs(protocol_dir: Path, run_dir: Path) -> list[str]:
    """Why a protocol folder looks like a smoke test rather than a result to ship: runs trained on
    part of the data, evaluations on part of a split."""
    def read(path: Path) -> dict | None:
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:  # e.g. cut short when an evaluation was stopped at a deadline
            signs.append(f"{path} cannot be read ({type(e).__name__}: {e})")
            return None

    signs: list[str] = []
    config_path = run_dir / "run_config.json"
    if config_path.is_file():
        train = (read(config_path) or {}).get("train", {})
        limits = {k: train[k] for k in ("limit_train", "limit_val", "limit_test") if train.get(k)}
        if limits:
            signs.append(f"{run_dir.name} was trained with {limits}")
    for evaluation in sorted((protocol_dir / "evaluations").glob("*.json")):
        limit = (read(evaluation) or {}).get("limit")
        if limit:
            signs.append(f"{evaluation.name} scored only the first {limit} images of each split")
    return signs


def ship_winner(protocol_dir: str | Path, destination: str | Path, onnx_path: str | Path,
                data_root: str | Path, device: str = "cpu", log: Callable[[str], None] = print,
                force: bool = False) -> dict:
    """``force`` ships even a smoke-test protocol or a model whose validation Dice is below the
    current default's (both refused otherwise, with the reason)."""
    from effiseg.export.onnx_export import ExportError, export_checkpoint

    from .checkpoint import read_config_file
    from .model_card import make_model_folder

    protocol_dir, destination, onnx_path = Path(protocol_dir), Path(destination).resolve(), Path(onnx_path).resolve()
    if destination.parent == destination or onnx_path.suffix.lower() != ".onnx":
        raise ShipError(f"ship needs a model folder and an .onnx file, got {destination} and {onnx_path}")
    swapped = False
    results_path = protocol_dir / "protocol_results.json"
    if not results_path.is_file():
        raise ShipError(f"{results_path} not found: run `protocol report` first")
    results = json.loads(results_path.read_text(encoding="utf-8"))
    winner = results.get("winner")
    if not winner or "ship_run" not in winner:
        raise ShipError(f"{results_path} names no winner to ship")
    run_dir = protocol_dir / "runs" / winner["ship_run"]
    checkpoint = run_dir / "best.safetensors"
    if not checkpoint.is_file():
        raise ShipError(f"the winner's checkpoint {checkpoint} is missing (unpack checkpoints.tar.part-* there)")
    settings = parse_config_key(winner["config"])
    if settings.get("min_region_px", 0) > 0 and not force:
        # The card would measure the checkpoint with region removal, but effiseg-run and the exported
        # model do not remove regions: users would not get the card's figures.
        raise ShipError(f"the winner ({winner['config']}) removes predicted regions below "
                        f"{settings['min_region_px']} px, which the exported model and effiseg-run do not do, so "
                        "the card's metrics would not be what users get; pass --force to ship it anyway "
                        "(effiseg-export then warns of the difference)")
    signs = smoke_test_signs(protocol_dir, run_dir)
    if signs and not force:
        raise ShipError("this protocol looks like a smoke test, not a result to ship: " + "; ".join(signs[:3])
                        + ("" if len(signs) <= 3 else f" (+{len(signs) - 3} more)") + ". Pass --force to ship it anyway")

    # Work areas next to what they replace (same file system, so the swap is renames). The staged
    # folder and file carry their final names, so the ONNX metadata and export report name them right.
    work, onnx_work = destination.parent / WORK_NAME, onnx_path.parent / WORK_NAME
    for w in {work, onnx_work}:
        if (w / "previous").exists():
            raise ShipError(f"an earlier ship was interrupted while swapping: the model it replaced is in "
                            f"{w / 'previous'}; move it back (or delete it if the current model is wanted), "
                            f"then remove {w}")
        shutil.rmtree(w, ignore_errors=True)
    staged_dir = work / "new" / destination.name
    staged_onnx = onnx_work / "new" / onnx_path.name
    sidecar_name = onnx_path.name + ".export.json"
    try:
        log(f"model folder from {checkpoint} with {settings} (measuring validation and test) ...")
        make_model_folder(checkpoint, staged_dir, data_root, provenance(results, run_dir, protocol_dir),
                          {"summary": evidence_markdown(results, protocol_dir)}, settings, device,
                          role="effiseg default model")
        config = read_config_file(staged_dir / "config.json")
        # Against the model it replaces, on validation (the split choices are made on).
        current_path = destination / "config.json"
        current = _read_json(current_path, default={}).get("metrics", {})
        new_val = config.metrics["validation"]["mean_dice"]
        old_val = current.get("validation", {}).get("mean_dice")
        if old_val is not None:
            log(f"validation Dice: {new_val:.4f} (new) against {old_val:.4f} (current default)")
            if new_val < old_val and not force:
                raise ShipError(f"the winner's validation Dice {new_val:.4f} is below the current default's "
                                f"{old_val:.4f}; nothing was replaced (pass --force to ship it anyway)")
        verify = Path(data_root) / "validation" / "images"
        log("exporting the ONNX model ...")
        try:
            report = export_checkpoint(staged_dir, staged_onnx, tta=settings["tta"], threshold=settings["threshold"],
                                       tta_sizes=settings.get("tta_sizes", ()),
                                       verify_dir=verify if verify.is_dir() else None, log=log)
        except ExportError as e:
            raise ShipError(f"ONNX export failed, nothing was replaced: {e}") from None
        _swap(destination, staged_dir, work / "previous",
              [(onnx_path, staged_onnx), (onnx_path.with_name(sidecar_name), staged_onnx.with_name(sidecar_name))],
              onnx_work / "previous", log)
        swapped = True
    finally:
        for w in {work, onnx_work}:
            previous = w / "previous"
            # Kept only when a failed swap could not be undone: it then holds the previous model.
            if swapped or not (previous.exists() and any(previous.iterdir())):
                shutil.rmtree(w, ignore_errors=True)
    test = config.metrics["test"]
    summary = {"shipped_run": winner["ship_run"], "arm": winner["arm"], "settings": settings,
               "folder": str(destination), "onnx": str(onnx_path), "onnx_sha256": report.get("sha256"),
               "test_dice": test["mean_dice"], "test_iou": test["mean_iou"],
               "validation_dice": config.metrics["validation"]["mean_dice"],
               "protocol_test_dice_over_seeds": winner["test_dice"]}
    log(f"shipped {winner['ship_run']}: test Dice {test['mean_dice']:.4f} (this run), "
        f"{_mean_sd(winner['test_dice'])} over the winner's seeds -> {destination}, {onnx_path}")
    return summary
