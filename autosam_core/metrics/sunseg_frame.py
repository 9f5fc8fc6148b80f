"""Per-frame SUN-SEG metrics, computed by ``pysodmetrics`` (PyPI ``pysodmetrics``, module ``py_sod_metrics``).

The AutoSAM paper (section 4, Table 3) reports on SUN-SEG (Ji et al., Machine Intelligence Research
2022) six metrics: S_alpha, E_phi^mean, F^w_beta, F_beta^mean, Dice and Sen. Their definitions:

* S_alpha, structure measure: Fan, Cheng, Liu, Li, Borji, ICCV 2017; alpha = 0.5.
  ``pysodmetrics.Smeasure``.
* E_phi, enhanced-alignment measure: Fan, Gong, Cao, Ren, Cheng, Borji, IJCAI 2018; a curve over 256
  thresholds. ``pysodmetrics.Emeasure``.
* F^w_beta, weighted F-measure: Margolin, Zelnik-Manor, Tal, CVPR 2014; beta^2 = 1.
  ``pysodmetrics.WeightedFmeasure``.
* F_beta (Achanta et al., CVPR 2009, beta^2 = 0.3), Dice ``2|P&G| / (|P|+|G|)`` and sensitivity
  ``|P&G| / |G|``: curves over 256 thresholds. ``pysodmetrics.FmeasureV2`` with ``FmeasureHandler``,
  ``DICEHandler``, ``SensitivityHandler``. (The AutoSAM paper's text prints Dice = 2|P&G| / |P|G| and
  F_beta = (1+b^2)PR / (b^2 (P+R)); both are typos: the standard forms are used.)

Curve index t = 0..255 is the binary prediction ``level >= t`` (t = 0: every pixel foreground;
pysodmetrics returns its curves from t = 255 down to 0: they are reversed here). The threshold levels
come from :func:`autosam_core.metrics.sunseg_conventions.prepare_frame`; they are handed to
pysodmetrics as the map ``min((level + 0.5) / 255, 1)``, whose ``uint8(255 x)`` is the level exactly,
so pysodmetrics' histograms count the mode's levels (its curves depend on the map only through them).

pysodmetrics follows the toolbox's formulas (eps in the denominators; E_phi normalised by
``H*W - 1 + eps``). On top of it this module applies the modes' rules (docs/METRICS.md):

* safe mode: E_phi normalised by ``H*W``; an empty ground truth scores Dice, sensitivity, F_beta
  (per threshold) and F^w_beta 1 only for an empty prediction, else 0; a zero-area part of the
  S_alpha centroid split is skipped (pysodmetrics gives NaN); values clipped to [0, 1];
* toolbox mode: S_alpha = 0 where the SUN-SEG toolbox's std(ddof=1) / (N - 1) of a 1-pixel region
  or part (or a mean over an empty part) is NaN and its ``max(0, NaN)`` gives 0 (pysodmetrics takes
  the std of one pixel as 0 instead); empty ground truth: overlap metrics 0 (as pysodmetrics).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from .sunseg_conventions import (ALPHA, BETA2_F, BETA2_FW, EPS, NUM_THRESHOLDS, Frame, binary_frame,
                                 prepare_frame, warn_degenerate, warn_toolbox_nan)

__all__ = [
    "CURVES", "FrameScores", "s_alpha", "e_phi", "e_phi_curve", "f_beta_curve", "dice_curve",
    "sensitivity_curve", "weighted_f_beta", "frame_scores", "score_frame",
]

CURVES = ("E_phi", "F_beta", "Dice", "Sensitivity")


def _pysod():
    """The pysodmetrics module, imported on first use (it takes about 2 s to import)."""
    import py_sod_metrics

    return py_sod_metrics


def _level_map(levels: np.ndarray) -> np.ndarray:
    """float64 map whose ``uint8(255 x)`` equals ``levels`` (uint8) exactly, within [0, 1]."""
    return np.minimum((levels.astype(np.float64) + 0.5) / 255, 1.0)


def _predicted_positive(levels: np.ndarray) -> np.ndarray:
    """|P_t| = number of pixels with ``level >= t``, t = 0..255, float64 (256,)."""
    hist = np.bincount(levels.ravel(), minlength=NUM_THRESHOLDS)
    return np.cumsum(hist[::-1])[::-1].astype(np.float64)


def _empty_gt_overlap(levels: np.ndarray) -> np.ndarray:
    """Safe mode, empty ground truth: 1 at the thresholds where the prediction is empty, else 0."""
    return np.where(_predicted_positive(levels) == 0, 1.0, 0.0)


# ----- S_alpha ----------------------------------------------------------------------------------
def _split(gt: np.ndarray) -> tuple[int, int]:
    """(x, y): the 1-based centroid split of Fan et al. 2017 (``round(centroid) + 1``)."""
    cy, cx = np.argwhere(gt).mean(axis=0).round()
    return int(cx) + 1, int(cy) + 1


def _part_sizes(gt: np.ndarray) -> list[int]:
    h, w = gt.shape
    x, y = _split(gt)
    return [y * x, y * (w - x), (h - y) * x, (h - y) * (w - x)]


def _toolbox_s_alpha_is_nan(frame: Frame) -> bool:
    """Whether the SUN-SEG toolbox's S_alpha is NaN: a 1-pixel region or a part with <= 1 pixel."""
    if frame.g == 1 or frame.n - frame.g == 1:
        return True
    return min(_part_sizes(frame.gt)) <= 1


