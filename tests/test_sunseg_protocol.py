"""SUN-SEG protocol and file pairing (autosam_core.metrics.sunseg_protocol / frame_files / cli):
clip vs frame averaging, end frames, missing and orphan frames, real polyp clips, the CLI."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from autosam_core.data.dataset import data_root
from autosam_core.metrics.cli import metrics_main
from autosam_core.metrics.frame_files import FramePairingWarning
from autosam_core.metrics.sunseg_frame import frame_scores
from autosam_core.metrics.sunseg_protocol import METRIC_KEYS, evaluate_clips
from tests.sunseg_helpers import save_png, square_gt

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


def test_clip_layout_needs_clip_folders(tmp_path):
    (tmp_path / "G").mkdir()
    (tmp_path / "P").mkdir()
    with pytest.raises(ValueError, match="no clip sub-folders"):
        evaluate_clips(tmp_path / "P", tmp_path / "G", video=True)
