"""Tests for autosam_core.metrics and autosam_core.losses (paper Eq. 2-4; docs/DESIGN.md section 1)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from autosam_core.losses import bce_dice_loss, soft_dice_loss
from autosam_core.metrics import dice_iou

# ---------------------------------------------------------------- dice_iou


def test_both_empty_is_perfect():
    empty = np.zeros((8, 8), dtype=np.uint8)
    assert dice_iou(empty, empty) == (1.0, 1.0)


def test_empty_gt_one_predicted_pixel_is_zero():
    gt = np.zeros((8, 8), dtype=np.uint8)
    pred = gt.copy()
    pred[3, 4] = 1
    assert dice_iou(pred, gt) == (0.0, 0.0)
    assert dice_iou(gt, pred) == (0.0, 0.0)  # empty prediction, non-empty GT


def test_identical_is_perfect():
    mask = np.zeros((10, 10), dtype=bool)
    mask[2:6, 3:9] = True
    assert dice_iou(mask, mask) == (1.0, 1.0)
    t = torch.from_numpy(mask)
    assert dice_iou(t, t) == (1.0, 1.0)


def test_hand_computed_partial_overlap():
    # pred: 4 pixels, gt: 6 pixels, overlap 2 -> Dice 2*2/(4+6) = 0.4, IoU 2/(4+6-2) = 0.25
    pred = np.zeros((4, 6), dtype=np.uint8)
    gt = np.zeros((4, 6), dtype=np.uint8)
    pred[0, 0:4] = 1
    gt[0, 2:6] = 1
    gt[1, 4:6] = 1
    dice, iou = dice_iou(pred, gt)
    assert dice == pytest.approx(0.4)
    assert iou == pytest.approx(0.25)
    # mixed numpy / torch inputs, float 0/1 values, (1, H, W) shape
    dice_t, iou_t = dice_iou(torch.from_numpy(pred).float()[None], gt[None])
    assert (dice_t, iou_t) == pytest.approx((0.4, 0.25))
    assert isinstance(dice_t, float) and isinstance(iou_t, float)


def test_dice_iou_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(4, 4\).*\(4, 5\)"):
        dice_iou(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="binary"):
        dice_iou(np.full((4, 4), 255, dtype=np.uint8), np.ones((4, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match="binary"):
        dice_iou(torch.full((4, 4), 0.7), torch.ones(4, 4))


# ---------------------------------------------------------------- bce_dice_loss


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_bce_dice_matches_hand_computation_2x2():
    z = [0.0, 2.0, -1.0, 1.0]
    t = [0.0, 1.0, 0.0, 1.0]
    p = [_sigmoid(v) for v in z]
    bce = -sum(ti * math.log(pi) + (1 - ti) * math.log(1 - pi) for pi, ti in zip(p, t)) / 4
    tp = sum(pi * ti for pi, ti in zip(p, t))
    fp = sum(pi * (1 - ti) for pi, ti in zip(p, t))
    fn = sum((1 - pi) * ti for pi, ti in zip(p, t))
    dice = (2 * tp + 1) / (2 * tp + fn + fp + 1)
    expected = bce + (1 - dice)

    logits = torch.tensor(z).reshape(1, 1, 2, 2)
    targets = torch.tensor(t).reshape(1, 1, 2, 2)
    loss = bce_dice_loss(logits, targets)

    assert loss.ndim == 0
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert soft_dice_loss(logits, targets).item() == pytest.approx(1 - dice, rel=1e-6)


def test_dice_term_averaged_per_image():
    logits = torch.tensor([[[[3.0, -3.0], [-3.0, -3.0]]], [[[3.0, 3.0], [3.0, -3.0]]]])
    targets = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]], [[[1.0, 1.0], [0.0, 0.0]]]])
    per_image = [
        soft_dice_loss(logits[i : i + 1], targets[i : i + 1]).item() for i in range(2)
    ]
    assert soft_dice_loss(logits, targets).item() == pytest.approx(sum(per_image) / 2, rel=1e-6)


def test_bce_dice_gradient_and_dtypes():
    logits = torch.randn(2, 1, 8, 8, requires_grad=True)
    targets = (torch.rand(2, 1, 8, 8) > 0.5).to(torch.uint8)
    loss = bce_dice_loss(logits, targets)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    perfect = bce_dice_loss((targets.float() * 2 - 1) * 50, targets)
    assert perfect.item() == pytest.approx(0.0, abs=1e-4)


def test_bce_dice_rejects_bad_shapes_and_targets():
    with pytest.raises(ValueError, match=r"\(2, 1, 4, 4\).*\(2, 1, 4, 5\)"):
        bce_dice_loss(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 5))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        bce_dice_loss(torch.zeros(2, 4, 4), torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="255"):
        bce_dice_loss(torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 255.0))


def test_image_weighted_mean_counts_every_image_once():
    from autosam_core.evaluation import image_weighted_mean

    res = {"a": {"dice": 0.9, "iou": 0.8, "num_images": 3}, "b": {"dice": 0.3, "iou": 0.2, "num_images": 1}}
    assert abs(image_weighted_mean(res) - (3 * 0.9 + 0.3) / 4) < 1e-12  # 0.75, not the split mean 0.6
    assert abs(image_weighted_mean(res, "iou") - (3 * 0.8 + 0.2) / 4) < 1e-12
    assert image_weighted_mean({}) == 0.0
