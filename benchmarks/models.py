"""Which model files the benchmark runs, and making the missing ones.

Torch backends run a training checkpoint; ONNX backends an effiseg ONNX file in the input format
of the configuration (``uint8-nhwc`` or ``float32-nchw``) at the configuration's input size.
Resolution, in order:

1. ``--checkpoint DIR``: both ONNX variants at every input size are exported from it with
   ``effiseg.export.onnx_export.export_checkpoint`` into the cache.
2. ``--model FILE.onnx``, else the runtime's bundled default (``effiseg-run``'s DEFAULT_MODEL):
   ONNX backends run that file for its own input format and size; torch backends and the other
   input format run a *twin*: an untrained checkpoint that reproduces every setting of the file's
   metadata that changes the work or the output (variant, input size, flip TTA, threshold, output
   format, normalisation; decoder channels where recorded), exported the same way. Only the weight
   values differ, and timings do not depend on them. The notes say what the twin reproduces. With
   ``--checkpoint`` as well, the file must agree with the checkpoint on those settings.
3. Nothing at all: an untrained effisegnet-lite2 at 352x352 (the default model's architecture),
   with the note "untrained model: timings only".

Exports and untrained checkpoints are cached under ``--cache-dir`` (default: the
EFFISEG_BENCH_CACHE variable, else a per-user cache folder) by a digest of the checkpoint (its
config holds the TTA flag and threshold), format, size and effiseg version; the TTA setting is also
in the file and folder names. Repeated runs skip the export (the first lite2 export with its
parity check takes tens of seconds on a small CPU).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from effiseg.runtime.model_config import ModelConfig
from effiseg.runtime.model_info import describe_tta, network_passes
from effiseg.runtime.version import effiseg_version

from .targets import missing_modules, not_installed

DEFAULT_VARIANT = "effisegnet-lite2"
DEFAULT_SIZE = 352
UNTRAINED_NOTE = "untrained model: timings only"
# What building models needs beyond the inference install: an untrained checkpoint (a twin) and the
# torch backends need torch and timm (effiseg[train]); an ONNX file exported from a checkpoint needs
# onnx as well (effiseg[export]).
TORCH_MODULES = ("torch", "timm")
EXPORT_MODULES = ("torch", "timm", "onnx")


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


def untrained_checkpoint(cache_dir: Path, variant: str, input_size: int, decoder_channels: int | None = None,
                         log: Callable[[str], None] = print, *, tta: bool = False, threshold: float = 0.5,
                         mean: tuple | None = None, std: tuple | None = None, tta_sizes=()) -> Path:
    """An untrained checkpoint of ``variant`` (seeded, so every run times the same weights) whose
    config carries the inference settings (``tta``, ``tta_sizes``, ``threshold``, ``mean``/``std``;
    default: the variant's normalisation) that the torch backend and the exporter read from it."""
    from effiseg.training.checkpoint import model_config
    config = model_config(variant, input_size=input_size, decoder_channels=decoder_channels,
                          threshold=threshold, tta=bool(tta), untrained=True, mean=mean, std=std,
                          tta_sizes=tta_sizes or ())
    # Every setting is in the name, so a twin cached before a setting was carried (or with another
    # value) is never taken for this one; the TTA flag is spelled out as the one that quadruples the work.
    # (The key is computed as before the config was typed, tta_sizes only when set, so caches stay valid.)
    settings = {"decoder_channels": config.decoder_channels, "threshold": config.threshold, "tta": config.tta,
                "mean": list(config.mean), "std": list(config.std)}
    if config.tta_sizes:
        settings["tta_sizes"] = list(config.tta_sizes)
    key = _digest(json.dumps(settings, sort_keys=True))
    sizes = "".join(f"-s{s}" for s in config.tta_sizes)
    folder = Path(cache_dir) / (f"untrained-{variant}-{input_size}-ch{config.decoder_channels}"
                                f"-tta{int(config.tta)}{sizes}-{key}")
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    log(f"  building an untrained {variant} checkpoint in {folder}")
    import torch
    from effiseg.training.checkpoint import save_checkpoint
    from effiseg.training.model import build_model
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        model = build_model(variant, pretrained=False, ch=decoder_channels)
    finally:
        torch.random.set_rng_state(state)
    save_checkpoint(folder, model.eval(), config)
    return folder


def export_cached(checkpoint: Path, cache_dir: Path, input_format: str, size: tuple[int, int],
                  output_format: str = "logits", log: Callable[[str], None] = print) -> Path:
    """The checkpoint exported to ONNX in ``input_format`` at ``size`` (cached by digest)."""
    from effiseg.export.onnx_export import export_checkpoint
    from effiseg.training.checkpoint import load_config
    h, w = size
    # The exporter takes the TTA flag from the checkpoint's config; the config is in the digest
    # already, and the flag is named on its own as well so that a cached file shows which it is.
    config = load_config(checkpoint)
    tta, sizes = config.tta, config.tta_sizes
    key = _digest(checkpoint_digest(checkpoint), input_format, output_format, h, w, f"tta={int(tta)}",
                  f"sizes={sizes}", effiseg_version())
    short = "uint8" if input_format == "uint8-nhwc" else "float32"
    path = Path(cache_dir) / "onnx" / (f"{Path(checkpoint).name}-{short}-{h}x{w}-{output_format}"
                                       f"{'-tta' if tta else ''}{''.join(f'-s{s}' for s in sizes)}-{key}.onnx")
    if path.is_file():
        return path
    if h != w:
        raise ValueError(f"the exporter takes one square input size; {h}x{w} needs a dynamic-size ONNX")
    log(f"  exporting {checkpoint} -> {path.name} ({input_format}, {h}x{w}) ...")
    export_checkpoint(checkpoint, path, input_format=input_format, output_format=output_format,
                      dynamic_hw=False, input_size=h, verify_count=1, log=lambda *a, **k: None)
    return path


def work_settings(info) -> dict:
    """The settings of a model (a ``ModelInfo``) that change the work per image or its output: what
    a twin has to reproduce and what two files of one benchmark have to share."""
    return {"variant": info.variant, "tta": bool(info.tta), "tta_sizes": list(info.tta_sizes),
            "threshold": float(info.threshold),
            "output_format": info.output_format, "mean": [float(v) for v in info.mean],
            "std": [float(v) for v in info.std]}


# Operators that an input format adds (the uint8 graph's Cast, Transpose, Sub and Div of its
# preprocessing) or that the exporter adds for untrained weights (Identity: identical initialisers
# shared); they say nothing about the network.
FORMAT_OPERATORS = frozenset({"Cast", "Transpose", "Sub", "Div", "Identity", "Constant"})


def onnx_operators(path: Path) -> set[str]:
    import onnx
    return {node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node}


def operator_difference(given: Path, exported: Path) -> tuple[list[str], list[str]]:
    """(operators only in ``given``, only in ``exported``), the format's own left out."""
    a, b = onnx_operators(given) - FORMAT_OPERATORS, onnx_operators(exported) - FORMAT_OPERATORS
    return sorted(a - b), sorted(b - a)


def _describe_settings(settings: dict) -> str:
    passes = describe_tta(settings["tta"], settings.get("tta_sizes", ()))
    return (f"{passes}, threshold {settings['threshold']:g}, {settings['output_format']} output, "
            f"normalisation mean {settings['mean']} std {settings['std']}")


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
    # Every backend runs the model with these (the torch backend and the exporter read them from
    # the checkpoint's config): recorded so that the result file says how much work an image was.
    tta: bool = False
    tta_sizes: tuple = ()
    threshold: float = 0.5
    twin: dict | None = None                 # what an untrained twin of the given ONNX reproduces
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
        if self.given_onnx is not None:
            self._note_graph_drift(path)
        return path

    def _note_graph_drift(self, exported: Path) -> None:
        """The settings in the metadata can match while the network is exported differently: a file
        made by another version of the code (an upsampling traced as Resize or as gathers, say) does
        other work than this copy's exports and its torch backend. Said, with the operators, once."""
        try:
            given_only, exported_only = operator_difference(self.given_onnx, exported)
        except ImportError:  # an export cached earlier, and no onnx package now to read graphs with
            return
        if not (given_only or exported_only):
            return
        note = (f"the network in {self.given_onnx.name} is not the one this copy of effiseg exports and runs in "
                f"torch (operators only in {self.given_onnx.name}: {', '.join(given_only) or 'none'}; only in "
                f"this copy's export: {', '.join(exported_only) or 'none'}): torch and exported configurations "
                "may not do the same work as that file")
        if note not in self.notes:
            self.notes.append(note)

    def onnx_configs(self, formats: list[str], sizes: list[tuple[int, int]]) -> tuple[set, str | None]:
        """The (input format, size) pairs that ONNX backends can run here, and why the others cannot
        (None when all can). The given file runs in its own format at its size (any size if dynamic);
        every other pair is exported from the checkpoint, which needs one and the export stack."""
        wanted = {(f, tuple(size)) for f in formats for size in sizes}
        if self.checkpoint is not None:
            missing = missing_modules(EXPORT_MODULES)
            if not missing:
                return wanted, None
            why = f"exporting them needs {' and '.join(missing)} (pip install \"effiseg[export]\")"
        else:
            why = "there is no checkpoint to export them from" + (
                f" (only {self.given_onnx.name} as it is)" if self.given_onnx is not None else "")
        runnable = set()
        if self.given_onnx is not None:
            from effiseg.runtime.model_info import ModelInfo
            info = ModelInfo.from_onnx(self.given_onnx)
            runnable = {(f, s) for f, s in wanted if f == info.input_format
                        and (info.dynamic_hw or s == (info.input_height, info.input_width))}
        dropped = sorted(wanted - runnable)
        if not dropped:
            return runnable, None
        return runnable, ("not timed on ONNX backends: " + ", ".join(f"{f} at {h}x{w}" for f, (h, w) in dropped)
                          + f"; {why}")

    def describe(self) -> dict:
        return {"variant": self.variant, "native_size": list(self.native_size), "source": self.source,
                "checkpoint": str(self.checkpoint) if self.checkpoint else None,
                "given_onnx": str(self.given_onnx) if self.given_onnx else None,
                "onnx": {f"{fmt}@{h}x{w}": str(p) for (fmt, (h, w)), p in self.onnx.items()},
                "output_format": self.output_format, "trained": self.trained,
                "tta": self.tta, "tta_sizes": list(self.tta_sizes),
                "network_passes_per_image": network_passes(self.tta, self.tta_sizes), "threshold": self.threshold,
                "twin": self.twin, "note": "; ".join(self.notes) if self.notes else None}


def _check_onnx_matches_checkpoint(model: Path, checkpoint: Path, config: ModelConfig) -> None:
    """``--model X.onnx`` with ``--checkpoint``: ONNX backends run X, torch backends the checkpoint,
    so both must do the same work and compute the same output, or the speed-ups compare unlike things."""
    from effiseg.runtime.model_info import ModelInfo
    info = ModelInfo.from_onnx(model)
    theirs = work_settings(info)
    ours = work_settings(ModelInfo.from_checkpoint_config(config, output_format=info.output_format))
    if info.output_format != "mask":
        del theirs["threshold"], ours["threshold"]  # cut on the host: the graphs' work does not depend on it
    recorded = info.extra.get("decoder_channels")
    if recorded is not None:
        theirs["decoder_channels"], ours["decoder_channels"] = int(recorded), config.decoder_channels
    differ = [f"{k} ({theirs[k]} in {model.name}, {ours[k]} in the checkpoint)" for k in theirs if theirs[k] != ours[k]]
    if differ:
        raise ValueError(f"--model {model} and --checkpoint {checkpoint} differ in {'; '.join(differ)}: the ONNX "
                         "and torch backends would not do the same work; export the ONNX file from the checkpoint "
                         "with the same settings, or pass only one of them")


def resolve_models(model: Path | None, checkpoint: Path | None, cache_dir: Path | None,
                   log: Callable[[str], None] = print) -> ModelSet:
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    if model is not None and checkpoint is None and not str(model).lower().endswith(".onnx"):
        checkpoint, model = model, None  # --model pointing at a checkpoint
    if checkpoint is not None:
        missing = missing_modules(TORCH_MODULES)
        if missing:
            raise ValueError(f"a checkpoint ({checkpoint}) needs torch and timm, and {not_installed(missing)} here: "
                             "pip install \"effiseg[export]\" (torch backends and ONNX exports), or pass an ONNX "
                             "file with --model")
        from effiseg.training.checkpoint import load_config
        checkpoint = Path(checkpoint)
        config = load_config(checkpoint)
        size = config.input_size
        trained = not config.untrained
        output_format = "logits"
        if model is not None:
            from effiseg.runtime.model_info import ModelInfo
            _check_onnx_matches_checkpoint(Path(model), checkpoint, config)
            output_format = ModelInfo.from_onnx(model).output_format
        ms = ModelSet(config.variant, (size, size), checkpoint, cache_dir, "checkpoint",
                      given_onnx=Path(model) if model else None, output_format=output_format, trained=trained,
                      tta=config.tta, tta_sizes=config.tta_sizes, threshold=config.threshold, log=log)
        if not trained:
            ms.notes.append(UNTRAINED_NOTE)
        return ms
    if model is None:
        default = bundled_default_model()
        if default.is_file():
            model = default
        else:
            missing = missing_modules(TORCH_MODULES)
            if missing:
                raise ValueError(f"the bundled default model {default} is not in this copy of effiseg, and "
                                 f"building an untrained one needs torch and timm, but {not_installed(missing)} "
                                 "here: pass an ONNX file with --model, or pip install \"effiseg[train]\"")
            log(f"  the bundled default model {default} is not in this copy of effiseg: "
                f"timing an untrained {DEFAULT_VARIANT} at {DEFAULT_SIZE}x{DEFAULT_SIZE} instead")
            ckpt = untrained_checkpoint(cache_dir, DEFAULT_VARIANT, DEFAULT_SIZE, log=log)
            ms = ModelSet(DEFAULT_VARIANT, (DEFAULT_SIZE, DEFAULT_SIZE), ckpt, cache_dir, "untrained", log=log)
            ms.notes.append(f"{UNTRAINED_NOTE} (bundled default {default.name} not found; "
                            f"untrained {DEFAULT_VARIANT} at {DEFAULT_SIZE}x{DEFAULT_SIZE}, no TTA)")
            return ms
    from effiseg.runtime.model_info import ModelInfo
    model = Path(model)
    if not model.is_file():
        raise FileNotFoundError(f"model file not found: {model}")
    info = ModelInfo.from_onnx(model)
    settings = work_settings(info)
    missing = missing_modules(TORCH_MODULES)
    twin = None
    if not missing:
        # Decoder channels are in the metadata of newer exports only; older files (the bundled default
        # among them) use the variant's default, which is what an unrecorded value means.
        recorded = info.extra.get("decoder_channels")
        twin = untrained_checkpoint(cache_dir, info.variant, info.input_height,
                                    int(recorded) if recorded is not None else None, log=log, tta=info.tta,
                                    threshold=info.threshold, mean=info.mean, std=info.std,
                                    tta_sizes=info.tta_sizes)
    ms = ModelSet(info.variant, (info.input_height, info.input_width), twin, cache_dir, "onnx",
                  given_onnx=model, output_format=info.output_format, trained=True, tta=info.tta,
                  tta_sizes=info.tta_sizes, threshold=info.threshold, log=log)
    if twin is None:
        # An inference install (effiseg[ort]): no torch backend, no PyTorch baseline and no other
        # input format; the ONNX backends still run the file as it is.
        ms.notes.append(f"{not_installed(missing)}: only the ONNX backends run, on {model.name} as it is "
                        f"({info.input_format} input); no PyTorch baseline, so no speed-ups (pip install "
                        "\"effiseg[export]\" adds the torch backends, the baseline and the other input format)")
        log(f"  {ms.notes[-1]}")
        return ms
    from effiseg.training.checkpoint import load_config
    channels = load_config(twin).decoder_channels
    ms.twin = {**settings, "input_size": [info.input_height, info.input_width], "decoder_channels": channels,
               "decoder_channels_recorded": recorded is not None, "weights": "untrained (seeded)"}
    other = "float32" if info.input_format == "uint8-nhwc" else "uint8"
    ms.notes.append(f"torch backends and the {other} input variant run an untrained twin of {model.name} that "
                    f"reproduces its variant ({info.variant}), input size {info.input_height}x{info.input_width}, "
                    f"{_describe_settings(settings)}, and decoder channels {channels} "
                    + ("(recorded in the file)" if recorded is not None
                       else "(the variant's default; the file does not record them)")
                    + "; only the weights differ (timings do not depend on weight values)")
    return ms
