"""Validation each epoch on the device: the split decoded once, scored in batches, read once.

``evaluate.evaluate_samples`` moves every image's logits to the host and scores it with numpy, which
a long run on a GPU pays every epoch. Here the resized images and the native-size masks stay on the
device (grouped by mask size, one group for Kvasir-SEG's 352x352 split), and the per-image
true/false positive counts are computed there; the host reads one small tensor per epoch. The
numbers are those of ``evaluate_samples`` (same resize, normalisation, bilinear return to the
mask's size, threshold and empty-mask conventions; tests/training/test_fast_step.py compares them).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from effiseg.runtime.postprocess import logit_threshold

from .data import Sample, resize_rgb
from .metrics import scores_from_counts, summarize


class DeviceValidation:
    def __init__(self, samples: list[Sample], size: int, mean, std, device: torch.device,
                 batch_size: int = 16):
        self.device, self.batch_size, self.size = device, batch_size, size
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.stems = [s.stem for s in samples]
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, s in enumerate(samples):
            by_shape.setdefault(tuple(s.mask.shape[:2]), []).append(i)
        # (positions in the split, uint8 images at the input size, bool masks at their own size)
        self.groups = []
        for shape, positions in by_shape.items():
            images = np.stack([resize_rgb(samples[i].image, size) for i in positions]).transpose(0, 3, 1, 2)
            masks = np.stack([samples[i].mask.astype(bool) for i in positions])
            self.groups.append((positions, torch.from_numpy(np.ascontiguousarray(images)).to(device),
                                torch.from_numpy(masks).to(device)))

    def __len__(self) -> int:
        return len(self.stems)

    @torch.no_grad()
    def counts(self, model, threshold: float, amp_dtype: torch.dtype | None, channels_last: bool) -> torch.Tensor:
        """(N, 3) int64 device tensor of tp, fp, fn per image, in the split's order."""
        model.eval()
        cut = logit_threshold(threshold)
        out = torch.zeros(len(self), 3, dtype=torch.int64, device=self.device)
        for positions, images, masks in self.groups:
            h, w = masks.shape[-2:]
            pos = torch.tensor(positions, dtype=torch.long).to(self.device)
            for start in range(0, images.shape[0], self.batch_size):
                x = (images[start:start + self.batch_size].float() / 255.0 - self.mean) / self.std
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device_type=self.device.type, dtype=amp_dtype or torch.bfloat16,
                                    enabled=amp_dtype is not None):
                    logits = model(x)
                if isinstance(logits, tuple):  # deep supervision in train mode only; eval gives one map
                    logits = logits[0]
                logits = logits.float()
                if tuple(logits.shape[-2:]) != (h, w):
                    logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
                pred = (logits[:, 0] > cut)
                target = masks[start:start + self.batch_size]
                tp = (pred & target).flatten(1).sum(1)
                fp = (pred & ~target).flatten(1).sum(1)
                fn = (~pred & target).flatten(1).sum(1)
                out[pos[start:start + self.batch_size]] = torch.stack([tp, fp, fn], 1)
        return out

    def evaluate(self, model, threshold: float, amp_dtype: torch.dtype | None = None,
                 channels_last: bool = False) -> tuple[dict, list[dict]]:
        """(summary, per-image rows) as ``evaluate_samples`` gives them; one read from the device."""
        counts = self.counts(model, threshold, amp_dtype, channels_last).cpu().numpy()
        rows = []
        for stem, (tp, fp, fn) in zip(self.stems, counts.tolist()):
            rows.append({"stem": stem, **scores_from_counts(tp, fp, fn), "tp": tp, "fp": fp, "fn": fn})
        summary = summarize(rows)
        summary.update(threshold=float(threshold), tta=False, min_region_px=0)
        return summary, rows
