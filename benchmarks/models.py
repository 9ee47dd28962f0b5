"""Which model files the benchmark runs, and making the missing ones.

Torch backends run a training checkpoint; ONNX backends an effiseg ONNX file in the input format
of the configuration (``uint8-nhwc`` or ``float32-nchw``) at the configuration's input size.
Resolution, in order:

1. ``--checkpoint DIR``: both ONNX variants at every input size are exported from it with
   ``effiseg.export.onnx_export.export_checkpoint`` into the cache.
2. ``--model FILE.onnx``, else the runtime's bundled default (``effiseg-run``'s DEFAULT_MODEL):
   ONNX backends run that file for its own input format and size; torch backends and the other
   input format run an *architecture twin*: an untrained checkpoint of the same variant (timings
   do not depend on weight values), exported the same way (same output format). Said in notes.
3. Nothing at all: an untrained effisegnet-lite2 at 352x352 (the default model's architecture),
   with the note "untrained model: timings only".

Exports and untrained checkpoints are cached under ``--cache-dir`` (default: the
EFFISEG_BENCH_CACHE variable, else a per-user cache folder) by a digest of the checkpoint, format,
size and effiseg version, so repeated runs skip the export (the first lite2 export with its
parity check takes tens of seconds on a small CPU).
"""
from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

DEFAULT_VARIANT = "effisegnet-lite2"
DEFAULT_SIZE = 352
UNTRAINED_NOTE = "untrained model: timings only"


def default_cache_dir() -> Path:
    env = os.environ.get("EFFISEG_BENCH_CACHE", "").strip()
    if env:
        return Path(env).expanduser()
    if sys.platform.startswith("win"):
        root = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "effiseg" / "bench"


