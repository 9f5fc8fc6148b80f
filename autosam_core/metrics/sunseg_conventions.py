"""The two SUN-SEG evaluation modes (``safe``, ``toolbox``): inputs, per-frame levels, degenerate frames.

Source: the AutoSAM paper (section 4, Table 3) evaluates SUN-SEG "following" Ji et al., "Video polyp
segmentation: a deep learning perspective", Machine Intelligence Research 19(6), 2022, whose python
toolbox (github.com/GewelsJI/VPS, ``eval/vps_evaluator.py``, ``eval/metrics.py``) fixes the
conventions that ``mode="toolbox"`` reproduces. ``mode="safe"`` (default) uses the same formulas but
never returns NaN or a value outside [0, 1]. docs/METRICS.md lists every difference.

This module owns what depends on the mode before any metric is computed:

* input validation: ground truth (H, W) bool or 0/1; prediction (H, W) uint8/integer 0..255 (divided
  by 255), bool (0/1) or float in [0, 1];
* the per-frame min-max rescale (toolbox: on by default, as the toolbox's ``mapminmax``; safe: off,
  docs/DESIGN.md: never rescale per image);
* the threshold level of each pixel (0..255; the binary prediction at threshold t is ``level >= t``):
  safe mode ``floor(255 p)`` (robust to float rounding); toolbox mode ``uint8(255 p)`` (truncation)
  for E_phi and F_beta, and for Dice / sensitivity the toolbox's float comparison
  ``p >= numpy.linspace(1, 0, 256)[::-1][t]``, which differs from ``t / 255`` by one ulp for 104
  levels (so a pixel at exactly k/255 is not counted at t = k for 68 values of k);
* degenerate ground truth (empty, full, fewer than 2 foreground or background pixels): detected and
  reported with :class:`DegenerateGroundTruthWarning`, naming the frame and the mode's consequence;
* the text of the ``conventions`` entry of every result.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "MODES", "NUM_THRESHOLDS", "ALPHA", "BETA2_F", "BETA2_FW", "EPS", "TOOLBOX_THRESHOLDS",
    "DegenerateGroundTruthWarning", "Frame", "check_mode", "as_ground_truth", "as_prediction",
    "prepare_frame", "binary_frame", "degenerate_reason", "warn_degenerate", "warn_toolbox_nan",
    "conventions",
]

MODES = ("safe", "toolbox")
NUM_THRESHOLDS = 256
ALPHA = 0.5  # S_alpha weight (AutoSAM paper; Fan et al. 2017)
BETA2_F = 0.3  # F_beta: beta^2 (AutoSAM paper: "0.3 and 1")
BETA2_FW = 1.0  # weighted F: beta^2
EPS = float(np.spacing(1))  # MATLAB eps, in the toolbox's (and pysodmetrics') denominators
TOOLBOX_THRESHOLDS = np.linspace(1, 0, NUM_THRESHOLDS)[::-1].copy()  # ascending, [t] ~ t / 255


class DegenerateGroundTruthWarning(UserWarning):
    """A frame whose ground truth is empty, full, or has fewer than 2 foreground/background pixels."""


def check_mode(mode: str) -> str:
    """Return ``mode`` if it is ``"safe"`` or ``"toolbox"``; else raise ValueError naming both."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def as_ground_truth(gt: Any) -> np.ndarray:
    """Ground truth as a 2-D bool array.

    Args:
        gt: (H, W) bool, or numbers holding only 0 and 1 (a 0/255 mask is refused: load masks with
            :func:`autosam_core.data.io.load_mask`, which binarises at >= 128).

    Returns:
        bool (H, W).

    Raises:
        ValueError: not 2-D, or values other than 0/1 (message gives dtype and range).
    """
    a = np.asarray(gt)
    if a.ndim != 2:
        raise ValueError(f"ground truth must be 2-D (H, W), got shape {a.shape}")
    if a.dtype != np.bool_:
        if a.size and not bool(((a == 0) | (a == 1)).all()):
            raise ValueError(
                f"ground truth must be binary (bool or 0/1), got dtype {a.dtype} with range "
                f"[{a.min()}, {a.max()}]; load masks with autosam_core.data.io.load_mask"
            )
        a = a != 0
    return a


