"""Boundary length of binary masks: how smooth a predicted mask is compared with its ground truth.

The boundary (perimeter) of a mask is the number of foreground pixels with at least one background
4-neighbour (pixels outside the image count as background). A speckled, halftone-like mask has a
boundary many times longer than the smooth ground truth of the same object; the ratio
``boundary_length(pred) / boundary_length(gt)`` is about 1 for a mask as smooth as the annotation
(issue 10's smoothness criterion: the mean ratio per benchmark must be <= 1.5).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def boundary_length(mask: np.ndarray) -> int:
    """Perimeter pixels of a binary mask.

    Args:
        mask: (H, W) bool or {0, 1} array.

    Returns:
        number of foreground pixels that touch the background (4-connectivity), >= 0.

    Raises:
        ValueError: ``mask`` is not 2-D.
    """
    m = np.asarray(mask).astype(bool)
    if m.ndim != 2:
        raise ValueError(f"boundary_length expects a 2-D mask, found shape {m.shape}")
    interior = ndimage.binary_erosion(m, structure=ndimage.generate_binary_structure(2, 1), border_value=0)
    return int(m.sum() - interior.sum())


def boundary_ratio(pred: np.ndarray, gt: np.ndarray) -> float | None:
    """``boundary_length(pred) / boundary_length(gt)``; None when the ground truth is empty (undefined).

    An empty prediction of a non-empty ground truth gives 0.0.
    """
    g = boundary_length(gt)
    if g == 0:
        return None
    return boundary_length(pred) / g
