"""A publishable model folder (Hugging Face layout): config.json, model.safetensors, README.md.

The card's test metrics are measured when the folder is made (the same code as ``effiseg-eval``),
so the card always matches what a user reproduces. Uploading is the user's step, e.g.
``huggingface-cli upload <user>/<repo> <folder>``.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from effiseg.runtime.images import atomic_write_text
from effiseg.runtime.model_info import parse_tta_sizes
from effiseg.runtime.replace_file import replace_with_retry

from .checkpoint import CONFIG_NAME, WEIGHTS_NAME, resolve_checkpoint


def _fmt(v):
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def render_card(config: dict, test: dict, val: dict | None, provenance: dict, protocol: dict | None,
                role: str | None = None) -> str:
    variant = config["variant"]
    tta_sizes = parse_tta_sizes(config.get("tta_sizes"))
    lines = [
        "---",
        "license: other",
        "library_name: effiseg",
        "pipeline_tag: image-segmentation",
        "tags: [medical-imaging, polyp-segmentation, colonoscopy, efficientnet, effisegnet]",
        "datasets: [kvasir-seg]",
        "metrics: [dice, iou, precision, recall]",
        "---",
        "",
        f"# EffiSegNet ({variant}) for polyp segmentation" + (f" — {role}" if role else ""),
        "",
        "Binary polyp segmentation of colonoscopy frames: one logit map per image, polyp where "
        f"sigmoid > {config.get('threshold', 0.5)}.",
        "",
        "**Not for clinical use.** A research model trained on 800 images from one public dataset; it has not "
        "been validated on other hospitals, scopes or patient populations and must not inform diagnosis or treatment.",
        "",
        "## Model",
        f"- Architecture: EffiSegNet (Vezakis et al., 2024) with a `{config['encoder']}` encoder (ImageNet weights), "
        f"decoder width {config['decoder_channels']}.",
        f"- Input: RGB resized to {config['input_size']}x{config['input_size']}, normalised with mean {config['mean']} and "
        f"std {config['std']}; output logits are resized back to the image's size before thresholding.",
        f"- Inference settings: threshold {config.get('threshold', 0.5)}"
        + (f", flip TTA {'on' if config.get('tta') else 'off'}" if 'tta' in config else "")
        + (f", multi-scale TTA at {' + '.join(f'{s}x{s}' for s in tta_sizes)} (logits averaged at the input size)"
           if tta_sizes else "")
        + (f", small regions below {config['min_region_px']} px removed" if config.get('min_region_px') else "") + ".",
        "",
        "## Training",
    ]
    for k, v in provenance.items():
        lines.append(f"- {k}: {v}")
    if not provenance:
        lines.append("- Not recorded for this card (no provenance given); `config.json` holds the model's settings.")
    lines += ["", "## Results (Kvasir-SEG official split, metrics at the native 352x352 mask resolution)", "",
              "| split | images | mean Dice | mean IoU | mean precision | mean recall | F1 (pooled) |",
              "|---|---|---|---|---|---|---|"]
    for name, m in (("validation", val), ("test", test)):
        if m:
            lines.append(f"| {name} | {m['n_images']} | {_fmt(m['mean_dice'])} | {_fmt(m['mean_iou'])} | "
                         f"{_fmt(m['mean_precision'])} | {_fmt(m['mean_recall'])} | {_fmt(m['f1_pooled'])} |")
    # effiseg-eval runs one pass unless told otherwise (--tta): the command names the TTA measured here.
    tta_flags = (" --tta flip" if config.get("tta") else "") + (
        f" --tta-sizes {','.join(map(str, tta_sizes))}" if tta_sizes else "")
    lines += ["", f"Reproduce: `effiseg-eval <this folder> --data <kvasir-seg root> --split test{tta_flags}` (the "
              "threshold is read from config.json)."]
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


def make_model_folder(checkpoint: str | Path, out: str | Path, data_root: str | Path | None, provenance: dict,
                      protocol: dict | None = None, settings: dict | None = None, device: str = "cpu",
                      role: str | None = None) -> Path:
    """Copy a checkpoint into ``out`` in the HF layout, measure it, and write the card. Everything
    that can fail (reading the checkpoint and the data, measuring) happens before ``out`` is
    touched, so a failure leaves no half-made folder. ``role`` (e.g. "effiseg default model")
    goes into the card's title."""
    from .checkpoint import load_model
    from .data import load_split
    from .evaluate import evaluate_samples
    from .tta import resolve_tta
    weights, cfg_path = resolve_checkpoint(checkpoint)
    config = json.loads(cfg_path.read_text(encoding="utf-8"))
    config.update(settings or {})
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    test = val = None
    if data_root:
        model, _ = load_model(checkpoint, device=device)  # the source checkpoint, never a stale config in out
        flips, sizes = resolve_tta(config)
        kw = dict(threshold=config.get("threshold", 0.5), tta=flips, tta_sizes=sizes,
                  min_region_px=int(config.get("min_region_px", 0)))
        val, _, _ = evaluate_samples(model, config, load_split(data_root, "validation"), device, **kw)
        test, _, _ = evaluate_samples(model, config, load_split(data_root, "test"), device, **kw)
        config["metrics"] = {"validation": val, "test": test}
    card = render_card(config, test, val, provenance, protocol, role)
    out.mkdir(parents=True, exist_ok=True)
    if weights.resolve() != (out / WEIGHTS_NAME).resolve():
        tmp = out / (WEIGHTS_NAME + ".tmp")
        shutil.copyfile(weights, tmp)
        replace_with_retry(tmp, out / WEIGHTS_NAME)
    atomic_write_text(out / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True))
    atomic_write_text(out / "README.md", card)
    return out
