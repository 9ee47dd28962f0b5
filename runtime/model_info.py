"""What an exported ONNX file says about itself, read without onnx, onnxruntime or TensorRT.

``effiseg-export`` writes the variant, input size and format, normalisation, threshold, training
metrics and effiseg version into the ONNX ``metadata_props``. This module reads them with a
minimal protobuf walk (ModelProto field 14 = metadata_props, each a key/value string pair), so an
inference install that has only TensorRT can still run an ONNX file alone.

A ``ModelInfo`` is the model's settings (``ModelConfig``, effiseg.runtime.model_config) plus what
one exported graph adds: its input and output formats, size and names. It is made from a config
(:meth:`ModelInfo.from_config`), and a file exported since the config type existed also stores the
whole config (``effiseg.model_config``), so nothing the checkpoint knew is lost on the way.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .model_config import (TTA_SIZE_RANGE, TTA_SIZE_STEP, ModelConfig, ModelConfigError,  # noqa: F401 (re-exported)
                           parse_tta_recommendation, parse_tta_sizes)
from .variants import list_variants

META_PREFIX = "effiseg."

# Input formats: "uint8-nhwc" (preprocessing in the graph; the host sends raw RGB bytes) or
# "float32-nchw" (the host normalises). Output formats: "logits" (float32), "probabilities"
# (float16 sigmoid) or "mask" (uint8 0/1 at the model's threshold).
INPUT_FORMATS = ("uint8-nhwc", "float32-nchw")
OUTPUT_FORMATS = ("logits", "probabilities", "mask")

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


# The settings a ModelInfo shares with the model config, written as their own metadata keys too
# (every effiseg version reads these; the full config beside them is for this version and later).
SHARED_WITH_CONFIG = ("variant", "mean", "std", "threshold", "tta", "tta_sizes", "tta_recommended", "metrics")


@dataclass
class ModelInfo:
    """One runnable model as a backend sees it: the model's settings plus the exported graph's I/O.

    Args:
        path (Path | None): the ONNX file or checkpoint it describes (None for one made in memory).
        variant (str): the model's variant name.
        input_height (int), input_width (int): the size the graph runs at (with ``dynamic_hw``: the
            size it was exported and checked at).
        input_format (str): "uint8-nhwc" (normalisation in the graph) or "float32-nchw" (on the host).
        output_format (str): "logits", "probabilities" or "mask".
        mean, std (tuple[float, float, float]): input normalisation (what the host applies for
            float32 input). The defaults serve fakes in tests; real models take them from their config.
        threshold (float): probability cut for the mask.
        tta (bool), tta_sizes (tuple[int, ...]): test-time augmentation inside the graph.
        dynamic_hw (bool), hw_multiple (int): dynamic height/width, exact at multiples of ``hw_multiple``.
        tta_recommended (dict): the TTA chosen on validation, for ``--tta`` at run time.
        input_name, output_name (str): the graph's tensor names.
        metrics (dict): the model's evaluation results.
        version (str): the effiseg version that exported the graph.
        extra (dict): exporter facts (opset, torch version, ...).
        config (ModelConfig | None): the full model config it was made from; None for fakes and for
            files of an unregistered variant that did not store it.

    Example:
        >>> info = ModelInfo.from_onnx("runtime/models/effisegnet-default.onnx")  # doctest: +SKIP
        >>> info.variant, info.input_format, info.config.encoder  # doctest: +SKIP
        ('effisegnet-lite2', 'uint8-nhwc', 'tf_efficientnet_lite2')
    """

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
    # Not compared: two infos of one graph are equal whether or not one knows the whole config.
    config: ModelConfig | None = field(default=None, compare=False, repr=False)

    def model_config(self) -> ModelConfig | None:
        """The model config with this info's own settings (which win: an info changed with
        ``dataclasses.replace``, e.g. another TTA, says so in the config it writes too)."""
        if self.config is None:
            return None
        return dataclasses.replace(self.config, **{k: getattr(self, k) for k in SHARED_WITH_CONFIG})

    def to_metadata(self) -> dict[str, str]:
        """The key/value strings ``effiseg-export`` stores in the ONNX file."""
        meta = {
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
        config = self.model_config()
        if config is not None:
            meta[META_PREFIX + "model_config"] = config.to_json()
        return meta

    @classmethod
    def from_metadata(cls, meta: dict[str, str], path: Path | None = None) -> "ModelInfo":
        """Read the metadata of an ONNX file of any effiseg version.

        Args:
            meta: the file's ``metadata_props`` as a dict (see :func:`read_onnx_metadata`).
            path: the file, named in errors and kept as ``info.path``.

        Returns:
            The info; ``info.config`` is the stored model config, or for files exported before it
            was stored, one rebuilt from the individual keys and the variant registry (None for a
            variant this version does not know).

        Raises:
            ValueError: no effiseg metadata, an unknown input/output format, or an invalid value
                (the message names the file and the key).
        """
        def get(key, default=None):
            return meta.get(META_PREFIX + key, default)
        where = f" {path}" if path else ""
        if get("variant") is None:
            raise ValueError(f"ONNX file{where} has no effiseg metadata; export it with effiseg-export")
        fmt_in, fmt_out = get("input_format", "uint8-nhwc"), get("output_format", "logits")
        if fmt_in not in INPUT_FORMATS or fmt_out not in OUTPUT_FORMATS:
            raise ValueError(f"{path}: unknown input/output format {fmt_in!r}/{fmt_out!r}")
        try:
            extra = json.loads(get("extra", "{}"))
            shared = _shared_settings(get)
            config = _config_from_metadata(get, shared, extra)
        except (ValueError, TypeError) as e:  # json.JSONDecodeError and ModelConfigError are ValueErrors
            raise ValueError(f"ONNX file{where}: effiseg metadata: {e}") from None
        if config is not None:
            shared = {k: getattr(config, k) for k in SHARED_WITH_CONFIG}
        return cls(
            path=path, input_height=int(get("input_height")), input_width=int(get("input_width")),
            input_format=fmt_in, output_format=fmt_out, dynamic_hw=get("dynamic_hw", "0") == "1",
            hw_multiple=int(get("hw_multiple", "1")),
            input_name=get("input_name", "images"), output_name=get("output_name", "logits"),
            version=get("version", "unknown"), extra=extra, config=config, **shared,
        )

    @classmethod
    def from_config(cls, config: ModelConfig, path: Path | None = None, input_format: str = "uint8-nhwc",
                    output_format: str = "logits", dynamic_hw: bool = False,
                    input_size: int | tuple[int, int] | None = None) -> "ModelInfo":
        """The info of a graph made from ``config`` (what effiseg-export writes, what the torch backend runs).

        Args:
            config: the model's settings.
            path: the file the info describes.
            input_format, output_format: the graph's I/O formats (see ``INPUT_FORMATS``, ``OUTPUT_FORMATS``).
            dynamic_hw: whether the graph takes any height and width.
            input_size: one side or (height, width) [default: ``config.input_size``].

        Returns:
            The info, with ``info.config`` set.

        Raises:
            ValueError: an unknown format, or multi-scale TTA sizes at an input size other than the
                model's (the sizes were chosen for that one).

        Example:
            >>> cfg = ModelConfig.for_variant("effisegnet-lite0", input_size=64)
            >>> ModelInfo.from_config(cfg, input_format="float32-nchw").input_height
            64
        """
        if input_format not in INPUT_FORMATS or output_format not in OUTPUT_FORMATS:
            raise ValueError(f"unknown input/output format {input_format!r}/{output_format!r}")
        size = config.input_size if input_size is None else input_size
        height, width = (size, size) if isinstance(size, int) else size
        native = config.input_size
        if config.tta_sizes and (int(height), int(width)) != (native, native):
            # The sizes are absolute squares chosen (on validation) for this input size: at another
            # size the graph would never run at the requested one, a computation nobody evaluated.
            raise ValueError(f"multi-scale TTA sizes {'+'.join(map(str, config.tta_sizes))} were chosen for the "
                             f"model's input size {native}x{native}, not {height}x{width}; use the model's "
                             "size, or drop the sizes (--tta-sizes none where the command has it)")
        return cls(
            path=path, input_height=int(height), input_width=int(width), input_format=input_format,
            output_format=output_format, dynamic_hw=bool(dynamic_hw), output_name=output_format,
            version=config.effiseg_version, config=config,
            **{k: getattr(config, k) for k in SHARED_WITH_CONFIG},
        )

    @classmethod
    def from_checkpoint_config(cls, config, path: Path | None = None, **graph) -> "ModelInfo":
        """:meth:`from_config` for a config dict (a checkpoint's config.json as read, of any
        version) or a ``ModelConfig``; ``graph``: ``from_config``'s format and size arguments."""
        return cls.from_config(ModelConfig.coerce(config), path=path, **graph)

    @classmethod
    def from_onnx(cls, path: str | Path) -> "ModelInfo":
        """Read an ONNX file's effiseg metadata (without onnx or onnxruntime).

        Raises:
            ValueError: the file cannot be read, is not ONNX, or has no (valid) effiseg metadata.
        """
        path = Path(path)
        return cls.from_metadata(read_onnx_metadata(path), path=path)


