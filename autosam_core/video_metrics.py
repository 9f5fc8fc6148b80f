"""SUN-SEG video polyp segmentation metrics (AutoSAM paper, section 4 "Evaluation Metrics", Table 3).

The AutoSAM paper evaluates SUN-SEG "following [22]" (Ji et al., "Video polyp segmentation: a deep
learning perspective", Machine Intelligence Research 19(6), 2022) with six metrics: S_alpha,
E_phi^mean, F^w_beta, F_beta^mean, Dice and Sen. This module implements them from the metric papers:

* S_alpha, structure measure: Fan, Cheng, Liu, Li, Borji, "Structure-measure: a new way to evaluate
  foreground maps", ICCV 2017. alpha = 0.5.
* E_phi, enhanced-alignment measure: Fan, Gong, Cao, Ren, Cheng, Borji, "Enhanced-alignment measure
  for binary foreground map evaluation", IJCAI 2018. Reported as the mean over 256 thresholds.
* F^w_beta, weighted F-measure: Margolin, Zelnik-Manor, Tal, "How to evaluate foreground maps?",
  CVPR 2014. beta^2 = 1.
* F_beta (Achanta et al., CVPR 2009) with beta^2 = 0.3, Dice and sensitivity: mean over 256
  thresholds. (The AutoSAM paper's text prints Dice = 2|P&G| / |P|G| and
  F_beta = (1+b^2)PR / (b^2 (P+R)); both are typos: the standard forms used here and by the
  SUN-SEG toolbox are Dice = 2|P&G| / (|P|+|G|) and F_beta = (1+b^2)PR / (b^2 P + R).)

Threshold protocol (SUN-SEG): a prediction is a grayscale map with values 0..255; curve index t
(0..255) is the binary prediction ``pred >= t``. At t = 0 every pixel is foreground, so the mean
over thresholds of a *perfect* binary (0/255) prediction is below 1 for Dice, F_beta and E_phi
(for example Dice(t=0) = 2|G| / (H*W + |G|)); the max over thresholds is 1.

Averaging: each frame gives two scalars (S_alpha, F^w_beta) and four 256-point curves (E_phi,
F_beta, Dice, Sensitivity). Frames are averaged per clip (scalars and curves element-wise), then
clips are averaged; "mean" metrics are the mean of the averaged curve over the thresholds, "max"
metrics its maximum. ``averaging="frame"`` pools all frames instead.

Two modes:

``mode="toolbox"`` reproduces the conventions of the official SUN-SEG python evaluation toolbox
(github.com/GewelsJI/VPS, ``eval/vps_evaluator.py`` and ``eval/metrics.py``), re-implemented here:

* the ground truth is binarised (load_mask, ``>= 128``; the toolbox uses ``> 128``: identical for
  0/255 masks) and each prediction map is divided by 255 and min-max rescaled per frame when it is
  not constant;
* F_beta and E_phi curves threshold the 8-bit level ``uint8(p * 255)`` (truncation) at t = 0..255;
  Dice and Sensitivity compare the float map with ``numpy.linspace(1, 0, 256)`` (``p >= thr``), which
  differs by one float ulp from ``t / 255`` for some levels: reproduced exactly;
* E_phi divides by ``H*W - 1 + eps`` (the official code's normaliser), so a perfect prediction
  scores ``H*W / (H*W - 1)``, slightly above 1;
* S_alpha uses the sample std (ddof = 1) and splits the frame at ``round(centroid) + 1``
  (numpy round-half-even); a 1-pixel region or an empty/1-pixel quadrant makes the toolbox's value
  NaN, and its final ``max(0, S)`` turns that NaN into 0: reproduced (so a 1-pixel ground truth, or
  one whose centroid rounds to the last row/column, scores S_alpha = 0 even for a perfect map);
* empty ground truth: Dice = Sensitivity = F_beta = F^w_beta = 0 whatever the prediction (the
  toolbox's ``if intersection == 0: 0`` and ``if all(~gt): wfm = 0``); S_alpha = 1 - mean(pred) and
  E_phi uses the paper's special case (1 - pred), as in the papers;
* the first and the last frame of every clip are excluded (the toolbox's ``[1:-1]``, after DAVSOD);
  a clip left with no frame gives NaN (the toolbox's mean over nothing) and so does the dataset mean;
* a prediction whose size differs from its ground truth is resized to it (bilinear).
  Values are not rounded (the toolbox prints 3 decimals).

``mode="safe"`` (default) uses the same formulas but never returns NaN or a value outside [0, 1]:
no min-max rescaling (docs/DESIGN.md: never rescale per image; it turns a near-empty map into a full-range
one), E_phi divides by H*W, std/variance of a single pixel is 0, empty quadrants are skipped, and an
empty ground truth scores the overlap metrics (Dice, Sensitivity, F_beta at each threshold, and
F^w_beta) 1 only for an empty prediction and 0 otherwise (the convention of
``autosam_core.metrics.dice_iou``); all frames are kept. Degenerate ground truth (empty, fewer than 2
foreground pixels, full, fewer than 2 background pixels) is reported with a
:class:`DegenerateGroundTruthWarning` naming the frame (in both modes) and listed in the output.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

__all__ = [
    "MODES",
    "NUM_THRESHOLDS",
    "DegenerateGroundTruthWarning",
    "FramePairingWarning",
    "FrameScores",
    "s_alpha",
    "e_phi",
    "e_phi_curve",
    "weighted_f_beta",
    "f_beta_curve",
    "dice_curve",
    "sensitivity_curve",
    "frame_scores",
    "evaluate_frames",
    "evaluate_clips",
    "add_metrics_arguments",
    "cmd_metrics",
    "metrics_main",
]

MODES = ("safe", "toolbox")
NUM_THRESHOLDS = 256
ALPHA = 0.5  # S_alpha weight (AutoSAM paper; Fan et al. 2017)
BETA2_F = 0.3  # F_beta (AutoSAM paper: "0.3 and 1")
BETA2_FW = 1.0  # weighted F
_EPS = float(np.spacing(1))  # MATLAB eps, used by the official toolbox's denominators
_TOOLBOX_THRESHOLDS = np.linspace(1, 0, NUM_THRESHOLDS)[::-1].copy()  # ascending, [t] ~ t/255
_FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_CURVES = ("E_phi", "F_beta", "Dice", "Sensitivity")
_SHOW = 5  # names shown in a warning; the output lists all


class DegenerateGroundTruthWarning(UserWarning):
    """A frame whose ground truth is empty, full, or has fewer than 2 foreground/background pixels."""


class FramePairingWarning(UserWarning):
    """Frames or clips that could not be paired, were excluded, or were resized (all listed)."""


# ----- input validation ---------------------------------------------------------------------------
def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def _as_gt(gt: Any) -> np.ndarray:
    """Ground truth as a 2-D bool array (accepts bool or numbers holding only 0 and 1)."""
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


def _as_pred(pred: Any, shape: tuple[int, ...]) -> np.ndarray:
    """Prediction map as float64 in [0, 1]: integers 0..255 are divided by 255, bool is 0/1."""
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
        return a / 255  # float64, as the toolbox's ``pred / 255``
    if np.issubdtype(a.dtype, np.floating):
        if a.size and (not np.isfinite(a).all() or float(a.min()) < 0 or float(a.max()) > 1):
            raise ValueError(
                f"float prediction must be a map in [0, 1] without NaN/inf, got dtype {a.dtype} "
                f"with range [{np.nanmin(a) if a.size else 0}, {np.nanmax(a) if a.size else 0}]"
            )
        return a.astype(np.float64)
    raise ValueError(f"prediction must be bool, integer 0..255 or float in [0, 1], got {a.dtype}")


@dataclass
class _Frame:
    """One frame prepared for the metrics (internal)."""

    p: np.ndarray  # float64 (H, W) in [0, 1] (after the mode's optional min-max rescale)
    gt: np.ndarray  # bool (H, W)
    mode: str
    levels: np.ndarray  # uint8 (H, W): threshold level of each pixel for F_beta / E_phi

    @property
    def n(self) -> int:
        return int(self.gt.size)

    @property
    def g(self) -> int:
        return int(np.count_nonzero(self.gt))


def _prepare(pred: Any, gt: Any, mode: str, rescale: bool | None) -> _Frame:
    _check_mode(mode)
    g = _as_gt(gt)
    if g.size == 0:
        raise ValueError("ground truth is empty (0 pixels)")
    p = _as_pred(pred, g.shape)
    if rescale is None:
        rescale = mode == "toolbox"
    if rescale:
        lo, hi = p.min(), p.max()
        if hi != lo:
            p = (p - lo) / (hi - lo)
    if mode == "toolbox":
        levels = (p * 255).astype(np.uint8)  # truncation, as the toolbox
    else:
        levels = np.clip(np.floor(p * 255 + 1e-9), 0, 255).astype(np.uint8)
    return _Frame(p=p, gt=g, mode=mode, levels=levels)


def _degenerate_reason(g: int, n: int) -> str | None:
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


def _warn_degenerate(frame: _Frame, name: str | None, stacklevel: int = 3) -> str | None:
    reason = _degenerate_reason(frame.g, frame.n)
    if reason is not None:
        warnings.warn(
            f"frame {name or '<unnamed>'}: ground truth is {reason} ({frame.g} of {frame.n} pixels "
            f"foreground); {_CONSEQUENCE[(frame.mode, reason)]}",
            DegenerateGroundTruthWarning,
            stacklevel=stacklevel,
        )
    return reason


# ----- S_alpha (Fan et al., ICCV 2017) ------------------------------------------------------------
def _object_score(values: np.ndarray, mode: str) -> float:
    """O = 2 x / (x^2 + 1 + sigma_x) over one region (Fan et al. 2017, Eq. 4-5)."""
    x = values.mean()
    if mode == "toolbox":
        sigma = values.std(ddof=1)  # NaN for one pixel, as the toolbox
        return 2 * x / (x * x + 1 + sigma + _EPS)
    sigma = values.std(ddof=1) if values.size >= 2 else 0.0
    return 2 * x / (x * x + 1 + sigma)  # denominator >= 1


def _ssim(a: np.ndarray, b: np.ndarray, mode: str) -> float:
    """Region SSIM of Fan et al. 2017 (Eq. 7): 4 x y s_xy / ((x^2 + y^2)(s_x^2 + s_y^2))."""
    n = a.size
    x, y = a.mean(), b.mean()
    denom = n - 1 if mode == "toolbox" else max(n - 1, 1)
    sx = ((a - x) ** 2).sum() / denom
    sy = ((b - y) ** 2).sum() / denom
    sxy = ((a - x) * (b - y)).sum() / denom
    num = 4 * x * y * sxy
    den = (x * x + y * y) * (sx + sy)
    if num != 0:  # NaN != 0 is True: the toolbox's NaN propagates
        return num / (den + _EPS) if mode == "toolbox" else num / den
    if den == 0:
        return 1.0
    return 0.0


def _region_score(p: np.ndarray, gt: np.ndarray, mode: str) -> float:
    """S_r: split at the ground-truth centroid into 4 parts, area-weighted SSIM (Fan et al. 2017)."""
    h, w = gt.shape
    area = np.count_nonzero(gt)
    cx = np.round(np.sum(gt.sum(axis=0) * np.arange(w)) / area)
    cy = np.round(np.sum(gt.sum(axis=1) * np.arange(h)) / area)
    x, y = int(cx) + 1, int(cy) + 1  # 1-based split as the official code
    g = gt.astype(np.float64)
    parts = (
        (slice(0, y), slice(0, x), x * y),
        (slice(0, y), slice(x, w), y * (w - x)),
        (slice(y, h), slice(0, x), (h - y) * x),
        (slice(y, h), slice(x, w), None),
    )
    weights = [pa[2] / (h * w) for pa in parts[:3]]
    weights.append(1 - sum(weights))
    score = 0.0
    for (rows, cols, _), weight in zip(parts, weights):
        pa, ga = p[rows, cols], g[rows, cols]
        if pa.size == 0 and mode == "safe":
            continue  # zero-area part (weight 0): skipped instead of NaN
        score += weight * _ssim(pa, ga, mode)
    return score


def _s_alpha_value(frame: _Frame, alpha: float) -> tuple[float, bool]:
    """(S_alpha, whether a toolbox NaN was turned into 0)."""
    p, gt = frame.p, frame.gt
    y = frame.g / frame.n
    if y == 0:
        return float(1 - p.mean()), False
    if y == 1:
        return float(p.mean()), False
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        s_o = y * _object_score(p[gt], frame.mode) + (1 - y) * _object_score(1 - p[~gt], frame.mode)
        s_r = _region_score(p, gt, frame.mode)
        s = alpha * s_o + (1 - alpha) * s_r
    if frame.mode == "toolbox":
        if not s > 0:  # Python max(0, s): NaN and negatives give 0
            return 0.0, bool(math.isnan(s))
        return float(s), False
    return float(min(max(s, 0.0), 1.0)), False


def s_alpha(pred: Any, gt: Any, alpha: float = ALPHA, mode: str = "safe", *,
            rescale: bool | None = None, name: str | None = None) -> float:
    """Structure measure S_alpha of one frame (Fan et al., "Structure-measure", ICCV 2017).

    ``S = alpha * S_o + (1 - alpha) * S_r`` with alpha = 0.5 (AutoSAM paper).
    Object-aware ``S_o = mu * O_FG + (1 - mu) * O_BG``, mu = share of foreground pixels in the ground
    truth, ``O = 2 x / (x^2 + 1 + sigma_x)`` with x, sigma_x the mean and sample std of the map over
    the foreground (O_FG) or of 1 - map over the background (O_BG). Region-aware ``S_r``: split the
    frame at the ground-truth centroid (``round(c) + 1``, 1-based as the official code) into four
    parts, ``S_r = sum_k w_k ssim_k`` with w_k the part's share of the frame area and
    ``ssim = 4 x y s_xy / ((x^2 + y^2)(s_x^2 + s_y^2))`` (1 where numerator and denominator are 0,
    0 where only the numerator is 0).

    Args:
        pred: prediction map, (H, W): uint8/integer 0..255, bool, or float in [0, 1].
        gt: ground truth, (H, W), bool or 0/1.
        alpha: weight of S_o.
        mode: ``"safe"`` or ``"toolbox"`` (module docstring).
        rescale: min-max rescale the map first; default True in toolbox mode, False in safe mode.
        name: frame name used in warnings.

    Returns:
        float. Empty ground truth: ``1 - mean(pred)``; full ground truth: ``mean(pred)`` (paper's
        special cases, both modes). Safe mode: clipped to [0, 1], the std/variance of one pixel is 0
        and zero-area parts are skipped, never NaN. Toolbox mode: ``max(0, S)`` with NaN -> 0, as the
        toolbox (a 1-pixel foreground/background, or a split leaving an empty or 1-pixel part, gives
        0); the value can exceed 1 by rounding only.

    Warns:
        DegenerateGroundTruthWarning: ground truth empty, full, or with < 2 foreground/background
        pixels; in toolbox mode also when a NaN was turned into 0.
    """
    frame = _prepare(pred, gt, mode, rescale)
    _warn_degenerate(frame, name)
    value, nan_to_zero = _s_alpha_value(frame, alpha)
    if nan_to_zero:
        _warn_toolbox_nan(name)
    return value


def _warn_toolbox_nan(name: str | None) -> None:
    warnings.warn(
        f"frame {name or '<unnamed>'}: toolbox S_alpha was NaN (a 1-pixel region, or a centroid "
        f"split leaving an empty or 1-pixel part) and is 0 by the toolbox's max(0, NaN)",
        DegenerateGroundTruthWarning,
        stacklevel=3,
    )


# ----- threshold counts and curves -------------------------------------------------------------
def _level_counts(frame: _Frame) -> tuple[np.ndarray, np.ndarray]:
    """(TP[t], predicted-positive[t]) for ``levels >= t``, t = 0..255, float64 (256,)."""
    all_hist = np.bincount(frame.levels.ravel(), minlength=NUM_THRESHOLDS)
    fg_hist = np.bincount(frame.levels[frame.gt], minlength=NUM_THRESHOLDS)
    pp = np.cumsum(all_hist[::-1])[::-1]
    tp = np.cumsum(fg_hist[::-1])[::-1]
    return tp.astype(np.float64), pp.astype(np.float64)


def _medical_counts(frame: _Frame) -> tuple[np.ndarray, np.ndarray]:
    """Counts for Dice/Sensitivity: toolbox compares floats with linspace(1, 0, 256)."""
    if frame.mode != "toolbox":
        return _level_counts(frame)
    s_all = np.sort(frame.p, axis=None)
    s_fg = np.sort(frame.p[frame.gt])
    pp = s_all.size - np.searchsorted(s_all, _TOOLBOX_THRESHOLDS, side="left")
    tp = s_fg.size - np.searchsorted(s_fg, _TOOLBOX_THRESHOLDS, side="left")
    return tp.astype(np.float64), pp.astype(np.float64)


def _dice_from_counts(tp: np.ndarray, pp: np.ndarray, g: int, mode: str) -> np.ndarray:
    total = pp + g
    with np.errstate(divide="ignore", invalid="ignore"):
        if mode == "toolbox":
            return np.where(tp == 0, 0.0, 2 * tp / np.maximum(total, 1))
        return np.where(total == 0, 1.0, 2 * tp / np.maximum(total, 1))


def _sensitivity_from_counts(tp: np.ndarray, pp: np.ndarray, g: int, mode: str) -> np.ndarray:
    if g == 0:
        if mode == "toolbox":
            return np.zeros_like(tp)
        return np.where(pp == 0, 1.0, 0.0)
    return np.where(tp == 0, 0.0, tp / g)


def _f_from_counts(tp: np.ndarray, pp: np.ndarray, g: int, beta2: float, mode: str) -> np.ndarray:
    if mode == "toolbox":
        precision = tp / np.where(pp == 0, 1, pp)
        recall = tp / max(g, 1)
        num = (1 + beta2) * precision * recall
        return num / np.where(num == 0, 1, beta2 * precision + recall)
    if g == 0:
        return np.where(pp == 0, 1.0, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = tp / np.maximum(pp, 1)
        recall = tp / g
        f = (1 + beta2) * precision * recall / (beta2 * precision + recall)
    return np.clip(np.where(tp == 0, 0.0, f), 0.0, 1.0)


def _e_from_counts(tp: np.ndarray, pp: np.ndarray, g: int, n: int, mode: str) -> np.ndarray:
    """E_phi of binary maps from their counts (Fan et al. 2018), vectorised over thresholds."""
    tp = np.asarray(tp, dtype=np.float64)
    pp = np.asarray(pp, dtype=np.float64)
    if g == 0:
        total = n - pp  # enhanced matrix = 1 - FM
    elif g == n:
        total = pp  # enhanced matrix = FM
    else:
        mu_p, mu_g = pp / n, g / n
        fp, fn = pp - tp, g - tp
        tn = n - pp - fn
        total = np.zeros_like(tp)
        for count, a, b in ((tp, 1 - mu_p, 1 - mu_g), (fp, 1 - mu_p, -mu_g),
                            (fn, -mu_p, 1 - mu_g), (tn, -mu_p, -mu_g)):
            den = a * a + b * b
            if mode == "toolbox":
                xi = 2 * a * b / (den + _EPS)
            else:
                with np.errstate(divide="ignore", invalid="ignore"):
                    xi = np.where(den == 0, 0.0, 2 * a * b / np.where(den == 0, 1, den))
            total = total + count * (xi + 1) ** 2 / 4
    if mode == "toolbox":
        return total / (n - 1 + _EPS)
    return np.clip(total / n, 0.0, 1.0)


def _curves(frame: _Frame, beta2: float = BETA2_F) -> dict[str, np.ndarray]:
    tp, pp = _level_counts(frame)
    mtp, mpp = _medical_counts(frame)
    g, n, mode = frame.g, frame.n, frame.mode
    return {
        "E_phi": _e_from_counts(tp, pp, g, n, mode),
        "F_beta": _f_from_counts(tp, pp, g, beta2, mode),
        "Dice": _dice_from_counts(mtp, mpp, g, mode),
        "Sensitivity": _sensitivity_from_counts(mtp, mpp, g, mode),
    }


_CURVE_DOC = """
    Thresholds: curve index t = 0..255 is the binary prediction ``pred >= t`` on the 0..255 scale
    (t = 0: every pixel foreground). Toolbox mode thresholds the map after its per-frame min-max
    rescale (module docstring for the exact float conventions).

    Args:
        pred: prediction map, (H, W): uint8/integer 0..255, bool (= 0/255), or float in [0, 1].
        gt: ground truth, (H, W), bool or 0/1.
        mode: ``"safe"`` or ``"toolbox"``.
        rescale: min-max rescale the map first; default True in toolbox mode, False in safe mode.
        name: frame name used in warnings.

    Returns:
        float64 array of shape (256,), index t = threshold t.
