"""EffiSegNet rewritten for inference: the same function with less work at full resolution.

Why: on an H200 the fast mode's batch-32 profile (benchmarks/RESULTS.md) spent 60% of its device
time in nearest upsampling and BatchNorm, the two kinds of operator that half precision does not
speed up because they only move memory. Most of that traffic is the decoder's, at the input's
full size: five 32-channel feature maps upsampled to H x W and summed, then BatchNorm, then the
first Ghost module's 1x1 convolution.

:func:`fold_for_inference` returns a module computing the same logits (up to float rounding) with
three exact rewrites, each checked against the original on a probe input before it is returned:

1. **Conv + BatchNorm folding.** Inference BatchNorm is a per-channel affine map; where it follows a
   convolution directly (encoder stem and blocks; the Ghost modules) it is folded into that
   convolution's weights and bias (``torch.nn.utils.fusion.fuse_conv_bn_eval``). timm's
   ``BatchNormAct2d`` keeps its activation.
2. **Sum at half resolution.** Nearest upsampling by whole powers of two composes exactly, so
   ``sum_k up_HxW(b_k)`` equals ``up_HxW(sum_k up_(H/2)x(W/2)(b_k))``: the five maps are summed at
   the encoder's first stride (a quarter of the pixels) and upsampled once. This holds when every
   feature map is exactly the input size over its stride, i.e. for inputs whose height and width
   are multiples of 32 (352 and 416, the default's sizes, are); other sizes take the direct path
   (every map upsampled to H x W, as the original), still with the folds.
3. **Pointwise work before the upsampling.** The decoder's BatchNorm after the sum, the first Ghost
   module's 1x1 convolution, its BatchNorm and ReLU act on each pixel alone, so they commute with
   nearest upsampling: they are folded into one 1x1 convolution with bias and run at half
   resolution on 32 channels, and only its 16-channel output is upsampled to H x W.

The sum's order of additions differs from the original's, so outputs differ by float rounding only
(about 1e-5 of the logits' scale in float32). Training keeps using :class:`EffiSegNet`; this
module has no training mode (BatchNorm statistics are baked in).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .model import EffiSegNet, GhostModule, upsample_nearest_like

# Float32 tolerance of the self-check, relative to the logits' largest magnitude (at least 1).
FOLD_CHECK_RTOL = 1e-4


class FoldError(RuntimeError):
    """The rewritten model does not reproduce the original; nothing is returned."""


def _is_batchnorm(m: nn.Module) -> bool:
    return isinstance(m, nn.BatchNorm2d) and m.track_running_stats and m.running_mean is not None


def _activation_after(bn: nn.Module) -> nn.Module:
    """What a BatchNorm module does after normalising: timm's ``BatchNormAct2d`` applies
    ``drop`` then ``act``; a plain ``nn.BatchNorm2d`` nothing."""
    parts = [getattr(bn, name) for name in ("drop", "act") if isinstance(getattr(bn, name, None), nn.Module)]
    parts = [p for p in parts if not isinstance(p, nn.Identity)]
    if not parts:
        return nn.Identity()
    return parts[0] if len(parts) == 1 else nn.Sequential(*parts)


def fold_conv_batchnorm(module: nn.Module) -> int:
    """Folds, in place, every BatchNorm that directly follows a convolution among a module's
    children (registration order: timm's EfficientNet blocks register ``conv_x`` right before
    the ``bn_y`` that normalises its output, and ``nn.Sequential`` runs in that order). Returns how
    many were folded. The caller checks the result numerically: adjacency is a convention, not
    a proof, which is why :func:`fold_for_inference` compares outputs before returning."""
    folded = 0
    for parent in module.modules():
        names = list(parent._modules)
        for first, second in zip(names, names[1:]):
            conv, bn = parent._modules[first], parent._modules[second]
            if (isinstance(conv, nn.Conv2d) and _is_batchnorm(bn)
                    and conv.out_channels == bn.num_features):
                fused = fuse_conv_bn_eval(conv.eval(), bn.eval())
                conv.weight, conv.bias = fused.weight, fused.bias
                parent._modules[second] = _activation_after(bn)
                folded += 1
    return folded


def _fold_affine_into_pointwise(bn_before: nn.BatchNorm2d, conv: nn.Conv2d) -> nn.Conv2d:
    """A 1x1 convolution preceded by an inference BatchNorm, as one 1x1 convolution:
    ``W (s x + t) + b = (W s) x + (W t + b)``. Exact for 1x1 kernels only (no padding sees t)."""
    if conv.kernel_size != (1, 1) or conv.groups != 1:
        raise FoldError("only a 1x1, ungrouped convolution absorbs a preceding BatchNorm")
    scale = bn_before.weight / torch.sqrt(bn_before.running_var + bn_before.eps)
    shift = bn_before.bias - bn_before.running_mean * scale
    w = conv.weight  # (out, in, 1, 1)
    bias = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels, dtype=w.dtype, device=w.device)
    # On the network's device and in its dtype, like every other layer of the copy.
    out = nn.Conv2d(conv.in_channels, conv.out_channels, 1, bias=True, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        out.weight.copy_(w * scale.view(1, -1, 1, 1))
        out.bias.copy_(bias + (w[:, :, 0, 0] * shift.view(1, -1)).sum(dim=1))
    return out


class FoldedGhost(nn.Module):
    """A Ghost module with its BatchNorms folded: 1x1 conv + ReLU, depthwise conv + ReLU, concat."""

    def __init__(self, ghost: GhostModule, primary: nn.Conv2d | None = None):
        super().__init__()
        self.out_ch = ghost.out_ch
        self.primary = primary if primary is not None else fuse_conv_bn_eval(ghost.primary[0], ghost.primary[1])
        self.cheap = fuse_conv_bn_eval(ghost.cheap[0], ghost.cheap[1])

    def primary_part(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.primary(x))

    def cheap_part(self, primary: torch.Tensor) -> torch.Tensor:
        out = torch.cat([primary, F.relu(self.cheap(primary))], dim=1)
        return out if out.shape[1] == self.out_ch else out[:, : self.out_ch]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cheap_part(self.primary_part(x))


def sizes_chain(feature_sizes, height: int, width: int) -> bool:
    """Whether every feature map is exactly the input size over a power of two that doubles from
    one map to the next, the first at stride 2 (so that upsampling composes exactly)."""
    for k, (h, w) in enumerate(feature_sizes):
        factor = 2 ** (k + 1)
        if h * factor != height or w * factor != width:
            return False
    return True


class FoldedEffiSegNet(nn.Module):
    """Inference-only EffiSegNet from :func:`fold_for_inference`. ``merge``: "auto" (sum at half
    resolution where the sizes chain, else at full resolution) or "direct" (always full
    resolution: what a dynamic-size ONNX export traces, since the choice would be frozen at the
    traced size)."""

    # As EffiSegNet.onnx_upsampling: how ONNX export traces the nearest upsampling.
    onnx_upsampling = "gather"

    def __init__(self, net: EffiSegNet):
        super().__init__()
        net = copy.deepcopy(net).eval()
        self.encoder = net.encoder
        self.encoder_folds = fold_conv_batchnorm(self.encoder)
        self.branches = net.branches
        self.ghost1 = FoldedGhost(net.ghost1, _fold_affine_into_pointwise(
            net.fuse_bn, fuse_conv_bn_eval(net.ghost1.primary[0], net.ghost1.primary[1])))
        self.ghost2 = FoldedGhost(net.ghost2)
        self.head = net.head
        self.merge = "auto"
        self.eval()

    def train(self, mode: bool = True):
        if mode:
            raise FoldError("a folded EffiSegNet is for inference only; train EffiSegNet")
        return super().train(False)

    def _upsample(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export() and self.onnx_upsampling == "gather":
            return upsample_nearest_like(x, like)
        return F.interpolate(x, size=like.shape[-2:], mode="nearest")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.encoder(x)
        maps = [b(f) for b, f in zip(self.branches, feats)]
        height, width = x.shape[-2], x.shape[-1]
        if self.merge == "auto" and sizes_chain([m.shape[-2:] for m in maps], height, width):
            fused = maps[-1]
            for m in reversed(maps[:-1]):
                fused = self._upsample(fused, m) + m
            primary = self._upsample(self.ghost1.primary_part(fused), x)
        else:
            fused = self._upsample(maps[0], x)
            for m in maps[1:]:
                fused = fused + self._upsample(m, x)
            primary = self.ghost1.primary_part(fused)
        return self.head(self.ghost2(self.ghost1.cheap_part(primary)))


def fold_for_inference(net: nn.Module, probe_size: int | tuple[int, int] = 352,
                       check: bool = True) -> nn.Module:
    """An inference copy of ``net`` with the rewrites above (on ``net``'s device and dtype); ``net``
    is left untouched. Anything but an :class:`EffiSegNet` is returned as is. With ``check``, both
    run in float32 on the CPU (where no TF32 or half precision blurs the comparison) on a random
    probe batch at ``probe_size``, and :class:`FoldError` is raised unless they agree within
    ``FOLD_CHECK_RTOL`` of the logits' scale."""
    if not isinstance(net, EffiSegNet):
        return net
    folded = FoldedEffiSegNet(net)
    if check:
        h, w = (probe_size, probe_size) if isinstance(probe_size, int) else probe_size
        param = next(net.parameters())
        on_cpu_fp32 = param.device.type == "cpu" and param.dtype == torch.float32
        reference = net if on_cpu_fp32 else copy.deepcopy(net).cpu().float()
        candidate = folded if on_cpu_fp32 else copy.deepcopy(folded).cpu().float()
        probe = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))
        was_training = reference.training
        reference.eval()
        try:
            with torch.no_grad():
                want, got = reference(probe), candidate(probe)
        finally:
            reference.train(was_training)
        err = float((want - got).abs().max())
        scale = max(1.0, float(want.abs().max()))
        if not err <= FOLD_CHECK_RTOL * scale:
            raise FoldError(f"the folded model differs from the original by {err:.3g} (logit scale {scale:.3g}) "
                            f"at {h}x{w}")
    return folded
