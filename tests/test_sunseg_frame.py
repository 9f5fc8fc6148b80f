"""Per-frame SUN-SEG metrics (autosam_core.metrics.sunseg_frame / sunseg_conventions; AutoSAM paper
section 4, Table 3; Ji et al. 2022): hand-computed values, safe vs toolbox conventions."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from autosam_core.metrics.sunseg_conventions import MODES, DegenerateGroundTruthWarning
from autosam_core.metrics.sunseg_frame import (dice_curve, e_phi, e_phi_curve, f_beta_curve,
                                               frame_scores, s_alpha, sensitivity_curve,
                                               weighted_f_beta)
from autosam_core.metrics.sunseg_protocol import METRIC_KEYS, evaluate_frames
from tests.sunseg_helpers import square_gt

# ---------------------------------------------------------------- (1) one frame, Dice over thresholds
@pytest.mark.parametrize("mode", MODES)
def test_perfect_square_dice_max_is_one_mean_below_one(mode):
    gt = square_gt()  # 100x100, 20x20 = 400 foreground pixels
    pred = (gt * 255).astype(np.uint8)
    curve = dice_curve(pred, gt, mode=mode)
    assert curve.shape == (256,)
    # Hand computation: at t = 0 the binary prediction (pred >= 0) is all 10,000 pixels:
    dice_t0 = 2 * 400 / (10000 + 400)  # = 0.0769...
    # for t = 1..255 the binary prediction is exactly the square: Dice = 1.
    expected_mean = (dice_t0 + 255 * 1.0) / 256
    assert curve[0] == pytest.approx(dice_t0)
    assert np.all(curve[1:] == 1.0)
    assert curve.max() == 1.0
    assert curve.mean() == pytest.approx(expected_mean, abs=1e-12)
    assert curve.mean() < 1
    res = evaluate_frames([("square", pred, gt)], mode=mode)
    assert res["metrics"]["Dice_max"] == 1.0
    assert res["metrics"]["Dice"] == pytest.approx(expected_mean, abs=1e-12)


# ---------------------------------------------------------------- (3) safe mode: never NaN, in [0, 1]
def _random_case(rng: np.random.Generator, i: int) -> tuple[np.ndarray, np.ndarray]:
    h, w = int(rng.integers(1, 13)), int(rng.integers(1, 13))
    kind = i % 6
    if kind == 0:
        gt = np.zeros((h, w), np.uint8)
    elif kind == 1:
        gt = np.ones((h, w), np.uint8)
    elif kind == 2:  # one foreground pixel
        gt = np.zeros((h, w), np.uint8)
        gt[rng.integers(h), rng.integers(w)] = 1
    elif kind == 3:  # one background pixel
        gt = np.ones((h, w), np.uint8)
        gt[rng.integers(h), rng.integers(w)] = 0
    else:
        gt = (rng.random((h, w)) < rng.random()).astype(np.uint8)
    pkind = (i // 6) % 6
    if pkind == 0:
        pred = np.zeros((h, w), np.uint8)
    elif pkind == 1:
        pred = np.full((h, w), 255, np.uint8)
    elif pkind == 2:
        pred = gt * 255
    elif pkind == 3:
        pred = (1 - gt) * 255
    elif pkind == 4:
        pred = (rng.random((h, w)) < 0.5).astype(np.uint8) * 255
    else:
        pred = rng.integers(0, 256, (h, w)).astype(np.uint8)
    return pred.astype(np.uint8), gt


def test_safe_mode_never_nan_and_in_unit_interval():
    rng = np.random.default_rng(12345)
    cases = [_random_case(rng, i) for i in range(216)]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for i, (pred, gt) in enumerate(cases):
            fs = frame_scores(pred, gt, name=f"case{i}")
            values = [fs.s_alpha, fs.f_w_beta] + [v for c in fs.curves.values() for v in c]
            arr = np.asarray(values, dtype=np.float64)
            assert np.isfinite(arr).all(), (i, pred, gt)
            assert arr.min() >= 0.0 and arr.max() <= 1.0, (i, pred, gt, arr.min(), arr.max())
            n, g = gt.size, int(gt.sum())
            if g < 2 or n - g < 2:
                assert fs.degenerate is not None
        res = evaluate_frames([(f"case{i}", p, g) for i, (p, g) in enumerate(cases)])
    assert all(0.0 <= res["metrics"][k] <= 1.0 for k in METRIC_KEYS)
    assert not [w for w in rec if issubclass(w.category, RuntimeWarning)]  # no 0/0 anywhere
    degenerate_msgs = [str(w.message) for w in rec if w.category is DegenerateGroundTruthWarning]
    assert any(m.startswith("frame case0: ground truth is empty") for m in degenerate_msgs)
    assert any("case2:" in m and "1 foreground pixel" in m for m in degenerate_msgs)
    assert len(res["degenerate_frames"]) >= 4 * 216 // 6


def test_one_pixel_ground_truth_safe_vs_toolbox():
    gt = np.zeros((9, 9), np.uint8)
    gt[4, 4] = 1
    pred = gt * 255
    with pytest.warns(DegenerateGroundTruthWarning, match="1 foreground pixel"):
        assert s_alpha(pred, gt, name="one") == pytest.approx(1.0)
    # The toolbox's std(ddof=1) of one pixel is NaN and max(0, NaN) = 0.
    with pytest.warns(DegenerateGroundTruthWarning, match="frame one"):
        assert s_alpha(pred, gt, mode="toolbox", name="one") == 0.0


def test_empty_ground_truth_conventions():
    gt = np.zeros((10, 10), np.uint8)
    empty, stray = np.zeros((10, 10), np.uint8), np.zeros((10, 10), np.uint8)
    stray[2, 3] = 255
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegenerateGroundTruthWarning)
        # safe: overlap metrics 1 only where the (thresholded) prediction is empty
        assert weighted_f_beta(empty, gt) == 1.0 and weighted_f_beta(stray, gt) == 0.0
        d = dice_curve(empty, gt)
        assert d[0] == 0.0 and np.all(d[1:] == 1.0)  # t = 0 predicts every pixel
        assert np.all(dice_curve(stray, gt)[1:] == 0.0)
        assert np.all(sensitivity_curve(empty, gt)[1:] == 1.0)
        assert np.all(f_beta_curve(empty, gt)[1:] == 1.0)
        # S_alpha and E_phi: the papers' special cases (1 - mean(pred); share of predicted background)
        assert s_alpha(stray, gt) == pytest.approx(0.99)
        assert e_phi_curve(stray, gt)[1] == pytest.approx(0.99)
        # toolbox: overlap metrics 0 whatever the prediction
        assert weighted_f_beta(empty, gt, mode="toolbox") == 0.0
        assert np.all(dice_curve(empty, gt, mode="toolbox") == 0.0)
        assert np.all(sensitivity_curve(empty, gt, mode="toolbox") == 0.0)
        assert np.all(f_beta_curve(empty, gt, mode="toolbox") == 0.0)


# ---------------------------------------------------------------- (4) perfect / inverted / hand values
def test_perfect_and_inverted_predictions():
    gt = square_gt()
    pred = (gt * 255).astype(np.uint8)
    assert s_alpha(pred, gt) == pytest.approx(1.0, abs=1e-12)
    assert s_alpha(255 - pred, gt) < 0.5
    # pysodmetrics adds eps to the alignment-matrix denominator: 1 - 6.6e-14 here, not exactly 1
    # (docs/METRICS.md)
    assert e_phi(gt, gt) == pytest.approx(1.0, abs=1e-12)
    curve = e_phi_curve(pred, gt)
    assert curve[0] == pytest.approx(0.25)  # t = 0: all foreground, bias matrix 0, phi = 1/4
    assert np.allclose(curve[1:], 1.0, rtol=0, atol=1e-12)
    assert weighted_f_beta(pred, gt) == pytest.approx(1.0, abs=1e-12)
    assert weighted_f_beta(255 - pred, gt) < 0.1
    assert np.all(sensitivity_curve(pred, gt) == 1.0)
    # toolbox: E_phi normalised by H*W - 1 (+eps) as the official code
    assert e_phi(gt, gt, mode="toolbox") == pytest.approx(10000 / 9999)


def test_f_beta_hand_values():
    gt = np.zeros((4, 4), np.uint8)
    gt[0, :] = 1  # |G| = 4 of 16 pixels
    pred = np.zeros((4, 4), np.uint8)
    pred[0, 0] = pred[0, 1] = 200  # two true positives at level 200
    pred[0, 2] = 100  # one true positive at level 100
    pred[3, 3] = 100  # one false positive at level 100
    b = 0.3

    def f(p, r):
        return (1 + b) * p * r / (b * p + r)

    curve = f_beta_curve(pred, gt)  # beta^2 = 0.3 by default
    assert curve[0] == pytest.approx(f(4 / 16, 1.0))  # all 16 pixels: P = 0.25, R = 1 -> 0.3023
    assert np.allclose(curve[1:101], f(3 / 4, 3 / 4))  # P = R = 0.75 -> 0.75
    assert np.allclose(curve[101:201], f(1.0, 2 / 4))  # P = 1, R = 0.5 -> 0.8125
    assert np.all(curve[201:] == 0.0)  # nothing predicted
    assert f(1.0, 0.5) == pytest.approx(0.8125)
    expected_mean = (f(0.25, 1.0) + 100 * 0.75 + 100 * 0.8125) / 256
    assert curve.mean() == pytest.approx(expected_mean)
    dice = dice_curve(pred, gt)
    assert dice[50] == pytest.approx(2 * 3 / (4 + 4)) and dice[150] == pytest.approx(2 * 2 / (2 + 4))
    assert sensitivity_curve(pred, gt)[150] == pytest.approx(0.5)


def test_e_phi_counts_match_pixelwise_formula():
    rng = np.random.default_rng(7)
    for _ in range(10):
        gt = (rng.random((15, 11)) < 0.3).astype(np.uint8)
        gt[0, 0], gt[1, 1] = 1, 0
        pred = rng.integers(0, 256, gt.shape).astype(np.uint8)
        curve = e_phi_curve(pred, gt)
        for t in (0, 1, 77, 128, 255):
            fm = (pred >= t).astype(np.float64)
            g = gt.astype(np.float64)
            a, c = fm - fm.mean(), g - g.mean()
            den = a * a + c * c
            xi = np.divide(2 * a * c, den, out=np.zeros_like(den), where=den > 0)
            assert curve[t] == pytest.approx(np.mean((xi + 1) ** 2 / 4), abs=1e-12)
            inter = np.sum((pred >= t) & (gt == 1))
            assert dice_curve(pred, gt)[t] == pytest.approx(2 * inter / (np.sum(pred >= t) + gt.sum()))


def test_toolbox_dice_reproduces_linspace_float_thresholds():
    gt = square_gt(20, 5, 12)
    pred = (gt * 255).astype(np.uint8)
    pred[0, 0] = 4  # 4/255 < linspace(1, 0, 256)[251] by one ulp: the toolbox misses it at t = 4
    safe, tool = dice_curve(pred, gt), dice_curve(pred, gt, mode="toolbox")
    assert safe[4] < safe[5] and tool[4] == tool[5]  # safe counts the pixel at t = 4, toolbox not
    assert np.array_equal(safe[:4], tool[:4]) and np.array_equal(safe[5:], tool[5:])


def test_bad_inputs_raise_clear_errors():
    gt = square_gt(10, 2, 5)
    with pytest.raises(ValueError, match="binary"):
        s_alpha(gt * 255, gt * 255)
    with pytest.raises(ValueError, match="shape"):
        dice_curve(np.zeros((5, 5), np.uint8), gt)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        dice_curve(np.full(gt.shape, 2.0), gt)
    with pytest.raises(ValueError, match="mode"):
        dice_curve(gt, gt, mode="matlab")


# ---------------------------------------------------------------- the pysodmetrics wiring
def test_levels_reach_pysodmetrics_exactly():
    from autosam_core.metrics.sunseg_frame import _level_map

    levels = np.arange(256, dtype=np.uint8)
    encoded = _level_map(levels)
    assert encoded.min() >= 0.0 and encoded.max() <= 1.0  # pysodmetrics refuses values outside [0, 1]
    assert np.array_equal((encoded * 255).astype(np.uint8), levels)  # its uint8(255 x) histogram


def test_centroid_on_last_column_safe_skips_empty_part_toolbox_zero():
    # Foreground = the last column of a 3x3 frame: centroid (1, 2), split at x = 3 = W, so the two
    # right parts have zero area. Perfect prediction: O_FG = 2*1/(1 + 1 + 0) = 1, O_BG = 1, S_o = 1;
    # the non-empty parts (rows 0:2 and 2:3, all columns) have pred == gt, SSIM 1, so S_r = 1.
    gt = np.zeros((3, 3), np.uint8)
    gt[:, 2] = 1
    pred = gt * 255
    assert s_alpha(pred, gt) == pytest.approx(1.0, abs=1e-12)  # pysodmetrics alone gives NaN here
    with pytest.warns(DegenerateGroundTruthWarning, match="NaN"):
        assert s_alpha(pred, gt, mode="toolbox") == 0.0  # the toolbox's mean over an empty part


def test_s_alpha_hand_value_two_pixel_regions():
    # 2x2 frame, foreground = top row, prediction 255 on the foreground, 0 and 255 on the background.
    # S_o: mu = 0.5, O_FG = 2*1/(1+1+0) = 1; background values 1-p = (1, 0): mean 0.5, sample std
    # sqrt(0.5): O_BG = 1/(0.25 + 1 + 0.7071) = 0.51087; S_o = 0.75544.
    # S_r: centroid (row 0, col 0.5 -> round-half-even 0): split x = 1, y = 1; parts: [0,0] (gt 1,
    # p 1), [0,1] (1, 1), [1,0] (0, 0), [1,1] (0, 1); 1-pixel parts: sample variances 0 -> SSIM 1
    # where numerator and denominator are 0 (all four), each weight 1/4: S_r = 1.
    gt = np.array([[1, 1], [0, 0]], np.uint8)
    pred = np.array([[255, 255], [0, 255]], np.uint8)
    o_bg = 2 * 0.5 / (0.25 + 1 + np.sqrt(0.5))
    expected = 0.5 * (0.5 * 1 + 0.5 * o_bg) + 0.5 * 1.0
    assert s_alpha(pred, gt) == pytest.approx(expected, abs=1e-12)  # 0.87772
