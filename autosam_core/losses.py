"""Training loss of AutoSAM: binary cross-entropy plus soft Dice.

Source: AutoSAM paper (arXiv:2306.06370) Eq. 2-4, as summarised in docs/DESIGN.md section 1:
BCE + Dice with +1 smoothing, unweighted, on the sigmoid of SAM's logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["bce_dice_loss", "soft_dice_loss"]


def _check_pair(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError(
            f"logits and targets must be torch tensors, got {type(logits).__name__} "
            f"and {type(targets).__name__}"
        )
    if logits.shape != targets.shape:
        raise ValueError(
            f"logits shape {tuple(logits.shape)} and targets shape {tuple(targets.shape)} differ; "
            "expected both (B, 1, H, W)"
        )
    if logits.ndim != 4 or logits.shape[1] != 1:
        raise ValueError(
            f"logits and targets have shape {tuple(logits.shape)}; expected (B, 1, H, W)"
        )


def _check_targets(t: torch.Tensor) -> None:
    if t.numel() and (bool(t.min() < 0) or bool(t.max() > 1)):
        raise ValueError(
            f"targets must lie in [0, 1] (binary masks), found range "
            f"[{float(t.min())}, {float(t.max())}]; divide 0/255 masks by 255"
        )


def _soft_dice(logits: torch.Tensor, t: torch.Tensor, smooth: float) -> torch.Tensor:
    if not smooth > 0:
        raise ValueError(f"smooth must be > 0, got {smooth}")
    probs = torch.sigmoid(logits.float()).flatten(1)
    t = t.flatten(1)
    tp = (probs * t).sum(dim=1)
    fp = (probs * (1.0 - t)).sum(dim=1)
    fn = ((1.0 - probs) * t).sum(dim=1)
    dice = (2.0 * tp + smooth) / (2.0 * tp + fn + fp + smooth)
    return 1.0 - dice.mean()


def soft_dice_loss(
    logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0
) -> torch.Tensor:
    """Soft Dice loss on ``sigmoid(logits)``, computed per image and averaged over the batch.

    Source: AutoSAM paper Eq. 3-4 (docs/DESIGN.md section 1). With p = sigmoid(logits), t = targets,
    per image: TP = sum(p t), FP = sum(p (1 - t)), FN = sum((1 - p) t) and
    ``loss_i = 1 - (2 TP + smooth) / (2 TP + FN + FP + smooth)``; the result is ``mean_i loss_i``.

    Args:
        logits: float tensor (B, 1, H, W), unbounded.
        targets: tensor (B, 1, H, W) with values in [0, 1] (any dtype; cast to float32).
        smooth: additive smoothing (> 0; the paper uses 1).

    Returns:
        scalar float32 tensor in [0, 1], differentiable w.r.t. ``logits``.

    Raises:
        TypeError: inputs are not tensors.
        ValueError: shapes differ or are not (B, 1, H, W) (names both shapes), ``smooth <= 0``,
            or targets lie outside [0, 1] (e.g. 0/255 masks).
    """
    _check_pair(logits, targets)
    t = targets.to(torch.float32)
    _check_targets(t)
    return _soft_dice(logits, t, smooth)


def bce_dice_loss(
    logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0
) -> torch.Tensor:
    """BCE-with-logits (mean over all pixels) plus soft Dice loss, unweighted.

    Source: AutoSAM paper Eq. 2-4 (docs/DESIGN.md section 1; docs/ARCHITECTURE.md
    "autosam_core.losses"): ``L = BCE(sigmoid(logits), targets) + (1 - Dice)`` with Dice as in
    :func:`soft_dice_loss` (per image, +``smooth``, averaged over images). The BCE is computed
    from the logits (numerically stable) in float32 and averaged over every pixel of the batch,
    which equals the mean of per-image BCEs since all images in a batch share (H, W).

    Args:
        logits: float tensor (B, 1, H, W), unbounded (e.g. SAM's upsampled mask logits).
        targets: tensor (B, 1, H, W), values in [0, 1] (masks in {0, 1}; any dtype).
        smooth: Dice smoothing (> 0), default 1 as in the paper.

    Returns:
        scalar float32 tensor >= 0, differentiable w.r.t. ``logits``.

    Raises:
        TypeError: inputs are not tensors.
        ValueError: shape mismatch (message names both shapes), shape not (B, 1, H, W),
            ``smooth <= 0``, or targets outside [0, 1].
    """
    _check_pair(logits, targets)
    t = targets.to(torch.float32)
    _check_targets(t)
    if not smooth > 0:
        raise ValueError(f"smooth must be > 0, got {smooth}")
    bce = F.binary_cross_entropy_with_logits(logits.float(), t, reduction="mean")
    return bce + _soft_dice(logits, t, smooth)
