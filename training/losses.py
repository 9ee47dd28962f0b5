"""Dice + binary cross-entropy on sigmoid outputs (the paper's loss), plus a candidate fix.

Candidate (issue 5): ``boundary_weight`` > 0 up-weights the BCE of pixels within
``boundary_width`` pixels of the true polyp boundary (a band found with max-pooling, i.e. a
morphological gradient), aimed at the errors that concentrate at polyp borders.

Candidate (issue 21): ``distill_weight`` > 0 adds a soft-target term, the binary cross-entropy of
the student's logits against a teacher's probability map (the TTA ensemble of a converged model,
better than one pass near boundaries; training/distill.py writes the maps once). The target then
carries two channels: 0 the label, 1 the teacher's probabilities, moved by the augmentation with
the label (training/augment.py keeps channels after the first soft). The term's minimum is the
teacher's map itself, so the student learns the ensemble's soft boundary while the label terms keep
it anchored to the annotation.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossConfig:
    dice_weight: float = 1.0
    bce_weight: float = 1.0
    boundary_weight: float = 0.0
    boundary_width: int = 3
    deep_supervision_weight: float = 0.5
    smooth: float = 1.0
    distill_weight: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - Dice per image on sigmoid probabilities, averaged over the batch."""
    prob = torch.sigmoid(logits.float()).flatten(1)
    t = target.float().flatten(1)
    inter = (prob * t).sum(1)
    return (1 - (2 * inter + smooth) / (prob.sum(1) + t.sum(1) + smooth)).mean()


def boundary_band(target: torch.Tensor, width: int) -> torch.Tensor:
    k = 2 * width + 1
    dilated = F.max_pool2d(target, k, stride=1, padding=width)
    eroded = -F.max_pool2d(-target, k, stride=1, padding=width)
    return (dilated - eroded).clamp(0, 1)


def distillation_loss(logits: torch.Tensor, teacher_prob: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy against soft targets: smallest where sigmoid(logits) == teacher_prob."""
    return F.binary_cross_entropy_with_logits(logits.float(), teacher_prob.float())


def split_target(target: torch.Tensor, cfg: LossConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(label, teacher probabilities or None) from a (B, 1 or 2, H, W) target."""
    if target.shape[1] == 1:
        if cfg.distill_weight > 0:
            raise ValueError("loss.distill_weight > 0 needs the teacher's probability maps as the target's "
                             "second channel (training/distill.py); this training run feeds labels only")
        return target, None
    if target.shape[1] != 2:
        raise ValueError(f"target must have 1 channel (label) or 2 (label, teacher), got {target.shape[1]}")
    return target[:, :1], target[:, 1:]


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    target, teacher = split_target(target.float(), cfg)
    if cfg.boundary_weight > 0:
        weight = 1.0 + cfg.boundary_weight * boundary_band(target, cfg.boundary_width)
    else:
        weight = None
    bce = F.binary_cross_entropy_with_logits(logits.float(), target, weight=weight)
    loss = cfg.dice_weight * soft_dice_loss(logits, target, cfg.smooth) + cfg.bce_weight * bce
    if teacher is not None and cfg.distill_weight > 0:
        loss = loss + cfg.distill_weight * distillation_loss(logits, teacher)
    return loss


def total_loss(output, target: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """Handles the (main, [aux...]) output of deep supervision."""
    if isinstance(output, tuple):
        main, aux = output
        loss = segmentation_loss(main, target, cfg)
        if aux:
            loss = loss + cfg.deep_supervision_weight * sum(segmentation_loss(a, target, cfg) for a in aux) / len(aux)
        return loss
    return segmentation_loss(output, target, cfg)
