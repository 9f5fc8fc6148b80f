"""Tests for autosam_core.video_metrics (SUN-SEG metrics; AutoSAM paper section 4, Table 3)."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from autosam_core import video_metrics as vm
from autosam_core.data.dataset import data_root
from autosam_core.video_metrics import (DegenerateGroundTruthWarning, FramePairingWarning,
                                        dice_curve, e_phi, e_phi_curve, evaluate_clips,
                                        evaluate_frames, f_beta_curve, frame_scores, metrics_main,
                                        s_alpha, sensitivity_curve, weighted_f_beta)

METRIC_KEYS = ("S_alpha", "E_phi_mean", "E_phi_max", "F_w_beta", "F_beta_mean", "F_beta_max",
               "Dice", "Dice_max", "Sensitivity", "Sensitivity_max")


def square_gt(size: int = 100, lo: int = 40, hi: int = 60) -> np.ndarray:
    gt = np.zeros((size, size), dtype=np.uint8)
    gt[lo:hi, lo:hi] = 1
    return gt


def save_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)


# ---------------------------------------------------------------- (1) one frame, Dice over thresholds
@pytest.mark.parametrize("mode", vm.MODES)
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


# ---------------------------------------------------------------- (2) clip-level vs frame-pooled
def _write_two_clips(root: Path) -> tuple[Path, Path]:
    gt = square_gt()
    pred_dir, gt_dir = root / "PRED", root / "GT"
    for i in range(1, 6):  # clip A: 5 perfect frames
        save_png(gt_dir / "A" / f"{i}.png", gt * 255)
        save_png(pred_dir / "A" / f"{i}.png", gt * 255)
    for i in range(1, 4):  # clip B: 3 frames, the middle prediction is empty
        save_png(gt_dir / "B" / f"{i}.png", gt * 255)
        save_png(pred_dir / "B" / f"{i}.png", gt * 255 if i != 2 else np.zeros_like(gt))
    return pred_dir, gt_dir


def test_clip_average_differs_from_frame_pooled(tmp_path):
    pred_dir, gt_dir = _write_two_clips(tmp_path)
    d0 = 2 * 400 / (10000 + 400)  # Dice at t = 0, where every pixel is predicted foreground
    d_perfect = (d0 + 255) / 256  # perfect frame: Dice 1 for t >= 1
    d_empty = d0 / 256  # empty prediction: Dice 0 for t >= 1 (nothing predicted)
    clip_a = d_perfect
    clip_b = (2 * d_perfect + d_empty) / 3
    by_clip = (clip_a + clip_b) / 2
    pooled = (7 * d_perfect + d_empty) / 8
    assert abs(by_clip - pooled) > 0.01  # 0.8303 vs 0.8726

    res = evaluate_clips(pred_dir, gt_dir, video=True)
    assert res["mode"] == "safe"
    assert res["averaging"] == "per-clip mean, then mean over clips"
    assert (res["num_clips"], res["num_frames"]) == (2, 8)
    assert res["metrics"]["Dice"] == pytest.approx(by_clip, abs=1e-12)
    assert res["per_clip"]["A"]["metrics"]["Dice"] == pytest.approx(clip_a, abs=1e-12)
    assert res["per_clip"]["B"]["metrics"]["Dice"] == pytest.approx(clip_b, abs=1e-12)
    assert res["per_clip"]["B"]["num_frames"] == 3
    assert res["excluded_end_frames"] == [] and res["missing_predictions"] == []

    res_f = evaluate_clips(pred_dir, gt_dir, video=True, averaging="frame")
    assert res_f["averaging"] == "frame-pooled mean over frames"
    assert res_f["metrics"]["Dice"] == pytest.approx(pooled, abs=1e-12)

    # the other metrics follow the same averaging
    gt = square_gt()
    s_p = frame_scores(gt * 255, gt).s_alpha
    s_e = frame_scores(np.zeros_like(gt), gt).s_alpha
    assert res["metrics"]["S_alpha"] == pytest.approx((s_p + (2 * s_p + s_e) / 3) / 2)
    assert res_f["metrics"]["S_alpha"] == pytest.approx((7 * s_p + s_e) / 8)


def test_toolbox_mode_drops_first_and_last_frame(tmp_path):
    pred_dir, gt_dir = _write_two_clips(tmp_path)
    d0 = 2 * 400 / (10000 + 400)
    with pytest.warns(FramePairingWarning, match="end frames"):
        res = evaluate_clips(pred_dir, gt_dir, video=True, mode="toolbox")
    assert res["mode"] == "toolbox"
    assert res["excluded_end_frames"] == ["A/1", "A/5", "B/1", "B/3"]
    assert res["num_frames"] == 4  # A/2..A/4 and B/2
    # clip A: perfect frames; clip B: only the empty middle prediction is left
    expected = ((d0 + 255) / 256 + d0 / 256) / 2
    assert res["metrics"]["Dice"] == pytest.approx(expected, abs=1e-12)
    assert "first and last" in res["conventions"]["end_frames"]


def test_end_frames_use_natural_order(tmp_path):
    gt = square_gt(20, 5, 10)
    for stem in ("9", "10", "11"):
        save_png(tmp_path / "GT" / "c" / f"{stem}.png", gt * 255)
        save_png(tmp_path / "PRED" / "c" / f"{stem}.png", gt * 255)
    with pytest.warns(FramePairingWarning):
        res = evaluate_clips(tmp_path / "PRED", tmp_path / "GT", mode="toolbox")
    assert res["excluded_end_frames"] == ["c/9", "c/11"]


def test_missing_and_orphan_frames_are_reported(tmp_path):
    pred_dir, gt_dir = _write_two_clips(tmp_path)
    (pred_dir / "A" / "3.png").unlink()
    save_png(pred_dir / "A" / "99.png", square_gt() * 255)
    save_png(pred_dir / "Z" / "1.png", square_gt() * 255)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        res = evaluate_clips(pred_dir, gt_dir)
    texts = [str(w.message) for w in rec if w.category is FramePairingWarning]
    assert any("no prediction (A/3)" in t for t in texts)
    assert any("no ground truth (A/99)" in t for t in texts)
    assert any("no ground-truth clip (Z)" in t for t in texts)
    assert res["missing_predictions"] == ["A/3"]
    assert res["orphan_predictions"] == ["A/99"]
    assert res["orphan_prediction_clips"] == ["Z"]
    assert res["num_frames"] == 7 and res["per_clip"]["A"]["num_frames"] == 4
    with pytest.warns(FramePairingWarning):
        res_empty = evaluate_clips(pred_dir, gt_dir, on_missing="empty")
    assert res_empty["num_frames"] == 8
    assert res_empty["metrics"]["Dice"] < res["metrics"]["Dice"]
    with pytest.raises(FileNotFoundError, match="A/3"):
        evaluate_clips(pred_dir, gt_dir, on_missing="error")


def test_resized_prediction_is_listed(tmp_path):
    gt = square_gt()
    save_png(tmp_path / "GT" / "f1.png", gt * 255)
    big = np.kron(gt, np.ones((2, 2), dtype=np.uint8)) * 255  # 200x200
    save_png(tmp_path / "PRED" / "f1.png", big)
    with pytest.warns(FramePairingWarning, match="resized"):
        res = evaluate_clips(tmp_path / "PRED", tmp_path / "GT", video=False)
    assert res["resized_predictions"] == ["f1"]
    assert res["averaging"] == "frame-pooled mean over frames"
    assert res["metrics"]["Dice_max"] == pytest.approx(1.0)


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
    assert e_phi(gt, gt) == 1.0
    curve = e_phi_curve(pred, gt)
    assert curve[0] == pytest.approx(0.25)  # t = 0: all foreground, bias matrix 0, phi = 1/4
    assert np.all(curve[1:] == 1.0)
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


# ---------------------------------------------------------------- (5) real polyp frames as clips
CLINIC = data_root() / "CVC-ClinicDB"


@pytest.mark.skipif(not (CLINIC / "splits" / "sequences.csv").is_file(), reason="CVC-ClinicDB absent")
def test_real_polyp_clips(tmp_path):
    from scipy import ndimage

    from autosam_core.data.io import load_mask

    with open(CLINIC / "splits" / "sequences.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))  # columns: frame,sequence
    by_seq: dict[str, list[str]] = {}
    for row in rows:
        by_seq.setdefault(row["sequence"], []).append(row["frame"])
    seqs = sorted(by_seq, key=int)[:2]
    gts = {}
    for seq in seqs:
        for frame in sorted(by_seq[seq], key=int)[:3]:
            gt = load_mask(CLINIC / "masks" / f"{frame}.png")
            gts[(seq, frame)] = gt
            save_png(tmp_path / "GT" / seq / f"{frame}.png", gt * 255)
            if seq == seqs[0]:
                pred = gt * 255  # the ground truth itself
            else:
                moved = ndimage.binary_dilation(np.roll(gt, (12, 15), axis=(0, 1)), iterations=4)
                pred = moved.astype(np.uint8) * 255
            save_png(tmp_path / "PRED" / seq / f"{frame}.png", pred)
    res = evaluate_clips(tmp_path / "PRED", tmp_path / "GT", video=True)
    assert (res["num_clips"], res["num_frames"]) == (2, 6)
    perfect, other = res["per_clip"][seqs[0]]["metrics"], res["per_clip"][seqs[1]]["metrics"]
    # threshold-free and max-over-threshold metrics of the perfect clip are exactly 1
    for key in ("S_alpha", "F_w_beta", "E_phi_max", "F_beta_max", "Dice_max", "Sensitivity",
                "Sensitivity_max"):
        assert perfect[key] == pytest.approx(1.0, abs=1e-9), key
    # mean over the 256 thresholds: 1 for t >= 1, the t = 0 (all foreground) value otherwise
    frames0 = [g for (s, _), g in gts.items() if s == seqs[0]]
    n = frames0[0].size
    dice_t0 = np.mean([2 * g.sum() / (n + g.sum()) for g in frames0])
    f_t0 = np.mean([1.3 * (g.sum() / n) / (0.3 * g.sum() / n + 1) for g in frames0])
    assert perfect["Dice"] == pytest.approx((dice_t0 + 255) / 256, abs=1e-12)
    assert perfect["F_beta_mean"] == pytest.approx((f_t0 + 255) / 256, abs=1e-12)
    assert perfect["E_phi_mean"] == pytest.approx((0.25 + 255) / 256, abs=1e-12)
    # the shifted + dilated clip is worse on every metric except Sensitivity_max, which is 1 for
    # any prediction (at t = 0 every pixel is foreground)
    for key in METRIC_KEYS:
        if key == "Sensitivity_max":
            assert other[key] == 1.0
            continue
        assert 0.0 <= other[key] < perfect[key] - 1e-3, key
        assert other[key] < 0.96, key  # e.g. S_alpha 0.70, F_w_beta 0.47, Dice 0.54 here


# ---------------------------------------------------------------- CLI
def test_metrics_main_prints_json(tmp_path, capsys):
    pred_dir, gt_dir = _write_two_clips(tmp_path)
    out = tmp_path / "out" / "m.json"
    assert metrics_main(["--pred", str(pred_dir), "--gt", str(gt_dir), "--video",
                         "--json", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert printed["mode"] == "safe" and printed["averaging"].startswith("per-clip")
    assert set(METRIC_KEYS) <= set(printed["metrics"])
    with pytest.warns(FramePairingWarning):
        assert metrics_main(["--pred", str(pred_dir), "--gt", str(gt_dir), "--video",
                             "--mode", "toolbox"]) == 0
    assert json.loads(capsys.readouterr().out)["mode"] == "toolbox"
    assert metrics_main(["--pred", str(tmp_path / "nope"), "--gt", str(gt_dir)]) == 2
    assert "not found" in capsys.readouterr().err


def test_toolbox_clip_without_frames_is_nan_safe_leaves_it_out(tmp_path, capsys):
    gt = square_gt(20, 5, 12)
    for clip, count in (("long", 4), ("short", 2)):
        for i in range(count):
            save_png(tmp_path / "GT" / clip / f"{i}.png", gt * 255)
            save_png(tmp_path / "PRED" / clip / f"{i}.png", gt * 255)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        res = evaluate_clips(tmp_path / "PRED", tmp_path / "GT", mode="toolbox")
    assert any("no scored frame (short); NaN" in str(w.message) for w in rec)
    assert np.isnan(res["metrics"]["Dice"]) and res["empty_clips"] == ["short"]
    assert res["per_clip"]["long"]["num_frames"] == 2
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        res = evaluate_clips(tmp_path / "PRED", tmp_path / "GT", drop_ends=True)
    assert any("no scored frame (short); left out" in str(w.message) for w in rec)
    assert res["num_clips"] == 1 and np.isfinite(res["metrics"]["Dice"])
    with pytest.warns(FramePairingWarning):
        assert metrics_main(["--pred", str(tmp_path / "PRED"), "--gt", str(tmp_path / "GT"),
                             "--video", "--mode", "toolbox"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"]["Dice"] is None  # NaN -> null


def test_bad_inputs_raise_clear_errors(tmp_path):
    gt = square_gt(10, 2, 5)
    with pytest.raises(ValueError, match="binary"):
        s_alpha(gt * 255, gt * 255)
    with pytest.raises(ValueError, match="shape"):
        dice_curve(np.zeros((5, 5), np.uint8), gt)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        dice_curve(np.full(gt.shape, 2.0), gt)
    with pytest.raises(ValueError, match="mode"):
        dice_curve(gt, gt, mode="matlab")
    (tmp_path / "G").mkdir()
    (tmp_path / "P").mkdir()
    with pytest.raises(ValueError, match="no clip sub-folders"):
        evaluate_clips(tmp_path / "P", tmp_path / "G", video=True)