def as_prediction(pred: Any, shape: tuple[int, ...]) -> np.ndarray:
    """Prediction map as float64 in [0, 1].

    Args:
        pred: (H, W) map: integers 0..255 (divided by 255, as the toolbox's ``pred / 255``), bool
            (0/1), or float in [0, 1] without NaN/inf.
        shape: the ground truth's shape; ``pred`` must have it.

    Returns:
        float64 (H, W) in [0, 1].

    Raises:
        ValueError: shape differs, values out of range, or another dtype (message gives the range).
    """
    a = np.asarray(pred)
    if a.shape != shape:
        raise ValueError(f"prediction shape {a.shape} and ground-truth shape {shape} differ")
    if a.dtype == np.bool_:
        return a.astype(np.float64)
    if np.issubdtype(a.dtype, np.integer):
        if a.size and (int(a.min()) < 0 or int(a.max()) > 255):
            raise ValueError(
                f"integer prediction must hold 0..255 grayscale levels, got dtype {a.dtype} with "
                f"range [{a.min()}, {a.max()}]"
            )
        return a / 255
    if np.issubdtype(a.dtype, np.floating):
        if a.size and (not np.isfinite(a).all() or float(a.min()) < 0 or float(a.max()) > 1):
            raise ValueError(
                f"float prediction must be a map in [0, 1] without NaN/inf, got dtype {a.dtype} "
                f"with range [{np.nanmin(a) if a.size else 0}, {np.nanmax(a) if a.size else 0}]"
            )
        return a.astype(np.float64)
    raise ValueError(f"prediction must be bool, integer 0..255 or float in [0, 1], got {a.dtype}")


@dataclass
class Frame:
    """One frame prepared for the metrics under one mode.

    Attributes:
        p: float64 (H, W) in [0, 1], after the optional min-max rescale.
        gt: bool (H, W).
        mode: ``"safe"`` or ``"toolbox"``.
        levels: uint8 (H, W), threshold level of each pixel for E_phi and F_beta.
        dice_levels: uint8 (H, W), threshold level for Dice and sensitivity (equal to ``levels``
            in safe mode; the toolbox's linspace comparison in toolbox mode).
    """

    p: np.ndarray
    gt: np.ndarray
    mode: str
    levels: np.ndarray
    dice_levels: np.ndarray

    @property
    def n(self) -> int:
        """Number of pixels H * W."""
        return int(self.gt.size)

    @property
    def g(self) -> int:
        """Number of ground-truth foreground pixels."""
        return int(np.count_nonzero(self.gt))


def _safe_levels(p: np.ndarray) -> np.ndarray:
    return np.clip(np.floor(p * 255 + 1e-9), 0, 255).astype(np.uint8)


def prepare_frame(pred: Any, gt: Any, mode: str, rescale: bool | None = None) -> Frame:
    """Validate one frame and compute its threshold levels under ``mode``.

    Args:
        pred: see :func:`as_prediction`.
        gt: see :func:`as_ground_truth`.
        mode: ``"safe"`` or ``"toolbox"``.
        rescale: per-frame min-max rescale of ``pred`` (skipped for a constant map); default True in
            toolbox mode, False in safe mode.

    Returns:
        :class:`Frame`.

    Raises:
        ValueError: unknown mode, bad shapes or values, or an empty (0-pixel) frame.
    """
    check_mode(mode)
    g = as_ground_truth(gt)
    if g.size == 0:
        raise ValueError("ground truth is empty (0 pixels)")
    p = as_prediction(pred, g.shape)
    if rescale is None:
        rescale = mode == "toolbox"
    if rescale:
        lo, hi = p.min(), p.max()
        if hi != lo:
            p = (p - lo) / (hi - lo)
    if mode == "toolbox":
        levels = (p * 255).astype(np.uint8)  # truncation, as the toolbox
        dice_levels = (np.searchsorted(TOOLBOX_THRESHOLDS, p, side="right") - 1).astype(np.uint8)
    else:
        levels = _safe_levels(p)
        dice_levels = levels
    return Frame(p=p, gt=g, mode=mode, levels=levels, dice_levels=dice_levels)


def binary_frame(pred_mask: Any, gt: Any, mode: str) -> Frame:
    """A frame whose prediction is a binary mask (levels 0 or 255), for single-threshold E_phi.

    Raises:
        ValueError: unknown mode, shapes differ, or ``pred_mask`` is not bool / 0-1.
    """
    check_mode(mode)
    g = as_ground_truth(gt)
    a = np.asarray(pred_mask)
    if a.shape != g.shape:
        raise ValueError(f"prediction shape {a.shape} and ground-truth shape {g.shape} differ")
    if a.dtype != np.bool_ and a.size and not bool(((a == 0) | (a == 1)).all()):
        raise ValueError(
            f"e_phi needs a binary prediction (bool or 0/1), got range [{a.min()}, {a.max()}]; "
            f"use e_phi_curve for 0-255 maps"
        )
    p = (a != 0).astype(np.float64)
    levels = (p * 255).astype(np.uint8)
    return Frame(p=p, gt=g, mode=mode, levels=levels, dice_levels=levels)


