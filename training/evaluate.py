"""Evaluation at the dataset's native mask resolution.

The network sees each image resized to its input size; its logits are resized back (bilinear) to
the image's own size before thresholding, so metrics are computed against the untouched ground
truth. (The paper computed metrics at the network's input size; for Kvasir-SEG's 352x352 split
and a 352 model the two coincide.)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from effiseg.runtime.model_config import ModelConfig
from effiseg.runtime.postprocess import logit_threshold  # noqa: F401  (re-exported for callers)

from .data import Sample, resize_rgb
from .metrics import image_scores, summarize
from .tta import tta_logits


def normalize_batch(images_u8: torch.Tensor, mean, std) -> torch.Tensor:
    """(B,3,H,W) uint8 -> normalised float, exactly as the exported graph does."""
    m = torch.tensor(mean, device=images_u8.device, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, device=images_u8.device, dtype=torch.float32).view(1, 3, 1, 1)
    return (images_u8.float() / 255.0 - m) / s


@torch.no_grad()
def predict_logits(model, config: ModelConfig, images: list[np.ndarray], device="cpu", batch_size: int = 8,
                   tta: bool = False, amp_dtype: torch.dtype | None = None, tta_sizes=()) -> list[np.ndarray]:
    """Logits (float32, H x W) at each image's native resolution; ``tta`` (flips) and ``tta_sizes``
    (multi-scale) as in training/tta.py."""
    config = ModelConfig.coerce(config)
    size = config.input_size
    model.eval()
    device = torch.device(device)
    results: list[np.ndarray] = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        batch = np.stack([resize_rgb(im, size) for im in chunk]).transpose(0, 3, 1, 2)
        x = normalize_batch(torch.from_numpy(np.ascontiguousarray(batch)).to(device), config.mean, config.std)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            logits = tta_logits(model, x, tta, tuple(tta_sizes or ()))
        for im, lg in zip(chunk, logits):
            h, w = im.shape[:2]
            if (h, w) != tuple(lg.shape[-2:]):
                lg = F.interpolate(lg[None], size=(h, w), mode="bilinear", align_corners=False)[0]
            results.append(lg[0].float().cpu().numpy())
    return results


def predict_probabilities(model, config: ModelConfig, images: list[np.ndarray], device="cpu", batch_size: int = 8,
                          tta: bool = False, amp_dtype: torch.dtype | None = None, tta_sizes=()) -> list[np.ndarray]:
    logits = predict_logits(model, config, images, device, batch_size, tta, amp_dtype, tta_sizes)
    return [1.0 / (1.0 + np.exp(-lg)) for lg in logits]


def score_logits(samples: list[Sample], logits: list[np.ndarray], threshold: float = 0.5,
                 min_region_px: int = 0) -> list[dict]:
    cut = logit_threshold(threshold)
    rows = []
    for s, lg in zip(samples, logits):
        pred = lg > cut
        if min_region_px > 0:
            from .analysis.postprocess import remove_small_regions
            pred = remove_small_regions(pred, min_region_px)
        row = {"stem": s.stem, **image_scores(pred, s.mask)}
        rows.append(row)
    return rows


def evaluate_samples(model, config: ModelConfig, samples: list[Sample], device="cpu", batch_size: int = 8,
                     threshold: float | None = None, tta: bool = False, min_region_px: int = 0,
                     amp_dtype: torch.dtype | None = None, tta_sizes=()) -> tuple[dict, list[dict], list[np.ndarray]]:
    """(summary, per-image rows, logits) for a list of samples; ``threshold`` None: the config's."""
    config = ModelConfig.coerce(config)
    threshold = float(config.threshold if threshold is None else threshold)
    logits = predict_logits(model, config, [s.image for s in samples], device, batch_size, tta, amp_dtype, tta_sizes)
    rows = score_logits(samples, logits, threshold, min_region_px)
    summary = summarize(rows)
    summary.update(threshold=threshold, tta=tta, min_region_px=min_region_px)
    if tta_sizes:
        summary["tta_sizes"] = list(tta_sizes)
    return summary, rows, logits


def write_mask_pngs(folder: Path, samples: list[Sample], logits: list[np.ndarray], threshold: float) -> None:
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    cut = logit_threshold(threshold)
    for s, lg in zip(samples, logits):
        Image.fromarray(((lg > cut) * 255).astype(np.uint8)).save(folder / f"{s.stem}.png")
