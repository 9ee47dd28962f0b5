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

from effiseg.runtime.model_config import ModelConfig, parse_tta_sizes


def _logits(model, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    out = out[0] if isinstance(out, (tuple, list)) else out
    return out.float()


FLIP_DIMS = ((3,), (2,), (2, 3))


def _flip_mean(model, x: torch.Tensor, batched: bool) -> torch.Tensor:
    if not batched:
        acc = _logits(model, x)
        for dims in FLIP_DIMS:
            acc = acc + torch.flip(_logits(model, torch.flip(x, dims)), dims)
        return acc / 4.0
    n = x.shape[0]
    batch = torch.cat([x, *(torch.flip(x, dims) for dims in FLIP_DIMS)], dim=0)
    out = _logits(model, batch)
    acc = out[:n]
    for k, dims in enumerate(FLIP_DIMS, 1):
        acc = acc + torch.flip(out[k * n:(k + 1) * n], dims)
    return acc / 4.0


def resolve_tta(config: ModelConfig, tta: bool | None = None, tta_sizes=None) -> tuple[bool, tuple[int, ...]]:
    """(flips, sizes): the checkpoint config's TTA settings, each replaced where given (not None)."""
    config = ModelConfig.coerce(config)
    flips = config.tta if tta is None else bool(tta)
    return flips, config.tta_sizes if tta_sizes is None else parse_tta_sizes(tta_sizes)


def resolve_tta_choice(config: ModelConfig, choice: str, tta_sizes=None) -> tuple[bool, tuple[int, ...], float | None]:
    """(flips, sizes, threshold) of a run-time ``--tta`` choice (runtime/tta.py's names) for a
    checkpoint: "none" one pass; "flip" the four flips; "multiscale" the setting chosen on validation
    (the config's ``tta_recommended``: its sizes, and flips when it has them). The threshold is the
    recommendation's for flip and multiscale (None: not recorded, or "none"). ``tta_sizes`` (not
    None) replaces the sizes; with them, "multiscale" needs no recommendation (flips on, as the
    recommended setting of the default model: a protocol run's checkpoint records none). ValueError
    for an unknown choice or a missing recommendation."""
    from effiseg.runtime.tta import TTA_CHOICES

    if choice not in TTA_CHOICES:
        raise ValueError(f"--tta must be one of {', '.join(TTA_CHOICES)}, not {choice!r}")
    recommended = ModelConfig.coerce(config).tta_recommended
    flips, sizes, threshold = False, (), None
    if choice == "flip":
        flips, threshold = True, recommended.get("threshold")
    elif choice == "multiscale":
        if not recommended.get("sizes") and tta_sizes is not None:
            recommended = {"flips": True, "sizes": (), **recommended}
        elif not recommended.get("sizes"):
            raise ValueError("this checkpoint's config records no multi-scale sizes chosen on validation "
                             "(tta_recommended); pass --tta-sizes, or use --tta flip")
        flips, sizes, threshold = recommended["flips"], tuple(recommended["sizes"]), recommended.get("threshold")
    if tta_sizes is not None:
        sizes = parse_tta_sizes(tta_sizes)
    return flips, sizes, threshold


def tta_logits(model, x: torch.Tensor, flips: bool = False, sizes=(), batch_flips: bool | None = None) -> torch.Tensor:
    """(N, 1, H, W) float32 logits of ``model`` on normalised ``x`` (N, 3, H, W), averaged over
    the flips (``flips``) and the square ``sizes`` (empty: H x W only).

    ``batch_flips``: run the four flips as one batch of 4N (one launch sequence: what a GPU and
    the exported graph want) or one after another (what a CPU wants: a batch 4x larger falls out of
    its caches; measured 2x slower on the 2-core EPYC). Default: batched on CUDA only."""
    batched = x.is_cuda if batch_flips is None else bool(batch_flips)
    run = (lambda m, t: _flip_mean(m, t, batched)) if flips else _logits
    sizes = parse_tta_sizes(sizes)  # validated, sorted, each size once
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
