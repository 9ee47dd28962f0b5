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


def _nearest_source_index(in_size: torch.Tensor, out_size: torch.Tensor) -> torch.Tensor:
    """The source index of every output position under ``F.interpolate(mode="nearest")`` with a
    ``size``: ATen's ``nearest_idx`` (CPU and CUDA alike), ``min(floor(dst * scale), in - 1)`` with
    ``scale = float32(in) / float32(out)`` and the product rounded to float32. ``in_size`` and
    ``out_size``: 0-d int64 tensors (traced as shape arithmetic, not frozen at the traced size)."""
    dst = torch.arange(out_size, device=in_size.device)
    scale = in_size.to(torch.float32) / out_size.to(torch.float32)
    src = torch.floor(dst.to(torch.float32) * scale).to(torch.int64)
    return torch.minimum(src, in_size - 1)


def resize_matches_interpolate(in_size: int, out_size: int) -> bool:
    """Whether an ONNX ``Resize`` (nearest, asymmetric, floor) from ``in_size`` to ``out_size``
    picks the rows PyTorch's nearest interpolate picks. Resize is specified as
    ``floor(dst / (out / in))``, that is ``floor(dst * in / out)`` in exact arithmetic (what ONNX
    Runtime computes); PyTorch rounds ``in / out`` and the product to float32 first, which falls
    just below a whole number at some rows: at 369 rows from 12, PyTorch takes source row 3 for
    output row 123 (float32(12 / 369) * 123 = 3.9999998), Resize row 4. Power-of-two ratios (every
    feature map at 352 = 11 * 32, the training size) agree."""
    exact = torch.arange(out_size, dtype=torch.int64) * in_size // out_size
    return bool(torch.equal(_nearest_source_index(torch.tensor(in_size), torch.tensor(out_size)), exact))


def upsample_nearest_like(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``F.interpolate(x, size=like.shape[-2:], mode="nearest")``, value for value at every size,
    as two gathers with PyTorch's index arithmetic written out: what ONNX export traces where an
    ONNX ``Resize`` would round some indices differently (:func:`resize_matches_interpolate`)."""
    in_hw = torch._shape_as_tensor(x)[-2:].to(x.device)
    out_hw = torch._shape_as_tensor(like)[-2:].to(x.device)
    rows = _nearest_source_index(in_hw[0], out_hw[0])
    cols = _nearest_source_index(in_hw[1], out_hw[1])
    # Columns first, on the small map; then the full-size gather along H copies whole rows of W
    # contiguous values (the other order gathers element by element at full size: far slower in
    # ONNX Runtime on a CPU).
    return x.index_select(3, cols).index_select(2, rows)


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
    # How ONNX export traces the decoder's nearest upsampling: "gather" (upsample_nearest_like:
    # equal to PyTorch at every input size, needed for dynamic height/width) or "resize"
    # (F.interpolate -> ONNX Resize: a faster kernel, equal to PyTorch only at sizes where
    # resize_matches_interpolate holds for every feature map). effiseg-export chooses per export
    # (export/onnx_export.py); PyTorch itself always runs F.interpolate.
    onnx_upsampling = "gather"

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
        # multiples of 32 working. ONNX export may trace the same indices as explicit gathers: a
        # Resize rounds some of them differently at sizes that are not multiples of 32.
        if torch.onnx.is_in_onnx_export() and self.onnx_upsampling == "gather":
            ups = [upsample_nearest_like(b(f), x) for b, f in zip(self.branches, feats)]
        else:
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
        raise ImportError("timm is missing: pip install \"effiseg[train]\"") from e
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