def _region_without_empty_parts(sm: Any, p: np.ndarray, gt: np.ndarray) -> float:
    """S_r with zero-area parts (weight 0) left out; each part's SSIM by pysodmetrics."""
    h, w = gt.shape
    x, y = _split(gt)
    parts = ((slice(0, y), slice(0, x)), (slice(0, y), slice(x, w)),
             (slice(y, h), slice(0, x)), (slice(y, h), slice(x, w)))
    score = 0.0
    for (rows, cols), size in zip(parts, _part_sizes(gt)):
        if size:
            score += size / (h * w) * float(sm.ssim(p[rows, cols], gt[rows, cols]))
    return score


def _s_alpha_value(frame: Frame, alpha: float) -> tuple[float, bool]:
    """(S_alpha, whether a toolbox NaN was reported as 0)."""
    sm = _pysod().Smeasure(alpha=alpha)
    degenerate = frame.g in (0, frame.n)
    if frame.mode == "toolbox" and not degenerate and _toolbox_s_alpha_is_nan(frame):
        return 0.0, True
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        s = float(sm.cal_sm(frame.p, frame.gt))
        if frame.mode == "safe" and not math.isfinite(s):  # a zero-area part: pysodmetrics NaN
            s = alpha * float(sm.object(frame.p, frame.gt)) + (1 - alpha) * _region_without_empty_parts(
                sm, frame.p, frame.gt)
    if frame.mode == "safe":
        return min(max(s, 0.0), 1.0), False
    return s, False


def s_alpha(pred: Any, gt: Any, alpha: float = ALPHA, mode: str = "safe", *,
            rescale: bool | None = None, name: str | None = None) -> float:
    """Structure measure S_alpha of one frame (Fan et al., "Structure-measure", ICCV 2017).

    ``S = alpha * S_o + (1 - alpha) * S_r`` with alpha = 0.5 (AutoSAM paper). Object-aware
    ``S_o = mu * O_FG + (1 - mu) * O_BG``, mu = foreground share of the ground truth,
    ``O = 2 x / (x^2 + 1 + sigma_x)`` with x, sigma_x the mean and sample std of the map over the
    foreground (O_FG) or of 1 - map over the background (O_BG). Region-aware ``S_r``: split the frame
    at the ground-truth centroid (``round(c) + 1``, 1-based as the official code) into four parts,
    ``S_r = sum_k w_k ssim_k``, w_k the part's share of the frame area,
    ``ssim = 4 x y s_xy / ((x^2 + y^2)(s_x^2 + s_y^2))`` (1 where numerator and denominator are 0).
    Computed by ``pysodmetrics.Smeasure``.

    Args:
        pred: prediction map, (H, W): uint8/integer 0..255, bool, or float in [0, 1].
        gt: ground truth, (H, W), bool or 0/1.
        alpha: weight of S_o.
        mode: ``"safe"`` or ``"toolbox"`` (:mod:`.sunseg_conventions`).
        rescale: min-max rescale the map first; default True in toolbox mode, False in safe mode.
        name: frame name used in warnings.

    Returns:
        float. Empty ground truth: ``1 - mean(pred)``; full: ``mean(pred)`` (both modes). Safe mode:
        in [0, 1], never NaN. Toolbox mode: ``max(0, S)`` with NaN -> 0 as the SUN-SEG toolbox (a
        1-pixel foreground/background, or a split leaving a part of at most 1 pixel, gives 0).

    Raises:
        ValueError: bad shapes, values or mode.

    Warns:
        DegenerateGroundTruthWarning: degenerate ground truth; in toolbox mode also when a NaN was
        reported as 0.
    """
    frame = prepare_frame(pred, gt, mode, rescale)
    warn_degenerate(frame, name)
    value, nan_to_zero = _s_alpha_value(frame, alpha)
    if nan_to_zero:
        warn_toolbox_nan(name)
    return value


