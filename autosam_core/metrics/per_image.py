"""Per-image Dice and IoU of binary masks (averaging over images is the caller's: evaluation.evaluate_pairs).

Source: docs/DESIGN.md section 1 ("Metrics: per-image Dice and IoU after thresholding, averaged over
images"; threshold logits at 0, never min-max rescale them) and docs/ARCHITECTURE.md
("autosam_core.losses / metrics").

Conventions for a single image with prediction P and ground truth G (sets of foreground pixels):
``dice = 2|P & G| / (|P| + |G|)``, ``iou = |P & G| / |P | G|``; both empty -> (1.0, 1.0);
empty G with non-empty P (or the reverse) -> (0.0, 0.0). Values are always finite, in [0, 1].
Inputs may be numpy arrays or torch tensors (bool, or any numeric dtype holding only 0 and 1).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["dice_iou"]

ArrayLike = np.ndarray | torch.Tensor


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(x.shape) if hasattr(x, "shape") else tuple(np.shape(x))


def _binary_error(name: str, dtype: Any, lo: Any, hi: Any) -> ValueError:
    return ValueError(
        f"{name} must be binary (bool or values in {{0, 1}}), got dtype {dtype} with range "
        f"[{lo}, {hi}]; threshold logits at 0 (logits > 0) and divide 0/255 masks by 255"
    )


def _as_binary(x: ArrayLike, name: str, like: torch.Tensor | None = None) -> ArrayLike:
    """Validate that ``x`` holds only 0/1; return it as bool (a tensor on ``like``'s device if given)."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
        if like is not None:
            t = t.to(like.device)
        if t.dtype != torch.bool:
            if t.dtype in (torch.uint16, torch.uint32, torch.uint64):
                t = t.to(torch.int64)  # few ops exist for these dtypes
            if t.numel() and not bool(((t == 0) | (t == 1)).all()):
                raise _binary_error(name, x.dtype, float(t.min()), float(t.max()))
            t = t != 0
        return t
    a = np.asarray(x)
    if a.dtype != np.bool_:
        if a.size and not bool(((a == 0) | (a == 1)).all()):
            raise _binary_error(name, a.dtype, a.min(), a.max())
        a = a != 0
    if like is not None:
        return torch.from_numpy(np.ascontiguousarray(a)).to(like.device)
    return a


def _pair(pred: ArrayLike, gt: ArrayLike) -> tuple[ArrayLike, ArrayLike]:
    """Both inputs as bool arrays of one kind (torch if either is a tensor, on pred's device)."""
    if _shape(pred) != _shape(gt):
        raise ValueError(
            f"prediction shape {_shape(pred)} and ground-truth shape {_shape(gt)} differ"
        )
    if isinstance(pred, torch.Tensor) or isinstance(gt, torch.Tensor):
        ref = pred if isinstance(pred, torch.Tensor) else gt
        return _as_binary(pred, "prediction", like=ref), _as_binary(gt, "ground truth", like=ref)
    return _as_binary(pred, "prediction"), _as_binary(gt, "ground truth")


def _scores(inter: np.ndarray, psum: np.ndarray, gsum: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dice and IoU from integer counts (arrays of equal shape), empty/empty -> 1."""
    total = psum + gsum
    union = total - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        dice = np.where(total == 0, 1.0, 2.0 * inter / np.maximum(total, 1))
        iou = np.where(union == 0, 1.0, inter / np.maximum(union, 1))
    return dice.astype(np.float64), iou.astype(np.float64)


def _batch_counts(pred: ArrayLike, gt: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-image (intersection, |pred|, |gt|) for bool arrays of shape (B, ...)."""
    if isinstance(pred, torch.Tensor):
        flat_p = pred.reshape(pred.shape[0], -1)
        flat_g = gt.reshape(gt.shape[0], -1)
        inter = (flat_p & flat_g).sum(dim=1, dtype=torch.int64)
        psum = flat_p.sum(dim=1, dtype=torch.int64)
        gsum = flat_g.sum(dim=1, dtype=torch.int64)
        counts = torch.stack([inter, psum, gsum]).cpu().numpy()
        return counts[0], counts[1], counts[2]
    flat_p = pred.reshape(pred.shape[0], -1)
    flat_g = gt.reshape(gt.shape[0], -1)
    inter = np.logical_and(flat_p, flat_g).sum(axis=1, dtype=np.int64)
    return inter, flat_p.sum(axis=1, dtype=np.int64), flat_g.sum(axis=1, dtype=np.int64)


def dice_iou(pred_mask: ArrayLike, gt_mask: ArrayLike) -> tuple[float, float]:
    """Dice and IoU of one image's binary prediction against its ground truth.

    Source: docs/DESIGN.md section 1 (per-image Dice and IoU after thresholding); docs/ARCHITECTURE.md.

    Args:
        pred_mask: predicted mask of one image, numpy array or torch tensor, any shape (e.g.
            (H, W) or (1, H, W)), bool or numeric holding only 0 and 1.
        gt_mask: ground-truth mask, same shape and value rules.

    Returns:
        ``(dice, iou)`` as Python floats in [0, 1], never NaN. Both masks empty -> ``(1.0, 1.0)``;
        exactly one empty -> ``(0.0, 0.0)``.

    Raises:
        ValueError: shapes differ (names both), or a mask holds values other than 0/1 (e.g. a
            0/255 mask or probabilities).
    """
    pred, gt = _pair(pred_mask, gt_mask)
    inter, psum, gsum = _batch_counts(pred.reshape(1, -1), gt.reshape(1, -1))
    dice, iou = _scores(inter, psum, gsum)
    return float(dice[0]), float(iou[0])
