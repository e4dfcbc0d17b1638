from __future__ import annotations

import math

import pytest
import torch

from stamp.model.losses import dice_loss, seg_loss


def test_dice_and_bce_hand_computed():
    logits = torch.tensor([[0.0, math.log(3)], [-math.log(3), 0.0]])  # p = .5, .75, .25, .5
    target = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    dice = 1 - (2 * (0.5 + 0.75) + 1) / (2.0 + 2 + 1)
    assert dice_loss(logits, target).item() == pytest.approx(dice, abs=1e-6)
    bce = -(math.log(0.5) + math.log(0.75) + math.log(0.75) + math.log(0.5)) / 4
    assert seg_loss(logits, target, 0.3, 0.7).item() == pytest.approx(0.3 * bce + 0.7 * dice, abs=1e-6)
    assert seg_loss(logits, target, 1.0, 0.0).item() == pytest.approx(bce, abs=1e-6)


def test_empty_truth_pushes_towards_empty():
    target = torch.zeros(4, 4)
    assert seg_loss(torch.full((4, 4), -6.0), target) < seg_loss(torch.full((4, 4), 2.0), target)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ in shape"):
        seg_loss(torch.zeros(4, 4), torch.zeros(4, 5))
