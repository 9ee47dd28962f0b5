"""What an exported ONNX file says about itself, read without onnx, onnxruntime or TensorRT.

``effiseg-export`` writes the variant, input size and format, normalisation, threshold, training
metrics and effiseg version into the ONNX ``metadata_props``. This module reads them with a
minimal protobuf walk (ModelProto field 14 = metadata_props, each a key/value string pair), so an
inference install that has only TensorRT can still run an ONNX file alone.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

META_PREFIX = "effiseg."

# Input formats: "uint8-nhwc" (preprocessing in the graph; the host sends raw RGB bytes) or
# "float32-nchw" (the host normalises). Output formats: "logits" (float32), "probabilities"
# (float16 sigmoid) or "mask" (uint8 0/1 at the model's threshold).
INPUT_FORMATS = ("uint8-nhwc", "float32-nchw")
OUTPUT_FORMATS = ("logits", "probabilities", "mask")

# Multi-scale test-time augmentation: square sizes the network also runs at (multiples of the
# encoder's stride 32, so every decoder stage upsamples by exact factors of 2).
TTA_SIZE_STEP = 32
TTA_SIZE_RANGE = (64, 2048)


def parse_tta_sizes(value) -> tuple[int, ...]:
    """Multi-scale TTA sizes from a config value, metadata string or CLI text ("352,416"; "",
    "none" or None = none) as a sorted tuple without repeats; a bad value raises ValueError
    saying which size and why."""
    if value is None:
        return ()
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("", "none", "off"):
            return ()
        items = [part.strip() for part in text.split(",")]
    elif isinstance(value, (int, float)):
        items = [value]
    else:
        items = list(value)
    sizes = set()
    for item in items:
        try:
            size = int(item)
            if isinstance(item, float) and item != size:
                raise ValueError
        except (TypeError, ValueError):
            raise ValueError(f"TTA size {item!r} is not a whole number of pixels") from None
        low, high = TTA_SIZE_RANGE
        if size % TTA_SIZE_STEP or not low <= size <= high:
            raise ValueError(f"TTA size {size} must be a multiple of {TTA_SIZE_STEP} between {low} and {high}")
        sizes.add(size)
    return tuple(sorted(sizes))


def network_passes(tta: bool, tta_sizes=()) -> int:
    """Network passes per image: one per size (the input size when no sizes are set), times four
    with flip TTA."""
    return (4 if tta else 1) * max(1, len(tta_sizes or ()))


def describe_tta(tta: bool, tta_sizes=()) -> str:
    """"flip TTA at 352+416 (8 network passes per image)" and the like, for logs and reports."""
    passes = network_passes(tta, tta_sizes)
    sizes = "+".join(str(s) for s in tta_sizes or ())
    if not tta and not sizes:
        return "no TTA (1 network pass per image)"
    what = "flip TTA" if tta else "no flips"
    return f"{what}{' at sizes ' + sizes if sizes else ''} ({passes} network passes per image)"


def parse_tta_recommendation(value) -> dict:
    """The TTA setting chosen on validation, as a checkpoint config or the ONNX metadata records it:
    ``{"flips": bool, "sizes": [int, ...], "threshold": float | None}``; ``{}`` when none is recorded.
    A bad value raises ValueError saying which part and why."""
    if value in (None, "", {}):
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"TTA recommendation is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"TTA recommendation must be a mapping (flips, sizes, threshold), not {value!r}")
    unknown = set(value) - {"flips", "sizes", "threshold"}
    if unknown:
        raise ValueError(f"TTA recommendation has unknown keys {sorted(unknown)}; expected flips, sizes, threshold")
    threshold = value.get("threshold")
    if threshold is not None:
        threshold = float(threshold)
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"TTA recommendation: threshold must be in (0, 1), got {threshold}")
    return {"flips": bool(value.get("flips", False)), "sizes": list(parse_tta_sizes(value.get("sizes"))),
            "threshold": threshold}


@dataclass
class ModelInfo:
    path: Path | None
    variant: str
    input_height: int
    input_width: int
    input_format: str = "uint8-nhwc"
    output_format: str = "logits"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    threshold: float = 0.5
    # Flip test-time augmentation inside the graph: the logits are the mean over the image and its
    # horizontal, vertical and double flips (4x the compute; chosen on validation for the default).
    tta: bool = False
    # Multi-scale TTA: the network also runs at these square sizes (the input resized in the
    # graph) and the logits, resized back, are averaged; () = the input size only.
    tta_sizes: tuple[int, ...] = ()
    dynamic_hw: bool = False
    # With dynamic_hw: the height and width the graph is exact at are multiples of this (1: any size;
    # 32: the encoder's stride, where the export keeps the fast Resize upsampling and the decoder's
    # half-resolution sum, see export/onnx_export.py).
    hw_multiple: int = 1
    # TTA chosen on validation, a recommendation for run time (``--tta``), not part of the graph:
    # {"flips": bool, "sizes": [...], "threshold": float | None}, {} when none was recorded.
    tta_recommended: dict = field(default_factory=dict)
    input_name: str = "images"
    output_name: str = "logits"
    metrics: dict = field(default_factory=dict)
    version: str = "unknown"
    extra: dict = field(default_factory=dict)

    def to_metadata(self) -> dict[str, str]:
        """The key/value strings ``effiseg-export`` stores in the ONNX file."""
        return {
            META_PREFIX + "variant": self.variant,
            META_PREFIX + "input_height": str(self.input_height),
            META_PREFIX + "input_width": str(self.input_width),
            META_PREFIX + "input_format": self.input_format,
            META_PREFIX + "output_format": self.output_format,
            META_PREFIX + "mean": json.dumps(list(self.mean)),
            META_PREFIX + "std": json.dumps(list(self.std)),
            META_PREFIX + "threshold": repr(float(self.threshold)),
            META_PREFIX + "dynamic_hw": "1" if self.dynamic_hw else "0",
            META_PREFIX + "tta": "1" if self.tta else "0",
            META_PREFIX + "tta_sizes": ",".join(str(s) for s in self.tta_sizes),
            META_PREFIX + "hw_multiple": str(int(self.hw_multiple)),
            META_PREFIX + "tta_recommended": json.dumps(self.tta_recommended, sort_keys=True),
            META_PREFIX + "input_name": self.input_name,
            META_PREFIX + "output_name": self.output_name,
            META_PREFIX + "metrics": json.dumps(self.metrics, sort_keys=True),
            META_PREFIX + "version": self.version,
            META_PREFIX + "extra": json.dumps(self.extra, sort_keys=True),
        }

    @classmethod
    def from_metadata(cls, meta: dict[str, str], path: Path | None = None) -> "ModelInfo":
        def get(key, default=None):
            return meta.get(META_PREFIX + key, default)
        if get("variant") is None:
            where = f" {path}" if path else ""
            raise ValueError(f"ONNX file{where} has no effiseg metadata; export it with effiseg-export")
        fmt_in, fmt_out = get("input_format", "uint8-nhwc"), get("output_format", "logits")
        if fmt_in not in INPUT_FORMATS or fmt_out not in OUTPUT_FORMATS:
            raise ValueError(f"{path}: unknown input/output format {fmt_in!r}/{fmt_out!r}")
        return cls(
            path=path, variant=get("variant"),
            input_height=int(get("input_height")), input_width=int(get("input_width")),
            input_format=fmt_in, output_format=fmt_out,
            mean=tuple(json.loads(get("mean", "[0.5, 0.5, 0.5]"))),
            std=tuple(json.loads(get("std", "[0.5, 0.5, 0.5]"))),
            threshold=float(get("threshold", "0.5")), dynamic_hw=get("dynamic_hw", "0") == "1",
            tta=get("tta", "0") == "1", tta_sizes=parse_tta_sizes(get("tta_sizes", "")),
            hw_multiple=int(get("hw_multiple", "1")),
            tta_recommended=parse_tta_recommendation(get("tta_recommended", "")),
            input_name=get("input_name", "images"), output_name=get("output_name", "logits"),
            metrics=json.loads(get("metrics", "{}")), version=get("version", "unknown"),
            extra=json.loads(get("extra", "{}")),
        )

    @classmethod
    def from_checkpoint_config(cls, config: dict, path: Path | None = None, input_format: str = "uint8-nhwc",
                               output_format: str = "logits", dynamic_hw: bool = False,
                               input_size: int | tuple[int, int] | None = None) -> "ModelInfo":
        """What a checkpoint's config.json implies (used by effiseg-export and the torch backend)."""
        if input_format not in INPUT_FORMATS or output_format not in OUTPUT_FORMATS:
            raise ValueError(f"unknown input/output format {input_format!r}/{output_format!r}")
        size = config.get("input_size", 352) if input_size is None else input_size
        height, width = (size, size) if isinstance(size, int) else size
        tta_sizes = parse_tta_sizes(config.get("tta_sizes"))
        native = int(config.get("input_size", 352))
        if tta_sizes and (int(height), int(width)) != (native, native):
            # The sizes are absolute squares chosen (on validation) for this input size: at another
            # size the graph would never run at the requested one, a computation nobody evaluated.
            raise ValueError(f"multi-scale TTA sizes {'+'.join(map(str, tta_sizes))} were chosen for the "
                             f"model's input size {native}x{native}, not {height}x{width}; use the model's "
                             "size, or drop the sizes (--tta-sizes none where the command has it)")
        return cls(
            path=path, variant=config["variant"], input_height=int(height), input_width=int(width),
            input_format=input_format, output_format=output_format,
            mean=tuple(float(v) for v in config.get("mean", (0.5, 0.5, 0.5))),
            std=tuple(float(v) for v in config.get("std", (0.5, 0.5, 0.5))),
            threshold=float(config.get("threshold", 0.5)), dynamic_hw=bool(dynamic_hw),
            tta=bool(config.get("tta", False)), tta_sizes=tta_sizes,
            tta_recommended=parse_tta_recommendation(config.get("tta_recommended")),
            output_name=output_format, metrics=dict(config.get("metrics") or {}),
            version=str(config.get("effiseg_version", "unknown")),
        )

    @classmethod
    def from_onnx(cls, path: str | Path) -> "ModelInfo":
        path = Path(path)
        return cls.from_metadata(read_onnx_metadata(path), path=path)


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes):
    """Yield (field_number, wire_type, value) for one protobuf message."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated protobuf message")
        yield number, wire, value


def read_onnx_metadata(path: str | Path) -> dict[str, str]:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read ONNX file {path}: {e}") from e
    meta: dict[str, str] = {}
    try:
        for number, wire, value in _fields(data):
            if number == 14 and wire == 2:  # ModelProto.metadata_props
                entry = {n: v for n, w, v in _fields(value) if w == 2}
                meta[entry.get(1, b"").decode()] = entry.get(2, b"").decode()
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a valid ONNX file ({e})") from e
    return meta