def degenerate_reason(g: int, n: int) -> str | None:
    """Why a ground truth with ``g`` of ``n`` foreground pixels is degenerate, or None.

    Returns one of ``"empty"``, ``"all foreground"``, ``"1 foreground pixel"``,
    ``"1 background pixel"``, or None.
    """
    if g == 0:
        return "empty"
    if g == n:
        return "all foreground"
    if g < 2:
        return "1 foreground pixel"
    if n - g < 2:
        return "1 background pixel"
    return None


_CONSEQUENCE = {
    ("safe", "empty"): "safe mode: Dice, Sensitivity, F_beta and weighted F are 1 only where the "
    "prediction is empty (0 otherwise); S_alpha = 1 - mean(pred); E_phi = predicted background share",
    ("toolbox", "empty"): "toolbox mode: Dice = Sensitivity = F_beta = weighted F = 0 whatever the "
    "prediction; S_alpha = 1 - mean(pred)",
    ("safe", "all foreground"): "S_alpha = mean(pred), E_phi = predicted foreground share",
    ("toolbox", "all foreground"): "S_alpha = mean(pred), E_phi = predicted foreground share",
    ("safe", "1 foreground pixel"): "safe mode: the std of one pixel is taken as 0",
    ("toolbox", "1 foreground pixel"): "toolbox mode: S_alpha = 0 (std with ddof=1 is NaN and "
    "the toolbox's max(0, NaN) gives 0)",
    ("safe", "1 background pixel"): "safe mode: the std of one pixel is taken as 0",
    ("toolbox", "1 background pixel"): "toolbox mode: S_alpha = 0 (std with ddof=1 is NaN and "
    "the toolbox's max(0, NaN) gives 0)",
}


def warn_degenerate(frame: Frame, name: str | None, stacklevel: int = 3) -> str | None:
    """Warn (:class:`DegenerateGroundTruthWarning`) if the frame's ground truth is degenerate.

    Returns:
        the reason (see :func:`degenerate_reason`) or None.
    """
    reason = degenerate_reason(frame.g, frame.n)
    if reason is not None:
        warnings.warn(
            f"frame {name or '<unnamed>'}: ground truth is {reason} ({frame.g} of {frame.n} pixels "
            f"foreground); {_CONSEQUENCE[(frame.mode, reason)]}",
            DegenerateGroundTruthWarning,
            stacklevel=stacklevel,
        )
    return reason


def warn_toolbox_nan(name: str | None, stacklevel: int = 3) -> None:
    """Warn that the toolbox's S_alpha was NaN and is reported as 0 (its ``max(0, NaN)``)."""
    warnings.warn(
        f"frame {name or '<unnamed>'}: toolbox S_alpha was NaN (a 1-pixel region, or a centroid "
        f"split leaving an empty or 1-pixel part) and is 0 by the toolbox's max(0, NaN)",
        DegenerateGroundTruthWarning,
        stacklevel=stacklevel,
    )


def conventions(mode: str, rescale: bool, drop_ends: bool) -> dict[str, str]:
    """The ``conventions`` entry of a result: one line per metric and protocol choice."""
    return {
        "thresholds": "256 thresholds t = 0..255 on the 0-255 map, binary prediction pred >= t "
                      "(t = 0: all foreground); '_mean' = mean of the averaged curve, '_max' = its max",
        "S_alpha": f"Fan et al. ICCV 2017, alpha = {ALPHA}",
        "E_phi": "Fan et al. IJCAI 2018, normalised by "
                 + ("H*W - 1 + eps (official code)" if mode == "toolbox" else "H*W"),
        "F_w_beta": f"Margolin et al. CVPR 2014, beta^2 = {BETA2_FW}",
        "F_beta": f"beta^2 = {BETA2_F}",
        "Dice": "2|P&G| / (|P|+|G|) per threshold; 'Dice' = mean over thresholds",
        "Sensitivity": "|P&G| / |G| per threshold; 'Sensitivity' = mean over thresholds",
        "prediction_scaling": "per-frame min-max rescale (toolbox)" if rescale
                              else "none (value / 255)",
        "end_frames": "first and last frame of each clip excluded (toolbox [1:-1])" if drop_ends
                      else "all frames kept",
        "empty_ground_truth": "overlap metrics 0 (toolbox)" if mode == "toolbox"
                              else "overlap metrics 1 only for an empty prediction, else 0",
    }