def bundled_default_model() -> Path:
    """Where the runtime keeps its bundled default ONNX (it may be absent in this copy)."""
    try:
        from effiseg.runtime.cli import DEFAULT_MODEL
        return Path(DEFAULT_MODEL)
    except Exception:  # the runtime CLI is optional for the benchmark
        import effiseg.runtime as runtime_pkg
        return Path(runtime_pkg.__file__).resolve().parent / "models" / "effisegnet-default.onnx"


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(str(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def checkpoint_digest(checkpoint: Path) -> str:
    from effiseg.runtime.trt_engine_cache import file_sha256
    from effiseg.training.checkpoint import resolve_checkpoint
    weights, config = resolve_checkpoint(checkpoint)
    return _digest(file_sha256(weights), config.read_text(encoding="utf-8"))


def effiseg_version() -> str:
    try:
        from importlib.metadata import version
        return version("effiseg")
    except Exception:
        return "unknown"


def untrained_checkpoint(cache_dir: Path, variant: str, input_size: int, decoder_channels: int | None = None,
                         log: Callable[[str], None] = print) -> Path:
    """An untrained checkpoint of ``variant`` (seeded, so every run times the same weights)."""
    folder = Path(cache_dir) / f"untrained-{variant}-{input_size}-ch{decoder_channels or 'default'}"
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    log(f"  building an untrained {variant} checkpoint in {folder}")
    import torch
    from effiseg.training.checkpoint import model_config, save_checkpoint
    from effiseg.training.model import build_model
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        model = build_model(variant, pretrained=False, ch=decoder_channels)
    finally:
        torch.random.set_rng_state(state)
    save_checkpoint(folder, model.eval(), model_config(variant, input_size=input_size,
                                                      decoder_channels=decoder_channels, untrained=True))
    return folder


def export_cached(checkpoint: Path, cache_dir: Path, input_format: str, size: tuple[int, int],
                  output_format: str = "logits", log: Callable[[str], None] = print) -> Path:
    """The checkpoint exported to ONNX in ``input_format`` at ``size`` (cached by digest)."""
    from effiseg.export.onnx_export import export_checkpoint
    h, w = size
    key = _digest(checkpoint_digest(checkpoint), input_format, output_format, h, w, effiseg_version())
    short = "uint8" if input_format == "uint8-nhwc" else "float32"
    path = Path(cache_dir) / "onnx" / f"{Path(checkpoint).name}-{short}-{h}x{w}-{output_format}-{key}.onnx"
    if path.is_file():
        return path
    if h != w:
        raise ValueError(f"the exporter takes one square input size; {h}x{w} needs a dynamic-size ONNX")
    log(f"  exporting {checkpoint} -> {path.name} ({input_format}, {h}x{w}) ...")
    export_checkpoint(checkpoint, path, input_format=input_format, output_format=output_format,
                      dynamic_hw=False, input_size=h, verify_count=1, log=lambda *a, **k: None)
    return path


@dataclass
class ModelSet:
    """What the factory needs: a checkpoint for torch backends, ONNX files by (format, size)."""
    variant: str
    native_size: tuple[int, int]
    checkpoint: Path | None
    cache_dir: Path
    source: str                              # "checkpoint", "onnx" or "untrained"
    onnx: dict = field(default_factory=dict)  # (input_format, (h, w)) -> Path, filled on demand
    given_onnx: Path | None = None
    output_format: str = "logits"
    trained: bool = False
    notes: list = field(default_factory=list)
    log: Callable[[str], None] = print

    def onnx_for(self, input_format: str, size: tuple[int, int]) -> Path:
        key = (input_format, tuple(size))
        if key in self.onnx:
            return self.onnx[key]
        if self.given_onnx is not None:
            from effiseg.runtime.model_info import ModelInfo
            info = ModelInfo.from_onnx(self.given_onnx)
            if info.input_format == input_format and (
                    info.dynamic_hw or (info.input_height, info.input_width) == tuple(size)):
                self.onnx[key] = self.given_onnx
                return self.given_onnx
        if self.checkpoint is None:
            raise RuntimeError(f"no checkpoint to export a {input_format} model at {size[0]}x{size[1]} from")
        path = export_cached(self.checkpoint, self.cache_dir, input_format, size, self.output_format, self.log)
        self.onnx[key] = path
        return path

    def describe(self) -> dict:
        return {"variant": self.variant, "native_size": list(self.native_size), "source": self.source,
                "checkpoint": str(self.checkpoint) if self.checkpoint else None,
                "given_onnx": str(self.given_onnx) if self.given_onnx else None,
                "onnx": {f"{fmt}@{h}x{w}": str(p) for (fmt, (h, w)), p in self.onnx.items()},
                "output_format": self.output_format, "trained": self.trained,
                "note": "; ".join(self.notes) if self.notes else None}


def resolve_models(model: Path | None, checkpoint: Path | None, cache_dir: Path | None,
                   log: Callable[[str], None] = print) -> ModelSet:
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    if model is not None and checkpoint is None and not str(model).lower().endswith(".onnx"):
        checkpoint, model = model, None  # --model pointing at a checkpoint
    if checkpoint is not None:
        from effiseg.training.checkpoint import load_config
        checkpoint = Path(checkpoint)
        config = load_config(checkpoint)
        size = int(config.get("input_size", DEFAULT_SIZE))
        trained = not config.get("untrained", False)
        ms = ModelSet(config["variant"], (size, size), checkpoint, cache_dir, "checkpoint",
                      given_onnx=Path(model) if model else None, trained=trained, log=log)
        if not trained:
            ms.notes.append(UNTRAINED_NOTE)
        return ms
    if model is None:
        default = bundled_default_model()
        if default.is_file():
            model = default
        else:
            log(f"  the bundled default model {default} is not in this copy of effiseg: "
                f"timing an untrained {DEFAULT_VARIANT} at {DEFAULT_SIZE}x{DEFAULT_SIZE} instead")
            ckpt = untrained_checkpoint(cache_dir, DEFAULT_VARIANT, DEFAULT_SIZE, log=log)
            ms = ModelSet(DEFAULT_VARIANT, (DEFAULT_SIZE, DEFAULT_SIZE), ckpt, cache_dir, "untrained", log=log)
            ms.notes.append(f"{UNTRAINED_NOTE} (bundled default {default.name} not found; "
                            f"untrained {DEFAULT_VARIANT} at {DEFAULT_SIZE}x{DEFAULT_SIZE})")
            return ms
    from effiseg.runtime.model_info import ModelInfo
    model = Path(model)
    if not model.is_file():
        raise FileNotFoundError(f"model file not found: {model}")
    info = ModelInfo.from_onnx(model)
    twin = untrained_checkpoint(cache_dir, info.variant, info.input_height, log=log)
    ms = ModelSet(info.variant, (info.input_height, info.input_width), twin, cache_dir, "onnx",
                  given_onnx=model, output_format=info.output_format, trained=True, log=log)
    ms.notes.append(f"torch backends and the {'float32' if info.input_format == 'uint8-nhwc' else 'uint8'} "
                    f"input variant time an untrained {info.variant} twin of {model.name} "
                    "(same architecture; timings do not depend on weights)")
    return ms
