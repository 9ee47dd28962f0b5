"""Test-time augmentation, one implementation for evaluation, the exported graph and the torch backend.

Flips: the image and its horizontal, vertical and double flips run as one batch of 4N (one launch
sequence), and their logits, flipped back, are averaged.

Sizes (multi-scale): the normalised input is also resized (bilinear) to each square size, run, and
its logits resized back to the input's size before averaging. A network trained with random zoom
sees polyps larger in training than in a plain test image, so it segments better when the test
image is enlarged too (the train/test resolution discrepancy of Touvron et al., "Fixing the
train-test resolution discrepancy", NeurIPS 2019); averaging over sizes also smooths the boundary,
where most wrong pixels lie (training/reports/failure-analysis-test).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _logits(model, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    out = out[0] if isinstance(out, (tuple, list)) else out
    return out.float()


def _flip_mean(model, x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    batch = torch.cat([x, torch.flip(x, dims=(3,)), torch.flip(x, dims=(2,)), torch.flip(x, dims=(2, 3))], dim=0)
    out = _logits(model, batch)
    a, b, c, d = out[:n], out[n:2 * n], out[2 * n:3 * n], out[3 * n:]
    return (a + torch.flip(b, dims=(3,)) + torch.flip(c, dims=(2,)) + torch.flip(d, dims=(2, 3))) / 4.0


def tta_logits(model, x: torch.Tensor, flips: bool = False, sizes=()) -> torch.Tensor:
    """(N, 1, H, W) float32 logits of ``model`` on normalised ``x`` (N, 3, H, W), averaged over
    the flips (``flips``) and the square ``sizes`` (empty: H x W only)."""
    run = _flip_mean if flips else _logits
    if not sizes:
        return run(model, x)
    h, w = x.shape[-2:]
    total = None
    for size in sizes:
        if (int(h), int(w)) == (size, size):
            out = run(model, x)
        else:
            xs = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
            out = F.interpolate(run(model, xs), size=(h, w), mode="bilinear", align_corners=False)
        total = out if total is None else total + out
    return total / len(sizes)
