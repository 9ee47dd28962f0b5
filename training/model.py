"""EffiSegNet (Vezakis et al., 2024): a pre-trained EfficientNet encoder and a full-scale decoder.

Decoder, as in the paper and the authors' code: every one of the encoder's five feature maps goes
through a bias-free 3x3 convolution to ``ch`` channels, ReLU, BatchNorm; all five are upsampled
(nearest neighbour) to the input size and summed; BatchNorm; two Ghost modules; a 1x1 convolution
to one logit map. Optional deep-supervision heads give one extra logit map per scale.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .variants import Variant, get_variant


class GhostModule(nn.Module):
    """GhostNet's module: a cheap 1x1 'primary' convolution plus depthwise 'ghost' features."""

    def __init__(self, in_ch: int, out_ch: int, ratio: int = 2, dw_size: int = 3):
        super().__init__()
        self.out_ch = out_ch
        init_ch = math.ceil(out_ch / ratio)
        new_ch = init_ch * (ratio - 1)
        self.primary = nn.Sequential(
            nn.Conv2d(in_ch, init_ch, 1, bias=False), nn.BatchNorm2d(init_ch), nn.ReLU(inplace=True))
        self.cheap = nn.Sequential(
            nn.Conv2d(init_ch, new_ch, dw_size, padding=dw_size // 2, groups=init_ch, bias=False),
            nn.BatchNorm2d(new_ch), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        primary = self.primary(x)
        out = torch.cat([primary, self.cheap(primary)], dim=1)
        return out[:, : self.out_ch]


class ScaleBranch(nn.Module):
    """One encoder scale: 3x3 conv (no bias) -> ReLU -> BatchNorm, the order of the authors' code."""

    def __init__(self, in_ch: int, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, ch, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(F.relu(self.conv(x), inplace=True))


class EffiSegNet(nn.Module):
    def __init__(self, encoder: nn.Module, encoder_channels: list[int], ch: int = 32,
                 deep_supervision: bool = False):
        super().__init__()
        self.encoder = encoder
        self.branches = nn.ModuleList(ScaleBranch(c, ch) for c in encoder_channels)
        self.fuse_bn = nn.BatchNorm2d(ch)
        self.ghost1 = GhostModule(ch, ch)
        self.ghost2 = GhostModule(ch, ch)
        self.head = nn.Conv2d(ch, 1, 1)
        self.deep_supervision = deep_supervision
        self.aux_heads = nn.ModuleList(nn.Conv2d(ch, 1, 1) for _ in encoder_channels) if deep_supervision else None

    def forward(self, x: torch.Tensor):
        size = x.shape[-2:]
        feats = self.encoder(x)
        # Nearest upsampling to the exact input size (not a fixed factor) keeps sizes that are not
        # multiples of 32 working.
        ups = [F.interpolate(b(f), size=size, mode="nearest") for b, f in zip(self.branches, feats)]
        fused = ups[0]
        for u in ups[1:]:
            fused = fused + u
        out = self.head(self.ghost2(self.ghost1(self.fuse_bn(fused))))
        if self.deep_supervision and self.training:
            return out, [h(u) for h, u in zip(self.aux_heads, ups)]
        return out


def build_encoder(variant: Variant, pretrained: bool = False) -> tuple[nn.Module, list[int]]:
    try:
        import timm
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("timm is missing: pip install 'effiseg[train]'") from e
    encoder = timm.create_model(variant.encoder, pretrained=False, features_only=True,
                                out_indices=(0, 1, 2, 3, 4))
    if pretrained:
        from .pretrained import load_imagenet_weights
        load_imagenet_weights(encoder, variant)
    return encoder, list(encoder.feature_info.channels())


def build_model(variant: str | Variant, pretrained: bool = False, ch: int | None = None,
                deep_supervision: bool = False) -> EffiSegNet:
    v = get_variant(variant) if isinstance(variant, str) else variant
    encoder, channels = build_encoder(v, pretrained=pretrained)
    return EffiSegNet(encoder, channels, ch=ch or v.decoder_channels, deep_supervision=deep_supervision)