def _shared_settings(get) -> dict:
    """The settings the metadata holds as individual keys, each only where the file has it."""
    parsers = {"mean": lambda v: tuple(json.loads(v)), "std": lambda v: tuple(json.loads(v)), "threshold": float,
               "tta": lambda v: v == "1", "tta_sizes": parse_tta_sizes, "tta_recommended": parse_tta_recommendation,
               "metrics": json.loads}
    out = {"variant": get("variant")}
    for key, parse in parsers.items():
        if get(key) is not None:
            out[key] = parse(get(key))
    # Files before run-time TTA and multi-scale TTA lack these keys: they mean "none".
    out.setdefault("tta_sizes", ())
    out.setdefault("tta_recommended", {})
    return out


def _config_from_metadata(get, shared: dict, extra: dict) -> ModelConfig | None:
    """The stored config with the individual keys on top (they are what every version reads, and
    agree with it in files effiseg wrote); for older files, one rebuilt from those keys, the
    exporter's facts (encoder, decoder width) and the variant registry."""
    stored = get("model_config")
    if stored is not None:
        return ModelConfig.from_dict({**json.loads(stored), **shared})
    if shared["variant"] not in list_variants():
        missing = [k for k in ("mean", "std") if k not in shared]
        if missing:
            raise ModelConfigError(f"{', '.join(missing)} missing, and variant {shared['variant']!r} is not "
                                   "registered in this effiseg version to supply them")
        return None
    recorded = {k: extra[k] for k in ("encoder", "decoder_channels") if extra.get(k) not in (None, "")}
    return ModelConfig.from_dict({**recorded, **shared})


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
    """An ONNX file's ``metadata_props`` as a dict, read with a minimal protobuf walk (no onnx needed).

    Args:
        path: the ONNX file.

    Returns:
        Every key/value pair of the file's metadata (effiseg's keys start with ``effiseg.``).

    Raises:
        ValueError: the file cannot be read or is not a valid protobuf message (the message names it).
    """
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
