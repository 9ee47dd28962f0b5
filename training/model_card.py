"""A publishable model folder (Hugging Face layout): config.json, model.safetensors, README.md and,
with ``onnx``, model.onnx with its export report model.onnx.export.json.

The card's test metrics are measured when the folder is made (the same code as ``effiseg-eval``),
so the card always matches what a user reproduces: one network pass (what ``effiseg-run`` does by
default) and, side by side, the run-time TTA choice the config recommends (``tta_recommended``), each
with its passes per image and, when a benchmark file is given, its images/s; the ONNX file is exported from the folder's own
checkpoint and config (``effiseg.export.onnx_export.export_checkpoint``, verified against PyTorch),
so it carries the same settings and metrics. Everything is built in a staging folder beside ``out``
and moved in at the end. Uploading is the user's step: ``hf upload OWNER/NAME <folder>``, after which
``effiseg-run --model hf://OWNER/NAME`` runs it.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

from effiseg.runtime.images import atomic_write_text
from effiseg.runtime.model_config import ModelConfig
from effiseg.runtime.replace_file import replace_with_retry

from .checkpoint import CONFIG_NAME, WEIGHTS_NAME, read_config_file, resolve_checkpoint

ONNX_NAME = "model.onnx"
EXPORT_REPORT_NAME = ONNX_NAME + ".export.json"
CARD_NAME = "README.md"
# The model-index entries (Hub metric ids and display names) for the measured means.
HUB_METRICS = (("dice", "mean_dice", "mean Dice"), ("mean_iou", "mean_iou", "mean IoU"),
               ("precision", "mean_precision", "mean precision"), ("recall", "mean_recall", "mean recall"))


def _fmt(v):
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def metadata_header(variant: str, test: dict | None, repo_id: str | None, onnx: bool) -> list[str]:
    """The card's YAML header, which the Hub reads for its filters, licence badge and evaluation
    results (model-index: the test split's means, self-reported)."""
    tags = ["medical-imaging", "polyp-segmentation", "colonoscopy", "efficientnet", "effisegnet"] + (
        ["onnx"] if onnx else [])
    lines = ["---", "license: other", "library_name: effiseg", "pipeline_tag: image-segmentation",
             f"tags: [{', '.join(tags)}]", "datasets: [kvasir-seg]", "metrics: [dice, mean_iou, precision, recall]"]
    if test:
        name = repo_id.split("/", 1)[1] if repo_id else f"effiseg-{variant}"
        lines += ["model-index:", f"- name: {name}", "  results:", "  - task:", "      type: image-segmentation",
                  "      name: Image Segmentation", "    dataset:", "      type: kvasir-seg", "      name: Kvasir-SEG",
                  "      split: test", "    metrics:"]
        for metric_id, key, label in HUB_METRICS:
            lines += [f"    - type: {metric_id}", f"      value: {float(test[key]):.4f}", f"      name: {label}"]
    return lines + ["---"]


def baked_tta(config: ModelConfig | dict) -> bool:
    """Whether the config puts TTA into the exported graph (``tta``/``tta_sizes``: cards made before
    TTA became a run-time choice, or ``--tta``); the run-time choices need the plain network."""
    config = ModelConfig.coerce(config)
    return config.tta or bool(config.tta_sizes)


def card_settings(config: ModelConfig | dict) -> list[dict]:
    """The inference settings a card measures, the default first: one pass at the config's threshold
    (or the TTA the config bakes into the graph), then the run-time choice its ``tta_recommended``
    names (``multiscale`` when it has sizes, else ``flip``) at the recommended threshold."""
    from effiseg.runtime.model_info import network_passes, parse_tta_recommendation

    from .tta import resolve_tta_choice
    config = ModelConfig.coerce(config)
    threshold = config.threshold
    flips, sizes = config.tta, config.tta_sizes
    rows = [{"choice": "in the graph" if baked_tta(config) else "none", "flips": flips, "sizes": list(sizes),
             "threshold": threshold, "passes": network_passes(flips, sizes)}]
    recommended = parse_tta_recommendation(config.tta_recommended)
    if recommended and not baked_tta(config):
        choice = "multiscale" if recommended["sizes"] else "flip"
        flips, sizes, rec_threshold = resolve_tta_choice(config, choice)
        rows.append({"choice": choice, "flips": flips, "sizes": list(sizes),
                     "threshold": threshold if rec_threshold is None else rec_threshold,
                     "passes": network_passes(flips, sizes)})
    return rows


def read_speeds(path: str | Path) -> dict:
    """images/s per ``--tta`` choice from a ``python -m effiseg.benchmarks.tta_choices`` result
    (``tta_choices.json``: the median over the runs of each choice on the benchmarked model), with the
    file named as the source; ValueError naming the file when it is not one."""
    import statistics
    path = Path(path)
    try:
        records = json.loads(path.read_text(encoding="utf-8"))["records"]
        by_choice: dict[str, list[float]] = {}
        for r in records:
            if r.get("label", "").startswith("--tta") and r.get("exit_status") == 0 and r.get("images_per_s"):
                by_choice.setdefault(r["tta"], []).append(float(r["images_per_s"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a tta_choices.json of effiseg.benchmarks.tta_choices ({e})") from None
    if not by_choice:
        raise ValueError(f"{path}: no successful --tta runs to take images/s from")
    return {"source": str(path), "images_per_s": {c: statistics.median(v) for c, v in by_choice.items()}}


def results_table(rows: list[dict], speeds: dict | None) -> list[str]:
    """The card's results: each measured setting (one pass, then TTA) per split, side by side."""
    per_s = (speeds or {}).get("images_per_s", {})
    lines = ["| inference | passes per image | threshold | split | images | mean Dice | mean IoU | mean precision | "
             "mean recall | F1 (pooled) | images/s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        label = f"`--tta {row['choice']}`" if row["choice"] in ("none", "flip", "multiscale") else row["choice"]
        speed = per_s.get(row["choice"])
        for split in ("validation", "test"):
            m = row.get(split)
            if m:
                lines.append(f"| {label} | {row['passes']} | {row['threshold']:g} | {split} | {m['n_images']} | "
                             f"{_fmt(m['mean_dice'])} | {_fmt(m['mean_iou'])} | {_fmt(m['mean_precision'])} | "
                             f"{_fmt(m['mean_recall'])} | {_fmt(m['f1_pooled'])} | "
                             f"{'' if speed is None else f'{speed:.3g}'} |")
    if speeds:
        lines += ["", f"images/s: end to end with effiseg-run, from `{Path(speeds['source']).name}` "
                      "(python -m effiseg.benchmarks.tta_choices; the machine is the one that file was measured on)."]
    return lines


def render_card(config: dict, test: dict, val: dict | None, provenance: dict, protocol: dict | None,
                role: str | None = None, onnx_report: dict | None = None, repo_id: str | None = None) -> str:
    config = ModelConfig.coerce(config)
    variant, tta_sizes = config.variant, config.tta_sizes
    hub = f"hf://{repo_id}" if repo_id else "hf://OWNER/NAME"
    lines = metadata_header(variant, test, repo_id, onnx_report is not None) + [
        "",
        f"# EffiSegNet ({variant}) for polyp segmentation" + (f" — {role}" if role else ""),
        "",
        "Binary polyp segmentation of colonoscopy frames: one logit map per image, polyp where "
        f"sigmoid > {config.threshold}.",
        "",
        "**Not for clinical use.** A research model trained on 800 images from one public dataset; it has not "
        "been validated on other hospitals, scopes or patient populations and must not inform diagnosis or treatment.",
        "",
        "## Model",
        f"- Architecture: EffiSegNet (Vezakis et al., 2024) with a `{config.encoder}` encoder (ImageNet weights), "
        f"decoder width {config.decoder_channels}.",
        f"- Input: RGB resized to {config.input_size}x{config.input_size}, normalised with mean {list(config.mean)} and "
        f"std {list(config.std)}; output logits are resized back to the image's size before thresholding.",
        f"- Inference settings: threshold {config.threshold}, flip TTA {'on' if config.tta else 'off'}"
        + (f", multi-scale TTA at {' + '.join(f'{s}x{s}' for s in tta_sizes)} (logits averaged at the input size)"
           if tta_sizes else "")
        + (f", small regions below {config.min_region_px} px removed" if config.min_region_px else "") + ".",
    ] + inference_lines(config) + [
        "",
        "## Training",
    ]
    for k, v in provenance.items():
        lines.append(f"- {k}: {v}")
    if not provenance:
        lines.append("- Not recorded for this card (no provenance given); `config.json` holds the model's settings.")
    lines += ["", "## Results (Kvasir-SEG official split, metrics at the native 352x352 mask resolution)", ""]
    rows = config.extra.get("metrics_by_tta") or []
    if rows:
        lines += results_table(rows, config.extra.get("speeds"))
    else:
        lines += ["| split | images | mean Dice | mean IoU | mean precision | mean recall | F1 (pooled) |",
                  "|---|---|---|---|---|---|---|"]
        for name, m in (("validation", val), ("test", test)):
            if m:
                lines.append(f"| {name} | {m['n_images']} | {_fmt(m['mean_dice'])} | {_fmt(m['mean_iou'])} | "
                             f"{_fmt(m['mean_precision'])} | {_fmt(m['mean_recall'])} | {_fmt(m['f1_pooled'])} |")
    where = hub if repo_id else "<this folder, or hf://OWNER/NAME once published>"
    # effiseg-eval runs one pass unless told otherwise (--tta): the command names the TTA measured here.
    tta_flags = (" --tta flip" if config.tta else "") + (
        f" --tta-sizes {','.join(map(str, tta_sizes))}" if tta_sizes else "")
    lines += ["", f"Reproduce: `effiseg-eval {where} --data <kvasir-seg root> --split test{tta_flags}` (the "
              "threshold is read from config.json)"
              + "".join(f"; `... --tta {r['choice']}` for the {r['choice']} row (its recommended threshold)"
                        for r in rows[1:]) + "."]
    lines += files_and_use(hub, onnx_report)
    if protocol:
        lines += ["", "## Evidence for the recipe and the inference settings", "", protocol.get("summary", "").strip()]
    lines += ["", "## Intended use and limitations",
              "- Intended for research, teaching and benchmarking of polyp segmentation and its deployment.",
              "- Trained on Kvasir-SEG only (mostly single, clearly visible polyps); expect lower accuracy on flat or "
              "small lesions, other endoscopes, other image sizes and video artefacts (blur, specular highlights).",
              "- Kvasir-SEG is for research and education; commercial use needs the dataset owners' permission.",
              "- Metrics come from 100 test images of the same dataset; the training length, seed and inference settings "
              "are those listed above, and a differently seeded run of the same recipe can differ by several points "
              "of Dice (see the evidence section).",
              "", "## Citations",
              "- Vezakis I. A., Georgas K., Fotiadis D., Matsopoulos G. K. EffiSegNet: Gastrointestinal Polyp "
              "Segmentation through a Pre-Trained EfficientNet-based Network with a Simplified Decoder. EMBC 2024.",
              "- Jha D. et al. Kvasir-SEG: A Segmented Polyp Dataset. MultiMedia Modeling (MMM) 2020, pp. 451-462.",
              ""]
    return "\n".join(lines)


def inference_lines(config: ModelConfig | dict) -> list[str]:
    """What the card says about the run-time TTA recommendation and how the threshold was chosen."""
    from effiseg.runtime.model_info import describe_tta, parse_tta_recommendation
    config = ModelConfig.coerce(config)
    lines = []
    recommended = parse_tta_recommendation(config.tta_recommended)
    if recommended and not baked_tta(config):
        choice = "multiscale" if recommended["sizes"] else "flip"
        lines.append(f"- One network pass by default. The test-time augmentation chosen on validation "
                     f"({describe_tta(recommended['flips'], recommended['sizes'])}, threshold "
                     f"{recommended['threshold'] if recommended['threshold'] is not None else config.threshold}) "
                     "is recorded in `config.json` (`tta_recommended`) and the ONNX metadata as a recommendation "
                     f"the user chooses at run time: `--tta {choice}` in effiseg-run, effiseg-eval and effiseg-bench.")
    choice = config.extra.get("threshold_choice")
    if choice:
        lines.append(f"- The one-pass threshold {choice['chosen']:g} was chosen on the {choice['split']} split "
                     f"({choice['n_images']} images): {choice['rule']}.")
    return lines


def files_and_use(hub: str, onnx_report: dict | None) -> list[str]:
    """What the folder holds and the commands that run it from the Hub."""
    lines = ["", "## Files", "- `config.json`: the model's settings (variant, input size, normalisation, threshold, "
             "TTA) and the metrics above.",
             "- `model.safetensors`: the PyTorch weights (effiseg-eval, effiseg-export, `effiseg-run --backend torch`)."]
    if onnx_report:
        h, w = onnx_report["input_size"]
        parity = onnx_report["parity"]
        lines.append(f"- `{ONNX_NAME}`: the same network in ONNX (opset {onnx_report['opset']}, "
                     f"{onnx_report['input_format']} in at {h}x{w}"
                     + (" or any multiple of 32" if onnx_report.get("hw_multiple") == 32 else "")
                     + f", {onnx_report['output_format']} out, any batch; preprocessing inside the graph"
                     + (", and TTA" if onnx_report.get("tta") or onnx_report.get("tta_sizes") else
                        ", one network pass: TTA is chosen at run time")
                     + "), checked against PyTorch in ONNX Runtime on "
                     f"{parity['n_images']} image(s) (max abs error {parity['max_abs_error']:.3g}); "
                     f"`{EXPORT_REPORT_NAME}` records the export and the check.")
    lines += ["", "## Use", "", "```",
              'pip install "effiseg[ort,hub]"' if onnx_report else 'pip install "effiseg[train,hub]"',
              f"effiseg-run --model {hub} --input frames/ --output masks/" + ("" if onnx_report else " --backend torch"),
              "```", "", "The first run fetches the model into the Hugging Face cache; later runs use the cache "
              "(also offline, with HF_HUB_OFFLINE=1). Append `@REVISION` (a branch, tag or commit) to pin a version."]
    return lines


def make_model_folder(checkpoint: str | Path, out: str | Path, data_root: str | Path | None, provenance: dict,
                      protocol: dict | None = None, settings: dict | None = None, device: str = "cpu",
                      role: str | None = None, onnx: bool = False, repo_id: str | None = None,
                      log=print, speeds: dict | None = None) -> Path:
    """Copy a checkpoint into ``out`` in the HF layout, measure it, export it to ONNX (``onnx``) and
    write the card. Everything that can fail (reading the checkpoint and the data, measuring,
    exporting) happens before ``out`` is touched, so a failure leaves no half-made folder. ``role``
    (e.g. "effiseg default model") goes into the card's title; ``repo_id`` (OWNER/NAME) into its
    commands and model-index. ``speeds`` (:func:`read_speeds`): images/s per ``--tta`` choice for the
    card's table. Raises ``ExportError`` when the export fails."""
    from .checkpoint import load_model
    from .data import load_split
    from .evaluate import evaluate_samples
    weights, cfg_path = resolve_checkpoint(checkpoint)
    # settings: ModelConfig fields (threshold, tta, ...) and bookkeeping the card keeps beside them
    # (e.g. ship's threshold_choice), which goes into the config's extra.
    fields = {f.name for f in dataclasses.fields(ModelConfig)} - {"extra"}
    settings = settings or {}
    config = dataclasses.replace(read_config_file(cfg_path), **{k: v for k, v in settings.items() if k in fields})
    config = config.with_extra(**{k: v for k, v in settings.items() if k not in fields})
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    test = val = None
    if data_root:
        model, _ = load_model(checkpoint, device=device)  # the source checkpoint, never a stale config in out
        splits = {split: load_split(data_root, split) for split in ("validation", "test")}
        rows = card_settings(config)
        for row in rows:  # the default first (config["metrics"]), then the recommended TTA beside it
            log(f"measuring {checkpoint} on the validation and test splits of {data_root} "
                f"({row['choice']}: {row['passes']} pass(es) per image) ...")
            kw = dict(threshold=row["threshold"], tta=row["flips"], tta_sizes=tuple(row["sizes"]),
                      min_region_px=config.min_region_px)
            for split, samples in splits.items():
                row[split], _, _ = evaluate_samples(model, config, samples, device, **kw)
        val, test = rows[0]["validation"], rows[0]["test"]
        config = dataclasses.replace(config, metrics={"validation": val, "test": test}).with_extra(metrics_by_tta=rows)
    if speeds:
        config = config.with_extra(speeds=speeds)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Staged beside ``out`` (same file system: the moves are renames) under ``out``'s own name, which
    # the ONNX metadata records as the checkpoint's.
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        stage = staging / out.name
        stage.mkdir()
        shutil.copyfile(weights, stage / WEIGHTS_NAME)
        atomic_write_text(stage / CONFIG_NAME, json.dumps(config.to_dict(), indent=2, sort_keys=True))
        report = _export_onnx(stage, data_root, log) if onnx else None
        atomic_write_text(stage / CARD_NAME, render_card(config, test, val, provenance, protocol, role, report,
                                                         repo_id))
        out.mkdir(parents=True, exist_ok=True)
        if not onnx:  # an ONNX file from an earlier card would not match these weights or settings
            for name in (ONNX_NAME, EXPORT_REPORT_NAME):
                if (out / name).is_file():
                    (out / name).unlink()
                    log(f"removed {out / name} (from an earlier card; this one has no ONNX file)")
        for f in sorted(stage.iterdir()):
            replace_with_retry(f, out / f.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _export_onnx(stage: Path, data_root, log) -> dict:
    """The staged checkpoint (weights + the card's config) exported beside it, verified on the
    validation images when the data is there; the report's paths are made relative to the folder,
    which is what travels to the Hub."""
    from effiseg.export.onnx_export import ExportError, export_checkpoint
    verify = Path(data_root) / "validation" / "images" if data_root else None
    config = read_config_file(stage / CONFIG_NAME)
    # The plain network runs every run-time --tta choice when it also runs at multiples of 32 (the
    # multi-scale sizes); a config that bakes TTA into the graph needs the fixed size.
    x32 = not baked_tta(config) and config.input_size % 32 == 0
    log(f"exporting {ONNX_NAME} (checked against PyTorch{', height/width any multiple of 32' if x32 else ''}) ...")
    try:
        report = export_checkpoint(stage, stage / ONNX_NAME, verify_dir=verify if verify and verify.is_dir() else None,
                                   hw_multiple=32 if x32 else 1, log=log)
    except ExportError as e:
        raise ExportError(f"exporting {ONNX_NAME} failed ({e}); nothing was written (--no-onnx makes the "
                          "folder without it)") from None
    report.update(checkpoint=".", onnx=ONNX_NAME)  # this folder's config.json + model.safetensors
    atomic_write_text(stage / EXPORT_REPORT_NAME, json.dumps(report, indent=2, sort_keys=True, default=str))
    return report
