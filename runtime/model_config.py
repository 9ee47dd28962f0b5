"""The model's settings as one typed, frozen, validated object (``ModelConfig``).

A trained model travels with its settings: the variant and encoder it was built from, the input
size and normalisation it was trained at, the decoder width, the threshold and TTA chosen on
validation, the metrics it reached. They used to travel as an open dict read with ``.get(key,
default)`` in many places, each repeating the defaults. Here they are one dataclass (compare
timm's ``PretrainedCfg``): validated once when made, changed only with ``dataclasses.replace``
(which validates again), written to a checkpoint's ``config.json`` and into an exported ONNX
file's metadata, and read back by both.

Compatibility: the JSON form is the flat dict checkpoints have always had, so older effiseg
versions still read new files, and :meth:`ModelConfig.from_dict` reads every older file. A setting
an old file lacks is taken from the variant registry (``effiseg.runtime.variants``), the one place
defaults live; keys this version does not know (written by a newer one, or training bookkeeping
such as ``best_epoch``) are kept in ``extra`` and written back unchanged.

Torch-free, like the rest of ``effiseg.runtime``.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from .variants import get_variant
from .version import effiseg_version

MODEL_TYPE = "effisegnet"
MIN_INPUT_SIZE = 32  # the encoder's stride: a smaller input has no deepest feature map

# Multi-scale test-time augmentation: square sizes the network also runs at (multiples of the
# encoder's stride 32, so every decoder stage upsamples by exact factors of 2).
TTA_SIZE_STEP = 32
TTA_SIZE_RANGE = (64, 2048)


def parse_tta_sizes(value) -> tuple[int, ...]:
    """Multi-scale TTA sizes from a config value, metadata string or CLI text.

    Args:
        value: "352,416", a number, a sequence of numbers; "", "none", "off" or None for none.

    Returns:
        The sizes, sorted, each once; () for none.

    Raises:
        ValueError: a size that is not a whole number, or not a multiple of 32 in [64, 2048]
            (the message names it).

    Example:
        >>> parse_tta_sizes("416, 352")
        (352, 416)
    """
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


def parse_tta_recommendation(value) -> dict:
    """The TTA setting chosen on validation, as a checkpoint config or the ONNX metadata records it.

    Args:
        value: a mapping, its JSON text, or None / "" / {} for none.

    Returns:
        ``{"flips": bool, "sizes": [int, ...], "threshold": float | None}``; ``{}`` when none is recorded.

    Raises:
        ValueError: not JSON, not a mapping, unknown keys, bad sizes or a threshold outside (0, 1)
            (the message says which part and why).

    Example:
        >>> parse_tta_recommendation('{"flips": true, "sizes": [416, 352]}')
        {'flips': True, 'sizes': [352, 416], 'threshold': None}
    """
    if value in (None, "", {}):
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"TTA recommendation is not JSON: {e}") from None
        if value == {}:  # "{}": what the metadata of a file without a recommendation holds
            return {}
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


class ModelConfigError(ValueError):
    """A model config value is missing or invalid; the message names the field (and the file,
    where one was read)."""


@dataclass(frozen=True)
class ModelConfig:
    """What a trained EffiSegNet is and how to feed it; stored beside its weights.

    Args:
        variant (str): registered variant name, e.g. ``"effisegnet-lite2"`` (an ONNX file may carry a
            name this version does not know; it then needs every other field given).
        encoder (str): the timm encoder the variant builds on, e.g. ``"tf_efficientnet_lite2"``.
        input_size (int): the square side the model was trained at (pixels, at least 32).
        mean (tuple[float, float, float]): per-channel RGB mean of the input normalisation (0..1 scale).
        std (tuple[float, float, float]): per-channel RGB std of the input normalisation (positive).
        decoder_channels (int): width of the decoder (at least 1).
        deep_supervision (bool): whether the network has the auxiliary training heads.
        threshold (float): probability cut for the mask, in (0, 1).
        tta (bool): flip test-time augmentation as part of the model's evaluated setting.
        tta_sizes (tuple[int, ...]): multi-scale TTA sizes (multiples of 32), () for none.
        tta_recommended (dict): the TTA chosen on validation, a run-time recommendation
            (``{"flips": bool, "sizes": [...], "threshold": float | None}``), {} when none.
        min_region_px (int): predicted regions smaller than this are removed at evaluation (0: none).
        metrics (dict): evaluation results by split, as ``effiseg-eval`` writes them.
        untrained (bool): seeded random weights (benchmarks time these); never a result.
        effiseg_version (str): the effiseg version that wrote the config.
        extra (dict): everything else in the file, kept and written back unchanged (training
            bookkeeping such as ``best_epoch``, and keys from newer effiseg versions).

    Raises:
        ModelConfigError: a value is invalid; the message names the field.

    Example:
        >>> cfg = ModelConfig.for_variant("effisegnet-lite0", input_size=64)
        >>> cfg.mean, cfg.input_size
        ((0.5, 0.5, 0.5), 64)
        >>> dataclasses.replace(cfg, threshold=0.55).threshold
        0.55
    """

    variant: str
    encoder: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    decoder_channels: int
    deep_supervision: bool = False
    threshold: float = 0.5
    tta: bool = False
    tta_sizes: tuple[int, ...] = ()
    tta_recommended: dict = field(default_factory=dict)
    min_region_px: int = 0
    metrics: dict = field(default_factory=dict)
    untrained: bool = False
    effiseg_version: str = "unknown"
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        # Normalise the types a JSON file or a caller may give (lists, ints for floats), then check
        # ranges; object.__setattr__ because the instance is frozen from here on.
        def put(name, value):
            object.__setattr__(self, name, value)

        for name in ("variant", "encoder"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ModelConfigError(f"model config: {name} must be a non-empty string, "
                                       f"not {getattr(self, name)!r}")
        put("input_size", _whole(self.input_size, "input_size", MIN_INPUT_SIZE))
        put("decoder_channels", _whole(self.decoder_channels, "decoder_channels", 1))
        put("min_region_px", _whole(self.min_region_px, "min_region_px", 0))
        put("mean", _triple(self.mean, "mean", positive=False))
        put("std", _triple(self.std, "std", positive=True))
        threshold = _number(self.threshold, "threshold")
        if not 0.0 < threshold < 1.0:
            raise ModelConfigError(f"model config: threshold must be in (0, 1), got {threshold}")
        put("threshold", threshold)
        for name in ("deep_supervision", "tta", "untrained"):
            if not isinstance(getattr(self, name), (bool, int)) or getattr(self, name) not in (True, False):
                raise ModelConfigError(f"model config: {name} must be true or false, not {getattr(self, name)!r}")
            put(name, bool(getattr(self, name)))
        try:
            put("tta_sizes", parse_tta_sizes(self.tta_sizes))
        except ValueError as e:
            raise ModelConfigError(f"model config: tta_sizes: {e}") from None
        try:
            put("tta_recommended", parse_tta_recommendation(self.tta_recommended))
        except ValueError as e:
            raise ModelConfigError(f"model config: tta_recommended: {e}") from None
        for name in ("metrics", "extra"):
            if not isinstance(getattr(self, name), Mapping):
                raise ModelConfigError(f"model config: {name} must be a mapping, not {getattr(self, name)!r}")
            put(name, dict(getattr(self, name)))
        put("effiseg_version", str(self.effiseg_version))

    # ------------------------------------------------------------------ making one
    @classmethod
    def for_variant(cls, variant: str, **overrides) -> "ModelConfig":
        """A new model's config: the variant's registered settings, with ``overrides`` on top.

        Args:
            variant: a registered variant name (``effiseg.runtime.variants.list_variants()``).
            **overrides: any field (``input_size=416``, ``threshold=0.55``, ``extra={...}``); None
                keeps the variant's value.

        Returns:
            The validated config, stamped with this effiseg version.

        Raises:
            KeyError: ``variant`` is not registered (the message lists the known ones).
            TypeError: an override is not a field.
            ModelConfigError: an override is invalid.
        """
        v = get_variant(variant)
        base = {"variant": v.name, "encoder": v.encoder, "input_size": v.input_size, "mean": v.mean,
                "std": v.std, "decoder_channels": v.decoder_channels, "effiseg_version": effiseg_version()}
        base.update({k: val for k, val in overrides.items() if val is not None})
        return cls(**base)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "") -> "ModelConfig":
        """Read a config dict of any effiseg version (a checkpoint's config.json, or the ONNX metadata's).

        Known keys become fields; missing ones come from the variant registry (old checkpoints lack
        ``tta``, ``tta_sizes``, ``tta_recommended``, ``min_region_px`` or even ``mean``/``std``);
        unknown keys are kept in ``extra``.

        Args:
            data: the dict as read from JSON.
            source: the file it came from, named in errors.

        Returns:
            The validated config.

        Raises:
            ModelConfigError: ``variant`` is missing, a value is invalid, or a setting is missing for
                a variant this version does not know; the message names the field and ``source``.
        """
        where = f" ({source})" if source else ""
        if not isinstance(data, Mapping):
            raise ModelConfigError(f"model config{where} must be a JSON object, not {type(data).__name__}")
        if not data.get("variant"):
            raise ModelConfigError(f"model config{where} has no variant: not an effiseg model config")
        model_type = data.get("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise ModelConfigError(f"model config{where}: model_type {model_type!r} is not {MODEL_TYPE!r}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = dict(data.get("extra") or {}) if isinstance(data.get("extra"), Mapping) else {}
        extra.update({k: v for k, v in data.items() if k not in names and k not in ("model_type", "extra")})
        try:
            defaults = _variant_defaults(str(data["variant"]))
        except KeyError:
            defaults = {}  # a variant of a newer effiseg: everything must be in the file
        known = {**defaults, **{k: v for k, v in known.items() if v is not None}}
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                   and f.name not in known]
        if missing:
            raise ModelConfigError(f"model config{where}: variant {data['variant']!r} is not registered in this "
                                   f"effiseg version, and {', '.join(missing)} {'is' if len(missing) == 1 else 'are'}"
                                   " not given")
        try:
            return cls(**known, extra=extra)
        except ModelConfigError as e:
            raise ModelConfigError(f"{e}{where}") from None

    @classmethod
    def coerce(cls, config: "ModelConfig | Mapping[str, Any]") -> "ModelConfig":
        """``config`` itself, or a dict read with :meth:`from_dict` (for callers that still hold one)."""
        return config if isinstance(config, cls) else cls.from_dict(config)

    # ------------------------------------------------------------------ writing it
    def to_dict(self) -> dict:
        """The flat JSON form: every field, ``extra``'s keys beside them (as older versions wrote
        and read them), ``model_type`` first. ``from_dict(to_dict())`` gives an equal config."""
        out = {"model_type": MODEL_TYPE}
        out.update({k: v for k, v in self.extra.items() if k not in ("model_type",)})
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def with_extra(self, **items) -> "ModelConfig":
        """A copy with ``items`` added to ``extra`` (training bookkeeping such as ``best_epoch``)."""
        return dataclasses.replace(self, extra={**self.extra, **items})


def _variant_defaults(name: str) -> dict:
    v = get_variant(name)
    return {"variant": v.name, "encoder": v.encoder, "input_size": v.input_size, "mean": v.mean, "std": v.std,
            "decoder_channels": v.decoder_channels}


def _number(value, name: str) -> float:
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    if number is None or not math.isfinite(number):
        raise ModelConfigError(f"model config: {name} must be a finite number, not {value!r}")
    return number


def _whole(value, name: str, low: int) -> int:
    number = _number(value, name) if not isinstance(value, int) or isinstance(value, bool) else value
    if number != int(number) or int(number) < low:
        raise ModelConfigError(f"model config: {name} must be a whole number >= {low}, not {value!r}")
    return int(number)


def _triple(value, name: str, positive: bool) -> tuple[float, float, float]:
    try:
        items = tuple(value)
    except TypeError:
        items = ()
    if len(items) != 3:
        raise ModelConfigError(f"model config: {name} must be three numbers (R, G, B), not {value!r}")
    numbers = tuple(_number(v, name) for v in items)
    if positive and min(numbers) <= 0:
        raise ModelConfigError(f"model config: {name} must be positive, not {list(numbers)}")
    return numbers
