"""Checkpoints: a folder (or file pair) of ``model.safetensors`` + ``config.json``.

The JSON names the variant and the few settings needed to rebuild the network, so loading needs
no training code's globals and no pickle. The layout is that of a Hugging Face model repository.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from effiseg.runtime.model_config import ModelConfig
from effiseg.runtime.replace_file import replace_with_retry
from effiseg.runtime.version import effiseg_version  # noqa: F401  (re-exported for callers)

from .model import EffiSegNet, build_model

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def model_config(variant: str, input_size: int | None = None, decoder_channels: int | None = None,
                 deep_supervision: bool = False, threshold: float = 0.5, **extra) -> ModelConfig:
    """A new checkpoint's config: the variant's settings with these on top. ``extra``: further
    fields of :class:`ModelConfig` (``tta=True``, ``untrained=True``), anything else (training
    bookkeeping such as ``best_epoch=3``) goes into its ``extra``."""
    fields = set(ModelConfig.__dataclass_fields__) - {"extra"}
    return ModelConfig.for_variant(
        variant, input_size=input_size, decoder_channels=decoder_channels, deep_supervision=deep_supervision,
        threshold=threshold, **{k: v for k, v in extra.items() if k in fields},
        extra={k: v for k, v in extra.items() if k not in fields})


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """Accept a checkpoint folder, its config.json or its .safetensors file."""
    p = Path(path)
    if p.is_dir():
        weights, config = p / WEIGHTS_NAME, p / CONFIG_NAME
    elif p.suffix == ".json":
        config, weights = p, p.with_name(p.name[: -len(".json")] + ".safetensors")
        if not weights.exists():
            weights = p.parent / WEIGHTS_NAME
    else:
        weights, config = p, p.with_suffix(".json")
        if not config.exists():
            config = p.parent / CONFIG_NAME
    for f in (weights, config):
        if not f.is_file():
            raise FileNotFoundError(f"checkpoint {path}: missing {f}")
    return weights, config


def save_checkpoint(directory: str | Path, model: EffiSegNet, config: ModelConfig, stem: str | None = None) -> Path:
    """Write ``<stem>.safetensors`` + ``<stem>.json`` (or model.safetensors + config.json); the JSON
    is ``config.to_dict()`` (a dict of the old layout is read into a ``ModelConfig`` first)."""
    from safetensors.torch import save_file
    config = ModelConfig.coerce(config)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / (f"{stem}.safetensors" if stem else WEIGHTS_NAME)
    cfg_path = directory / (f"{stem}.json" if stem else CONFIG_NAME)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    tmp_w, tmp_c = weights.with_suffix(".tmp"), cfg_path.with_suffix(".jtmp")
    save_file(state, str(tmp_w), metadata={"format": "pt", "variant": config.variant})
    tmp_c.write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True), encoding="utf-8")
    replace_with_retry(tmp_w, weights)
    replace_with_retry(tmp_c, cfg_path)
    return weights


def read_config_file(path: str | Path) -> ModelConfig:
    """A config.json of any effiseg version as a ``ModelConfig`` (see ``ModelConfig.from_dict``);
    errors name the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the model config {path}: {e}") from None
    return ModelConfig.from_dict(data, source=str(path))


def load_config(path: str | Path) -> ModelConfig:
    """The config of a checkpoint (folder, config.json or .safetensors)."""
    return read_config_file(resolve_checkpoint(path)[1])


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[EffiSegNet, ModelConfig]:
    """Rebuild the network from its config and load its weights (eval mode)."""
    from safetensors.torch import load_file
    weights, cfg_path = resolve_checkpoint(path)
    config = read_config_file(cfg_path)
    model = build_model(config.variant, pretrained=False, ch=config.decoder_channels,
                        deep_supervision=config.deep_supervision)
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model.to(device).eval(), config