"""


def _append_doc(func: Any, text: str) -> None:
    if func.__doc__:  # None under python -OO
        func.__doc__ += text


def e_phi(pred_mask: Any, gt: Any, mode: str = "safe", *, name: str | None = None) -> float:
    """Enhanced-alignment measure E_phi of one *binary* prediction (Fan et al., IJCAI 2018).

    ``E = 1/(W H) sum_xy phi(x, y)``, ``phi = (1 + xi)^2 / 4``,
    ``xi = 2 (P - mean P)(G - mean G) / ((P - mean P)^2 + (G - mean G)^2)`` (element-wise, P the
    binary map, G the ground truth). Special cases (paper): empty G -> phi = 1 - P; full G -> phi = P.

    Args:
        pred_mask: binary prediction, (H, W), bool or 0/1 (a 0/255 map: use :func:`e_phi_curve`).
        gt: ground truth, (H, W), bool or 0/1.
        mode: ``"safe"`` divides by W*H, value in [0, 1], perfect = 1. ``"toolbox"`` divides by
            ``W*H - 1 + eps`` as the official code (perfect = W*H / (W*H - 1)).
        name: frame name used in warnings.

    Returns:
        float; never NaN.

    Warns:
        DegenerateGroundTruthWarning: degenerate ground truth (see :func:`s_alpha`).
    """
    _check_mode(mode)
    g = _as_gt(gt)
    a = np.asarray(pred_mask)
    if a.shape != g.shape:
        raise ValueError(f"prediction shape {a.shape} and ground-truth shape {g.shape} differ")
    if a.dtype != np.bool_ and a.size and not bool(((a == 0) | (a == 1)).all()):
        raise ValueError(
            f"e_phi needs a binary prediction (bool or 0/1), got range [{a.min()}, {a.max()}]; "
            f"use e_phi_curve for 0-255 maps"
        )
    p = a != 0
    frame = _Frame(p=p.astype(np.float64), gt=g, mode=mode, levels=p.astype(np.uint8))
    _warn_degenerate(frame, name)
    tp = np.array([np.count_nonzero(p & g)], dtype=np.float64)
    pp = np.array([np.count_nonzero(p)], dtype=np.float64)
    return float(_e_from_counts(tp, pp, frame.g, frame.n, mode)[0])


def e_phi_curve(pred: Any, gt: Any, mode: str = "safe", *, rescale: bool | None = None,
                name: str | None = None) -> np.ndarray:
    """E_phi (Fan et al., IJCAI 2018; see :func:`e_phi`) of ``pred >= t`` for t = 0..255.

    "E_phi^mean" of SUN-SEG is the mean of this curve (averaged over frames, then clips). At t = 0
    the binary map is all foreground, its bias matrix is 0 and E = 1/4 (non-degenerate G).
    Safe mode: values in [0, 1]; toolbox mode divides by W*H - 1 + eps (can exceed 1 slightly).
    Empty/full ground truth: the paper's special cases, both modes.
    """
    frame = _prepare(pred, gt, mode, rescale)
    _warn_degenerate(frame, name)
    tp, pp = _level_counts(frame)
    return _e_from_counts(tp, pp, frame.g, frame.n, mode)


_append_doc(e_phi_curve, _CURVE_DOC)


def f_beta_curve(pred: Any, gt: Any, beta2: float = BETA2_F, mode: str = "safe", *,
                 rescale: bool | None = None, name: str | None = None) -> np.ndarray:
    """F-measure of ``pred >= t`` for t = 0..255 (Achanta et al., CVPR 2009), beta^2 = 0.3.

    ``F = (1 + b^2) P R / (b^2 P + R)``, ``P = |P_t & G| / |P_t|``, ``R = |P_t & G| / |G|``;
    F = 0 where ``|P_t & G| = 0``. "F_beta^mean" of SUN-SEG is the mean of this curve.
    Empty ground truth: safe mode 1 where P_t is empty, else 0; toolbox mode 0. Values in [0, 1].
    """
    frame = _prepare(pred, gt, mode, rescale)
    _warn_degenerate(frame, name)
    tp, pp = _level_counts(frame)
    return _f_from_counts(tp, pp, frame.g, beta2, mode)


_append_doc(f_beta_curve, _CURVE_DOC)


def dice_curve(pred: Any, gt: Any, mode: str = "safe", *, rescale: bool | None = None,
               name: str | None = None) -> np.ndarray:
    """Dice of ``pred >= t`` for t = 0..255: ``2 |P_t & G| / (|P_t| + |G|)`` (SUN-SEG "Dice").

    SUN-SEG's "Dice" is the mean of this curve (over frames, clips, then thresholds); "maxDice"
    the max of the averaged curve. Empty ground truth: safe mode 1 where P_t is empty, else 0
    (as :func:`autosam_core.metrics.dice_iou`); toolbox mode 0 (``intersection == 0 -> 0``).
    Values in [0, 1].
    """
    frame = _prepare(pred, gt, mode, rescale)
    _warn_degenerate(frame, name)
    tp, pp = _medical_counts(frame)
    return _dice_from_counts(tp, pp, frame.g, mode)


_append_doc(dice_curve, _CURVE_DOC)


def sensitivity_curve(pred: Any, gt: Any, mode: str = "safe", *, rescale: bool | None = None,
                      name: str | None = None) -> np.ndarray:
    """Sensitivity (recall) of ``pred >= t`` for t = 0..255: ``|P_t & G| / |G|`` (SUN-SEG "Sen").

    At t = 0 it is 1. Empty ground truth (undefined): safe mode 1 where P_t is empty, else 0;
    toolbox mode 0. Values in [0, 1].
    """
    frame = _prepare(pred, gt, mode, rescale)
    _warn_degenerate(frame, name)
    tp, pp = _medical_counts(frame)
    return _sensitivity_from_counts(tp, pp, frame.g, mode)


_append_doc(sensitivity_curve, _CURVE_DOC)


# ----- weighted F (Margolin et al., CVPR 2014) -----------------------------------------------------
def _gaussian_kernel(size: int = 7, sigma: float = 5.0) -> np.ndarray:
    """Normalised 2-D Gaussian (MATLAB ``fspecial('gaussian', 7, 5)`` of Margolin et al.)."""
    r = (size - 1) / 2
    y, x = np.mgrid[-r:r + 1, -r:r + 1]
    k = np.exp(-(x * x + y * y) / (2 * sigma * sigma))
    return k / k.sum()


def _weighted_f_value(frame: _Frame, beta2: float) -> float:
    p, gt, mode = frame.p, frame.gt, frame.mode
    if frame.g == 0:
        if mode == "toolbox":
            return 0.0
        return 1.0 if float(p.max()) == 0.0 else 0.0
    try:
        from scipy import ndimage
    except ImportError as exc:  # pragma: no cover - scipy is a dependency of this module
        raise ImportError("weighted F-beta needs scipy (pip install scipy)") from exc
    bg = ~gt
    dist, idx = ndimage.distance_transform_edt(bg, return_indices=True)
    err = np.abs(p - gt)
    err_t = err.copy()
    err_t[bg] = err[idx[0][bg], idx[1][bg]]  # background pixels take the error of the nearest GT pixel
    err_a = ndimage.convolve(err_t, _gaussian_kernel(), mode="constant", cval=0.0)
    min_e = np.where(gt & (err_a < err), err_a, err)
    importance = np.where(gt, 1.0, 2 - np.exp(np.log(0.5) / 5 * dist))
    err_w = min_e * importance
    tp_w = frame.g - err_w[gt].sum()
    fp_w = err_w[bg].sum()
    recall = 1 - err_w[gt].mean()
    if mode == "toolbox":
        precision = tp_w / (tp_w + fp_w + _EPS)
        return float((1 + beta2) * recall * precision / (recall + beta2 * precision + _EPS))
    precision = tp_w / (tp_w + fp_w) if tp_w + fp_w > 0 else 0.0
    den = recall + beta2 * precision
    q = (1 + beta2) * recall * precision / den if den > 0 else 0.0
    return float(min(max(q, 0.0), 1.0))


def weighted_f_beta(pred: Any, gt: Any, beta2: float = BETA2_FW, mode: str = "safe", *,
                    rescale: bool | None = None, name: str | None = None) -> float:
    """Weighted F-measure F^w_beta of one frame (Margolin, Zelnik-Manor, Tal, CVPR 2014), beta^2 = 1.

    With E = |pred - G| (pred the continuous map in [0, 1], not thresholded):
    pixel dependency: background pixels take the error of their nearest foreground pixel
    (Euclidean distance transform), the result is smoothed by a 7x7 Gaussian (sigma 5, zero
    padding), and on foreground pixels the smaller of E and the smoothed error is kept;
    pixel importance: background errors are weighted by ``2 - exp(ln(0.5) / 5 * d)``, d the distance
    to the foreground. Then ``TP^w = |G| - sum_G E^w``, ``FP^w = sum_~G E^w``,
    ``R^w = 1 - mean_G E^w``, ``P^w = TP^w / (TP^w + FP^w)``,
    ``F^w = (1 + b^2) P^w R^w / (b^2 P^w + R^w)``.

    Args:
        pred: prediction map, (H, W): uint8/integer 0..255, bool, or float in [0, 1].
        gt: ground truth, (H, W), bool or 0/1.
        beta2: beta^2 (1 in SUN-SEG / AutoSAM).
        mode: ``"safe"`` or ``"toolbox"`` (toolbox adds eps to the denominators, as the official
            code).
        rescale: min-max rescale the map first; default True in toolbox mode, False in safe mode.
        name: frame name used in warnings.

    Returns:
        float in [0, 1], never NaN (needs scipy). Empty ground truth: toolbox 0 whatever the
        prediction; safe mode 1 if the map is all 0, else 0.

    Warns:
        DegenerateGroundTruthWarning: degenerate ground truth (see :func:`s_alpha`).
    """
    frame = _prepare(pred, gt, mode, rescale)
    _warn_degenerate(frame, name)
    return _weighted_f_value(frame, beta2)


# ----- per-frame bundle and averaging ----------------------------------------------------------------
@dataclass
class FrameScores:
    """All SUN-SEG metrics of one frame.

    Attributes:
        name: frame name (``clip/stem`` in :func:`evaluate_clips`).
        s_alpha: S_alpha (float).
        f_w_beta: weighted F, beta^2 = 1 (float).
        curves: ``{"E_phi", "F_beta", "Dice", "Sensitivity"}`` -> float64 (256,), index t = threshold.
        degenerate: ``None`` or why the ground truth is degenerate ("empty", "1 foreground pixel",
            "all foreground", "1 background pixel").
        toolbox_nan: toolbox mode only: S_alpha was NaN and reported as 0.
    """

    name: str
    s_alpha: float
    f_w_beta: float
    curves: dict[str, np.ndarray]
    degenerate: str | None = None
    toolbox_nan: bool = False


def _scores(frame: _Frame, name: str) -> FrameScores:
    reason = _warn_degenerate(frame, name, stacklevel=4)
    s, nan_to_zero = _s_alpha_value(frame, ALPHA)
    if nan_to_zero:
        _warn_toolbox_nan(name)
    return FrameScores(name=name, s_alpha=s, f_w_beta=_weighted_f_value(frame, BETA2_FW),
                       curves=_curves(frame), degenerate=reason, toolbox_nan=nan_to_zero)


def frame_scores(pred: Any, gt: Any, mode: str = "safe", *, rescale: bool | None = None,
                 name: str = "frame") -> FrameScores:
    """S_alpha, F^w_beta and the E_phi / F_beta / Dice / Sensitivity curves of one frame.

    Args:
        pred: prediction map, (H, W): uint8/integer 0..255, bool, or float in [0, 1].
        gt: ground truth, (H, W), bool or 0/1.
        mode: ``"safe"`` or ``"toolbox"``.
        rescale: min-max rescale the map first; default True in toolbox mode, False in safe mode.
        name: frame name for warnings and the result.

    Returns:
        :class:`FrameScores`; alpha = 0.5, beta^2 = 0.3 (F_beta) and 1 (F^w_beta). Safe mode:
        every value in [0, 1], never NaN.

    Warns:
        DegenerateGroundTruthWarning: once per degenerate frame, naming it.
    """
    return _scores(_prepare(pred, gt, mode, rescale), name)


class _Accumulator:
    """Running sums of frame scores (memory independent of the number of frames)."""

    def __init__(self) -> None:
        self.n = 0
        self.s_alpha = 0.0
        self.f_w_beta = 0.0
        self.curves = {k: np.zeros(NUM_THRESHOLDS) for k in _CURVES}

    def add(self, s: float, fw: float, curves: dict[str, np.ndarray], weight: int = 1) -> None:
        self.n += weight
        self.s_alpha += s
        self.f_w_beta += fw
        for k in _CURVES:
            self.curves[k] += curves[k]

    def mean(self) -> tuple[float, float, dict[str, np.ndarray]]:
        """Means; NaN when empty (the toolbox's mean over nothing)."""
        if self.n == 0:
            nan = float("nan")
            return nan, nan, {k: np.full(NUM_THRESHOLDS, nan) for k in _CURVES}
        return (self.s_alpha / self.n, self.f_w_beta / self.n,
                {k: v / self.n for k, v in self.curves.items()})


def _report(s: float, fw: float, curves: dict[str, np.ndarray]) -> dict[str, float]:
    return {
        "S_alpha": float(s),
        "E_phi_mean": float(curves["E_phi"].mean()),
        "E_phi_max": float(curves["E_phi"].max()),
        "F_w_beta": float(fw),
        "F_beta_mean": float(curves["F_beta"].mean()),
        "F_beta_max": float(curves["F_beta"].max()),
        "Dice": float(curves["Dice"].mean()),
        "Dice_max": float(curves["Dice"].max()),
        "Sensitivity": float(curves["Sensitivity"].mean()),
        "Sensitivity_max": float(curves["Sensitivity"].max()),
    }


def _conventions(mode: str, rescale: bool, drop_ends: bool) -> dict[str, Any]:
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


def _pairs_iter(pairs: Iterable[Sequence[Any]]):
    for i, item in enumerate(pairs):
        if len(item) == 3:
            yield str(item[0]), item[1], item[2]
        elif len(item) == 2:
            yield f"frame{i}", item[0], item[1]
        else:
            raise ValueError(f"pair {i}: expected (name, pred, gt) or (pred, gt), got {len(item)} items")


def evaluate_frames(pairs: Iterable[Sequence[Any]], mode: str = "safe", *,
                    rescale: bool | None = None) -> dict[str, Any]:
    """SUN-SEG metrics of in-memory frames, frame-pooled (mean over all frames).

    Args:
        pairs: iterable of ``(name, pred, gt)`` (or ``(pred, gt)``), pred a (H, W) map (uint8 0..255,
            bool, or float in [0, 1]), gt a (H, W) bool / 0-1 mask of the same shape.
        mode: ``"safe"`` or ``"toolbox"`` (no end-frame exclusion here: frames are not clips).
        rescale: min-max rescale each map; default True in toolbox mode, False in safe mode.

    Returns:
        dict: ``mode``, ``averaging`` ("frame-pooled mean over frames"), ``num_frames``, ``metrics``
        (S_alpha, E_phi_mean, E_phi_max, F_w_beta, F_beta_mean, F_beta_max, Dice, Dice_max,
        Sensitivity, Sensitivity_max), ``degenerate_frames``, ``conventions``. Safe mode: every
        metric in [0, 1].

    Raises:
        ValueError: no frames, bad shapes or values, unknown mode.

    Warns:
        DegenerateGroundTruthWarning: once per degenerate frame, naming it.
    """
    _check_mode(mode)
    scale = (mode == "toolbox") if rescale is None else bool(rescale)
    acc = _Accumulator()
    degenerate: list[dict[str, str]] = []
    for name, pred, gt in _pairs_iter(pairs):
        fs = _scores(_prepare(pred, gt, mode, scale), name)
        acc.add(fs.s_alpha, fs.f_w_beta, fs.curves)
        if fs.degenerate:
            degenerate.append({"frame": name, "ground_truth": fs.degenerate})
    if acc.n == 0:
        raise ValueError("evaluate_frames: no frames given")
    return {
        "mode": mode,
        "averaging": "frame-pooled mean over frames",
        "num_frames": acc.n,
        "metrics": _report(*acc.mean()),
        "degenerate_frames": degenerate,
        "conventions": _conventions(mode, scale, False),
    }


# ----- files ---------------------------------------------------------------------------------------
def _natural_key(stem: str) -> list[tuple[int, Any]]:
    return [(0, int(t)) if t.isdigit() else (1, t) for t in re.split(r"(\d+)", stem)]


def _list_frames(folder: Path) -> dict[str, Path]:
    """{stem: path} of the frame files in ``folder`` (hidden files and other suffixes ignored)."""
    frames: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        if path.suffix.lower() not in _FRAME_SUFFIXES:
            continue
        if path.stem in frames:
            raise ValueError(
                f"{folder}: two frame files with stem {path.stem!r}: {frames[path.stem].name} and "
                f"{path.name}; keep one"
            )
        frames[path.stem] = path
    return frames


def _subdirs(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")}


def _load_prediction(path: Path) -> np.ndarray:
    """Prediction file as uint8 (H, W) 0..255 (colour maps: ITU-R 601 luma, as cv2 grayscale)."""
    from .data.io import load_image

    rgb = load_image(path)
    if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all():
        return np.ascontiguousarray(rgb[..., 0])
    luma = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    return np.clip(np.rint(luma), 0, 255).astype(np.uint8)


def _resize(pred: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a uint8 map to (H, W) (cv2.resize as the toolbox; Pillow if cv2 absent)."""
    try:
        import cv2

        return cv2.resize(pred, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
    except ImportError:  # pragma: no cover
        from PIL import Image

        return np.asarray(Image.fromarray(pred).resize((shape[1], shape[0]), Image.BILINEAR))


def _warn_list(what: str, names: list[str], consequence: str) -> None:
    if names:
        shown = ", ".join(names[:_SHOW]) + (", ..." if len(names) > _SHOW else "")
        warnings.warn(f"{len(names)} {what} ({shown}); {consequence}", FramePairingWarning,
                      stacklevel=3)


def evaluate_clips(pred_dir: str | Path, gt_dir: str | Path, video: bool = True, mode: str = "safe",
                   *, averaging: str | None = None, drop_ends: bool | None = None,
                   on_missing: str = "skip", rescale: bool | None = None) -> dict[str, Any]:
    """SUN-SEG metrics of prediction files against ground-truth files.

    Layout: with ``video=True`` predictions ``pred_dir/<clip>/<frame>.png`` and ground truth
    ``gt_dir/<clip>/<frame>.png`` (the clips are the sub-folders of ``gt_dir``), paired by clip and
    frame stem; with ``video=False`` both are flat folders of frames. Frame files: .png, .jpg,
    .jpeg, .bmp, .tif, .tiff. Predictions are 0-255 grayscale maps (a colour map is converted to
    luma); ground truth is read with :func:`autosam_core.data.io.load_mask`. A prediction of another
    size is resized to its ground truth (bilinear) and listed.

    Args:
        pred_dir, gt_dir: folders.
        video: clip layout (True) or flat folders (False).
        mode: ``"safe"`` (default) or ``"toolbox"`` (module docstring).
        averaging: ``"clip"`` (per-clip mean, then mean over clips; default for video) or
            ``"frame"`` (frame-pooled; the only choice for flat folders).
        drop_ends: exclude the first and last frame (natural stem order) of every clip, as the
            toolbox; default True in toolbox mode, False in safe mode; video only.
        on_missing: ground-truth frame without a prediction: ``"skip"`` (excluded, listed, warned),
            ``"empty"`` (scored as an all-zero map, listed, warned) or ``"error"``.
        rescale: per-frame min-max rescale of the maps; default True in toolbox mode, else False.

    Returns:
        JSON-ready dict: ``mode``, ``averaging`` (text), ``video``, ``num_clips`` (clips averaged),
        ``num_frames`` (frames scored), ``metrics`` (S_alpha, E_phi_mean, E_phi_max, F_w_beta,
        F_beta_mean, F_beta_max, Dice, Dice_max, Sensitivity, Sensitivity_max), ``per_clip``
        (video: ``{clip: {"num_frames", "metrics"}}``), the lists ``missing_predictions``,
        ``orphan_predictions``, ``orphan_prediction_clips``, ``excluded_end_frames``,
        ``empty_clips``, ``resized_predictions``, ``degenerate_frames``, and ``conventions``.
        Safe mode: metrics in [0, 1], clips without a scored frame are left out of the mean (listed
        in ``empty_clips``). Toolbox mode: such a clip is NaN and so is the dataset mean.

    Raises:
        FileNotFoundError: a folder is missing; ``on_missing="error"`` and a prediction is missing.
        ValueError: bad arguments, no clip sub-folders with ``video=True``, duplicate stems,
            unreadable files, or no frame at all to score.

    Warns:
        FramePairingWarning: missing / orphan / excluded / resized frames (counts and first names).
        DegenerateGroundTruthWarning: once per degenerate frame, naming it.
    """
    from .data.io import load_mask

    _check_mode(mode)
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    for label, d in (("prediction", pred_dir), ("ground-truth", gt_dir)):
        if not d.is_dir():
            raise FileNotFoundError(f"{label} folder not found: {d}")
    if averaging is None:
        averaging = "clip" if video else "frame"
    if averaging not in ("clip", "frame"):
        raise ValueError(f"averaging must be 'clip' or 'frame', got {averaging!r}")
    if averaging == "clip" and not video:
        raise ValueError("averaging='clip' needs video=True (clip sub-folders)")
    if drop_ends is None:
        drop_ends = mode == "toolbox" and video
    if drop_ends and not video:
        raise ValueError("drop_ends needs video=True (clip sub-folders)")
    if on_missing not in ("skip", "empty", "error"):
        raise ValueError(f"on_missing must be 'skip', 'empty' or 'error', got {on_missing!r}")
    scale = (mode == "toolbox") if rescale is None else bool(rescale)

    # ---- pairing (all problems collected before any scoring)
    if video:
        gt_clips = _subdirs(gt_dir)
        if not gt_clips:
            raise ValueError(
                f"{gt_dir}: no clip sub-folders; expected GT/<clip>/<frame>.png "
                f"(use video=False / no --video for flat folders)"
            )
        pred_clips = _subdirs(pred_dir)
        clips = [(c, gt_clips[c], pred_clips.get(c)) for c in sorted(gt_clips, key=_natural_key)]
        orphan_clips = sorted(set(pred_clips) - set(gt_clips), key=_natural_key)
    else:
        clips = [("", gt_dir, pred_dir)]
        orphan_clips = []
    plan: list[tuple[str, list[tuple[str, Path, Path | None]]]] = []
    missing, orphans, excluded = [], [], []
    for clip, gdir, pdir in clips:
        gt_frames = _list_frames(gdir)
        pred_frames = _list_frames(pdir) if pdir is not None else {}
        stems = sorted(gt_frames, key=_natural_key)
        prefix = f"{clip}/" if video else ""
        kept = stems[1:-1] if drop_ends else stems
        kept_set = set(kept)
        excluded += [prefix + s for s in stems if s not in kept_set]
        items = []
        for stem in kept:
            pred_path = pred_frames.get(stem)
            if pred_path is None:
                missing.append(prefix + stem)
                if on_missing == "skip":
                    continue
            items.append((prefix + stem, gt_frames[stem], pred_path))
        orphans += [prefix + s for s in sorted(set(pred_frames) - set(gt_frames), key=_natural_key)]
        plan.append((clip, items))
    if missing and on_missing == "error":
        shown = ", ".join(missing[:_SHOW]) + (", ..." if len(missing) > _SHOW else "")
        raise FileNotFoundError(f"{len(missing)} ground-truth frames have no prediction in "
                                f"{pred_dir}: {shown}")
    _warn_list("ground-truth frames have no prediction", missing,
               "excluded from the averages" if on_missing == "skip"
               else "scored as empty (all-zero) predictions")
    _warn_list("predictions have no ground truth", orphans, "not scored")
    _warn_list("prediction clips have no ground-truth clip", orphan_clips, "not scored")
    if excluded:
        warnings.warn(
            f"{len(excluded)} end frames (first and last of each clip) excluded, as the SUN-SEG "
            f"toolbox does; listed in 'excluded_end_frames'", FramePairingWarning, stacklevel=2)

    # ---- scoring
    pooled = _Accumulator()
    clip_means: list[tuple[float, float, dict[str, np.ndarray]]] = []
    per_clip: dict[str, Any] = {}
    empty_clips: list[str] = []
    resized: list[str] = []
    degenerate: list[dict[str, str]] = []
    for clip, items in plan:
        acc = _Accumulator()
        for name, gt_path, pred_path in items:
            gt = load_mask(gt_path)
            if pred_path is None:
                pred = np.zeros(gt.shape, dtype=np.uint8)
            else:
                pred = _load_prediction(pred_path)
                if pred.shape != gt.shape:
                    resized.append(name)
                    pred = _resize(pred, gt.shape)
                if mode == "safe" and not scale and 0 < int(pred.max()) <= 1:
                    warnings.warn(
                        f"frame {name}: prediction {pred_path} holds only 0/1; expected a 0-255 "
                        f"map (thresholds t >= 2 see it as empty); save predictions x255",
                        FramePairingWarning, stacklevel=2)
            fs = _scores(_prepare(pred, gt, mode, scale), name)
            acc.add(fs.s_alpha, fs.f_w_beta, fs.curves)
            pooled.add(fs.s_alpha, fs.f_w_beta, fs.curves)
            if fs.degenerate:
                degenerate.append({"frame": name, "ground_truth": fs.degenerate})
        if video:
            per_clip[clip] = {"num_frames": acc.n, "metrics": _report(*acc.mean())}
            if acc.n == 0:
                empty_clips.append(clip)
                if mode == "safe":
                    continue
            clip_means.append(acc.mean())
    _warn_list("clips have no scored frame", empty_clips,
               "NaN, as the toolbox's mean over nothing" if mode == "toolbox"
               else "left out of the clip average")
    _warn_list("predictions were resized to their ground truth (bilinear)", resized, "listed")
    if pooled.n == 0:
        raise ValueError(
            f"no frame to score: {len(missing)} ground-truth frames without prediction, "
            f"{len(excluded)} end frames excluded (pred {pred_dir}, gt {gt_dir})"
        )
    if averaging == "clip":
        n = len(clip_means)
        s = sum(m[0] for m in clip_means) / n
        fw = sum(m[1] for m in clip_means) / n
        curves = {k: sum(m[2][k] for m in clip_means) / n for k in _CURVES}
        metrics = _report(s, fw, curves)
        label = "per-clip mean, then mean over clips"
    else:
        metrics = _report(*pooled.mean())
        label = "frame-pooled mean over frames"
    return {
        "mode": mode,
        "averaging": label,
        "video": video,
        "num_clips": len(clip_means) if video else 0,
        "num_frames": pooled.n,
        "metrics": metrics,
        "per_clip": per_clip,
        "pred_dir": str(pred_dir),
        "gt_dir": str(gt_dir),
        "on_missing": on_missing,
        "missing_predictions": missing,
        "orphan_predictions": orphans,
        "orphan_prediction_clips": orphan_clips,
        "excluded_end_frames": excluded,
        "empty_clips": empty_clips,
        "resized_predictions": resized,
        "degenerate_frames": degenerate,
        "conventions": _conventions(mode, scale, drop_ends),
    }


# ----- CLI -------------------------------------------------------------------------------------------
def add_metrics_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``autosam metrics`` options to ``p`` (for wiring into autosam_core.cli)."""
    p.add_argument("--pred", required=True, help="prediction folder (0-255 grayscale maps)")
    p.add_argument("--gt", required=True, help="ground-truth folder (binary masks)")
    p.add_argument("--video", action="store_true",
                   help="clip layout DIR/<clip>/<frame>.png (default: flat folders)")
    p.add_argument("--mode", choices=MODES, default="safe",
                   help="safe (never NaN, values in [0, 1]) or toolbox (SUN-SEG toolbox conventions)")
    p.add_argument("--averaging", choices=("clip", "frame"),
                   help="per-clip then over clips (default with --video) or frame-pooled")
    ends = p.add_mutually_exclusive_group()
    ends.add_argument("--drop-ends", dest="drop_ends", action="store_true", default=None,
                      help="exclude first and last frame of each clip (default in toolbox mode)")
    ends.add_argument("--keep-ends", dest="drop_ends", action="store_false",
                      help="keep all frames (default in safe mode)")
    p.add_argument("--on-missing", choices=("skip", "empty", "error"), default="skip",
                   help="ground-truth frame without prediction (always listed)")
    p.add_argument("--json", metavar="OUT", help="also write the JSON result here")
    return p


def _json_safe(obj: Any) -> Any:
    """NaN/inf -> None (JSON null), recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def cmd_metrics(args: argparse.Namespace) -> int:
    """Run ``autosam metrics`` from parsed arguments; prints JSON to stdout. Returns 0, or 2 on errors."""
    try:
        result = evaluate_clips(args.pred, args.gt, video=args.video, mode=args.mode,
                                averaging=args.averaging, drop_ends=args.drop_ends,
                                on_missing=args.on_missing)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    text = json.dumps(_json_safe(result), indent=2, allow_nan=False)
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(out)
    print(text)
    return 0


def metrics_main(argv: list[str] | None = None) -> int:
    """CLI ``autosam metrics --pred DIR --gt DIR [--video] [--mode safe|toolbox] [--json OUT]``.

    Prints the :func:`evaluate_clips` result as JSON (NaN written as null) to stdout; warnings go to
    stderr. Returns 0, or 2 with one ``error:`` line on stderr for bad folders or files (argparse
    exits with 2 on bad options).
    """
    parser = add_metrics_arguments(argparse.ArgumentParser(
        prog="autosam metrics", description="SUN-SEG video polyp segmentation metrics"))
    return cmd_metrics(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(metrics_main())
