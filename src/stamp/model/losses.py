"""The mask loss of docs/METHOD.md section 3."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - (2 sum(p g) + 1) / (sum(p) + sum(g) + 1), p = sigmoid(logits), over all cells."""
    p = logits.sigmoid().flatten()
    g = target.flatten().to(p.dtype)
    return 1 - (2 * (p * g).sum() + 1) / (p.sum() + g.sum() + 1)


def seg_loss(
    logits: torch.Tensor, target: torch.Tensor, bce_weight: float = 0.3, dice_weight: float = 0.7
) -> torch.Tensor:
    """Weighted BCE (mean over cells) + Dice for one mask; ``logits`` and ``target`` are (h, w)."""
    if logits.shape != target.shape:
        raise ValueError(
            f"mask logits {tuple(logits.shape)} and ground truth {tuple(target.shape)} differ in shape"
        )
    target = target.to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, target)
    return bce_weight * bce + dice_weight * dice_loss(logits, target)