# ----- curves ------------------------------------------------------------------------------------
def _e_curve(frame: Frame) -> np.ndarray:
    em = _pysod().Emeasure()
    em.step(_level_map(frame.levels), frame.gt, normalize=False)
    curve = np.asarray(em.get_results()["em"]["curve"], dtype=np.float64)[::-1]
    if frame.mode == "toolbox":
        return curve.copy()
    return np.clip(curve * ((frame.n - 1 + EPS) / frame.n), 0.0, 1.0)  # normalised by H*W


def _overlap_curves(levels: np.ndarray, gt: np.ndarray, beta2: float,
                    names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """pysodmetrics F_beta / Dice / sensitivity curves (t = 0..255) of ``levels >= t``."""
    pysod = _pysod()
    make = {
        "F_beta": lambda: pysod.FmeasureHandler(with_dynamic=True, with_adaptive=False, beta=beta2),
        "Dice": lambda: pysod.DICEHandler(with_dynamic=True, with_adaptive=False),
        "Sensitivity": lambda: pysod.SensitivityHandler(with_dynamic=True, with_adaptive=False),
    }
    fm = pysod.FmeasureV2(metric_handlers={k: make[k]() for k in names})
    fm.step(_level_map(levels), gt, normalize=False)
    res = fm.get_results()
    return {k: np.asarray(res[k]["dynamic"], dtype=np.float64)[::-1].copy() for k in names}


def _apply_overlap_rules(frame: Frame, curves: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if frame.mode != "safe":
        return curves
    out = {}
    for k, v in curves.items():
        if frame.g == 0:
            out[k] = _empty_gt_overlap(frame.dice_levels if k in ("Dice", "Sensitivity") else frame.levels)
        else:
            out[k] = np.clip(v, 0.0, 1.0)
    return out


def _curves(frame: Frame, beta2: float = BETA2_F) -> dict[str, np.ndarray]:
    if frame.dice_levels is frame.levels:
        curves = _overlap_curves(frame.levels, frame.gt, beta2, ("F_beta", "Dice", "Sensitivity"))
    else:
        curves = _overlap_curves(frame.levels, frame.gt, beta2, ("F_beta",))
        curves.update(_overlap_curves(frame.dice_levels, frame.gt, beta2, ("Dice", "Sensitivity")))
    curves = _apply_overlap_rules(frame, curves)
    return {"E_phi": _e_curve(frame), **{k: curves[k] for k in ("F_beta", "Dice", "Sensitivity")}}


_CURVE_DOC = """
    Thresholds: curve index t = 0..255 is the binary prediction ``pred >= t`` on the 0..255 scale
    (t = 0: every pixel foreground). Toolbox mode thresholds the map after its per-frame min-max
    rescale (:mod:`autosam_core.metrics.sunseg_conventions` for the exact float conventions).

    Args:
        pred: prediction map, (H, W): uint8/integer 0..255, bool (= 0/255), or float in [0, 1].
        gt: ground truth, (H, W), bool or 0/1.
        mode: ``"safe"`` or ``"toolbox"``.
        rescale: min-max rescale the map first; default True in toolbox mode, False in safe mode.
        name: frame name used in warnings.

    Returns:
        float64 array of shape (256,), index t = threshold t.

    Raises:
        ValueError: bad shapes, values or mode.

    Warns:
        DegenerateGroundTruthWarning: degenerate ground truth (see :func:`s_alpha`).
"""


def _append_doc(func: Any, text: str) -> None:
    if func.__doc__:  # None under python -OO
        func.__doc__ += text


def e_phi(pred_mask: Any, gt: Any, mode: str = "safe", *, name: str | None = None) -> float:
    """Enhanced-alignment measure E_phi of one *binary* prediction (Fan et al., IJCAI 2018).

    ``E = 1/(W H) sum_xy phi(x, y)``, ``phi = (1 + xi)^2 / 4``,
    ``xi = 2 (P - mean P)(G - mean G) / ((P - mean P)^2 + (G - mean G)^2)`` (element-wise, P the
    binary map, G the ground truth). Special cases (paper): empty G -> phi = 1 - P; full G -> phi = P.
    Computed by ``pysodmetrics.Emeasure``.

    Args:
        pred_mask: binary prediction, (H, W), bool or 0/1 (a 0/255 map: use :func:`e_phi_curve`).
        gt: ground truth, (H, W), bool or 0/1.
        mode: ``"safe"`` divides by W*H, value in [0, 1], perfect = 1. ``"toolbox"`` divides by
            ``W*H - 1 + eps`` as the official code (perfect = W*H / (W*H - 1)).
        name: frame name used in warnings.

    Returns:
        float; never NaN.

    Raises:
        ValueError: shapes differ, ``pred_mask`` not binary, or an unknown mode.

    Warns:
        DegenerateGroundTruthWarning: degenerate ground truth (see :func:`s_alpha`).
    """
    frame = binary_frame(pred_mask, gt, mode)
    warn_degenerate(frame, name)
    return float(_e_curve(frame)[1])  # t >= 1 selects exactly the binary prediction


def e_phi_curve(pred: Any, gt: Any, mode: str = "safe", *, rescale: bool | None = None,
                name: str | None = None) -> np.ndarray:
    """E_phi (Fan et al., IJCAI 2018; see :func:`e_phi`) of ``pred >= t`` for t = 0..255.

    "E_phi^mean" of SUN-SEG is the mean of this curve (averaged over frames, then clips). At t = 0
    the binary map is all foreground, its bias matrix is 0 and E = 1/4 (non-degenerate G).
    Safe mode: values in [0, 1]; toolbox mode divides by W*H - 1 + eps (can exceed 1 slightly).
    Empty/full ground truth: the paper's special cases, both modes.
    """
    frame = prepare_frame(pred, gt, mode, rescale)
    warn_degenerate(frame, name)
    return _e_curve(frame)


_append_doc(e_phi_curve, _CURVE_DOC)


def f_beta_curve(pred: Any, gt: Any, beta2: float = BETA2_F, mode: str = "safe", *,
                 rescale: bool | None = None, name: str | None = None) -> np.ndarray:
    """F-measure of ``pred >= t`` for t = 0..255 (Achanta et al., CVPR 2009), beta^2 = 0.3.

    ``F = (1 + b^2) P R / (b^2 P + R)``, ``P = |P_t & G| / |P_t|``, ``R = |P_t & G| / |G|``;
    F = 0 where ``|P_t & G| = 0``. "F_beta^mean" of SUN-SEG is the mean of this curve.
    Empty ground truth: safe mode 1 where P_t is empty, else 0; toolbox mode 0. Values in [0, 1].
    """
    frame = prepare_frame(pred, gt, mode, rescale)
    warn_degenerate(frame, name)
    curves = _overlap_curves(frame.levels, frame.gt, beta2, ("F_beta",))
    return _apply_overlap_rules(frame, curves)["F_beta"]


_append_doc(f_beta_curve, _CURVE_DOC)


def dice_curve(pred: Any, gt: Any, mode: str = "safe", *, rescale: bool | None = None,
               name: str | None = None) -> np.ndarray:
    """Dice of ``pred >= t`` for t = 0..255: ``2 |P_t & G| / (|P_t| + |G|)`` (SUN-SEG "Dice").

    SUN-SEG's "Dice" is the mean of this curve (over frames, clips, then thresholds); "maxDice"
    the max of the averaged curve. Empty ground truth: safe mode 1 where P_t is empty, else 0
    (as :func:`autosam_core.metrics.dice_iou`); toolbox mode 0. Values in [0, 1].
    """
    frame = prepare_frame(pred, gt, mode, rescale)
    warn_degenerate(frame, name)
    curves = _overlap_curves(frame.dice_levels, frame.gt, BETA2_F, ("Dice",))
    return _apply_overlap_rules(frame, curves)["Dice"]


_append_doc(dice_curve, _CURVE_DOC)


def sensitivity_curve(pred: Any, gt: Any, mode: str = "safe", *, rescale: bool | None = None,
                      name: str | None = None) -> np.ndarray:
    """Sensitivity (recall) of ``pred >= t`` for t = 0..255: ``|P_t & G| / |G|`` (SUN-SEG "Sen").

    At t = 0 it is 1. Empty ground truth (undefined): safe mode 1 where P_t is empty, else 0;
    toolbox mode 0. Values in [0, 1].
    """
    frame = prepare_frame(pred, gt, mode, rescale)
    warn_degenerate(frame, name)
    curves = _overlap_curves(frame.dice_levels, frame.gt, BETA2_F, ("Sensitivity",))
    return _apply_overlap_rules(frame, curves)["Sensitivity"]


_append_doc(sensitivity_curve, _CURVE_DOC)


# ----- weighted F ------------------------------------------------------------------------------------
def _weighted_f_value(frame: Frame, beta2: float) -> float:
    if frame.g == 0:
        if frame.mode == "toolbox":
            return 0.0
        return 1.0 if float(frame.p.max()) == 0.0 else 0.0
    wfm = _pysod().WeightedFmeasure(beta=beta2)
    wfm.step(frame.p, frame.gt, normalize=False)
    q = float(wfm.get_results()["wfm"])
    if frame.mode == "safe":
        return min(max(q, 0.0), 1.0)
    return q


def weighted_f_beta(pred: Any, gt: Any, beta2: float = BETA2_FW, mode: str = "safe", *,
                    rescale: bool | None = None, name: str | None = None) -> float:
    """Weighted F-measure F^w_beta of one frame (Margolin, Zelnik-Manor, Tal, CVPR 2014), beta^2 = 1.

    With E = |pred - G| (pred the continuous map in [0, 1], not thresholded): background pixels take
    the error of their nearest foreground pixel (Euclidean distance transform), the result is
    smoothed by a 7x7 Gaussian (sigma 5, zero padding) and on foreground pixels the smaller of E and
    the smoothed error is kept; background errors are weighted by ``2 - exp(ln(0.5) / 5 * d)``, d the
    distance to the foreground. ``TP^w = |G| - sum_G E^w``, ``FP^w = sum_~G E^w``,
    ``R^w = 1 - mean_G E^w``, ``P^w = TP^w / (TP^w + FP^w)``,
    ``F^w = (1 + b^2) P^w R^w / (b^2 P^w + R^w)``. Computed by ``pysodmetrics.WeightedFmeasure``.

    Args:
        pred: prediction map, (H, W): uint8/integer 0..255, bool, or float in [0, 1].
        gt: ground truth, (H, W), bool or 0/1.
        beta2: beta^2 (1 in SUN-SEG / AutoSAM).
        mode: ``"safe"`` or ``"toolbox"``.
        rescale: min-max rescale the map first; default True in toolbox mode, False in safe mode.
        name: frame name used in warnings.

    Returns:
        float in [0, 1], never NaN. Empty ground truth: toolbox 0 whatever the prediction; safe mode
        1 if the map is all 0, else 0.

    Raises:
        ValueError: bad shapes, values or mode.

    Warns:
        DegenerateGroundTruthWarning: degenerate ground truth (see :func:`s_alpha`).
    """
    frame = prepare_frame(pred, gt, mode, rescale)
    warn_degenerate(frame, name)
    return _weighted_f_value(frame, beta2)


# ----- all metrics of one frame ------------------------------------------------------------------------
@dataclass
class FrameScores:
    """All SUN-SEG metrics of one frame.

    Attributes:
        name: frame name (``clip/stem`` in ``evaluate_clips``).
        s_alpha: S_alpha (float).
        f_w_beta: weighted F, beta^2 = 1 (float).
        curves: ``{"E_phi", "F_beta", "Dice", "Sensitivity"}`` -> float64 (256,), index t = threshold.
        degenerate: None or why the ground truth is degenerate ("empty", "1 foreground pixel",
            "all foreground", "1 background pixel").
        toolbox_nan: toolbox mode only: S_alpha was NaN and reported as 0.
    """

    name: str
    s_alpha: float
    f_w_beta: float
    curves: dict[str, np.ndarray]
    degenerate: str | None = None
    toolbox_nan: bool = False


def score_frame(frame: Frame, name: str, stacklevel: int = 4) -> FrameScores:
    """All metrics of a prepared :class:`~.sunseg_conventions.Frame` (alpha 0.5, beta^2 0.3 and 1).

    Warns:
        DegenerateGroundTruthWarning: once per degenerate frame, naming it.
    """
    reason = warn_degenerate(frame, name, stacklevel=stacklevel)
    s, nan_to_zero = _s_alpha_value(frame, ALPHA)
    if nan_to_zero:
        warn_toolbox_nan(name, stacklevel=stacklevel)
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

    Raises:
        ValueError: bad shapes, values or mode.

    Warns:
        DegenerateGroundTruthWarning: once per degenerate frame, naming it.
    """
    return score_frame(prepare_frame(pred, gt, mode, rescale), name)
