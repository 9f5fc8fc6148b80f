"""Parity of the SUN-SEG metrics: pysodmetrics-based ``autosam_core.metrics`` vs the earlier NumPy code.

Usage (from the repository root)::

    python benchmarks/sunseg_parity.py [--rev 484ee69] [--limit N] [--json OUT]

The reference is ``autosam_core/video_metrics.py`` at git revision ``--rev`` (the hand-written NumPy
implementation that preceded the switch to pysodmetrics), loaded from ``git show``. Inputs:

* CVC-ClinicDB (``$AUTOSAM_DATA/CVC-ClinicDB``): every ground-truth mask, grouped into clips by
  ``splits/sequences.csv``, against three deterministic predictions: ``blur`` (the mask x255 blurred
  by a Gaussian, sigma 6, plus Gaussian noise sd 20 with seed 0, clipped to 0..255: a grayscale map),
  ``shift`` (the mask rolled by a per-frame offset from seed 1 and dilated 3 times: binary 0/255) and
  ``neighbour`` (the next frame's mask of the same sequence, the previous one for the last frame).
* 216 synthetic frames (1x1 to 12x12, empty / full / 1-pixel ground truth, constant, inverted and
  random maps; seed 12345, the cases of tests/test_sunseg_frame.py).

For each mode (safe, toolbox) it reports the largest absolute difference per metric between the two
implementations, per frame (S_alpha, F^w_beta and every point of the four curves) and for the ten
reported numbers after the protocol (clip averaging by sequence; toolbox mode drops end frames).
Also reported: pysodmetrics called directly with its own defaults (``normalize=True``) against the
reference's toolbox mode, to show where pysodmetrics alone differs from the SUN-SEG toolbox.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autosam_core.data.dataset import data_root  # noqa: E402
from autosam_core.data.io import load_mask  # noqa: E402
from autosam_core.metrics import sunseg_frame as new  # noqa: E402
from autosam_core.metrics.sunseg_protocol import METRIC_KEYS, report  # noqa: E402

CURVES = ("E_phi", "F_beta", "Dice", "Sensitivity")
SCALARS = ("S_alpha", "F_w_beta")


def load_reference(rev: str):
    """The NumPy implementation at ``rev`` as a module (its file-reading helpers are not used)."""
    text = subprocess.run(["git", "show", f"{rev}:autosam_core/video_metrics.py"], cwd=ROOT,
                          check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "reference_video_metrics.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("reference_video_metrics", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def clinic_frames(limit: int | None):
    """``[(sequence, frame, gt bool)]`` in sequence order, and the three predictions per frame."""
    base = data_root() / "CVC-ClinicDB"
    with open(base / "splits" / "sequences.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    by_seq: dict[str, list[str]] = {}
    for row in rows:
        by_seq.setdefault(row["sequence"], []).append(row["frame"])
    frames = []
    for seq in sorted(by_seq, key=int):
        stems = sorted(by_seq[seq], key=int)
        masks = [load_mask(base / "masks" / f"{s}.png").astype(bool) for s in stems]
        for i, (stem, gt) in enumerate(zip(stems, masks)):
            frames.append((seq, stem, gt, masks[i + 1] if i + 1 < len(masks) else masks[i - 1]))
    if limit:
        frames = frames[:limit]
    noise = np.random.default_rng(0)
    offsets = np.random.default_rng(1)
    out = []
    for seq, stem, gt, neighbour in frames:
        blur = ndimage.gaussian_filter(gt.astype(np.float64) * 255, 6)
        blur = np.clip(np.rint(blur + noise.normal(0, 20, gt.shape)), 0, 255).astype(np.uint8)
        dy, dx = (int(v) for v in offsets.integers(-20, 21, 2))
        shift = ndimage.binary_dilation(np.roll(gt, (dy, dx), axis=(0, 1)), iterations=3)
        preds = {"blur": blur, "shift": shift.astype(np.uint8) * 255,
                 "neighbour": (neighbour if neighbour.shape == gt.shape else gt).astype(np.uint8) * 255}
        out.append((seq, stem, gt, preds))
    return out


def synthetic_frames():
    """The 216 small (often degenerate) cases of the safe-mode range test, seed 12345."""
    rng = np.random.default_rng(12345)
    cases = []
    for i in range(216):
        h, w = int(rng.integers(1, 13)), int(rng.integers(1, 13))
        kind = i % 6
        if kind == 0:
            gt = np.zeros((h, w), np.uint8)
        elif kind == 1:
            gt = np.ones((h, w), np.uint8)
        elif kind == 2:
            gt = np.zeros((h, w), np.uint8)
            gt[rng.integers(h), rng.integers(w)] = 1
        elif kind == 3:
            gt = np.ones((h, w), np.uint8)
            gt[rng.integers(h), rng.integers(w)] = 0
        else:
            gt = (rng.random((h, w)) < rng.random()).astype(np.uint8)
        pkind = (i // 6) % 6
        pred = [np.zeros((h, w), np.uint8), np.full((h, w), 255, np.uint8), gt * 255,
                (1 - gt) * 255, (rng.random((h, w)) < 0.5).astype(np.uint8) * 255,
                rng.integers(0, 256, (h, w)).astype(np.uint8)][pkind]
        cases.append((f"case{i}", pred.astype(np.uint8), gt))
    return cases


def frame_values(fs) -> dict[str, np.ndarray]:
    return {"S_alpha": np.array([fs.s_alpha]), "F_w_beta": np.array([fs.f_w_beta]),
            **{k: np.asarray(fs.curves[k]) for k in CURVES}}


def diff(a: dict, b: dict) -> dict[str, float]:
    out = {}
    for k in a:
        x, y = np.asarray(a[k], float), np.asarray(b[k], float)
        one_nan = np.isnan(x) != np.isnan(y)  # reported as inf: NaN on one side only
        d = np.where(np.isnan(x) & np.isnan(y), 0.0, np.abs(x - y))
        out[k] = float(np.max(np.where(one_nan, np.inf, d)))
    return out


def worst(acc: dict, d: dict, name: str) -> None:
    for k, v in d.items():
        if v > acc.get(k, (-1.0, ""))[0]:
            acc[k] = (v, name)


def clip_report(scores: list[tuple[str, dict]], drop_ends: bool) -> dict[str, float]:
    clips: dict[str, list[dict]] = {}
    for seq, v in scores:
        clips.setdefault(seq, []).append(v)
    means = []
    for frames in clips.values():
        frames = frames[1:-1] if drop_ends else frames
        if not frames:
            continue
        means.append({k: np.mean([f[k] for f in frames], axis=0) for k in frames[0]})
    avg = {k: np.mean([m[k] for m in means], axis=0) for k in means[0]}
    return report(float(avg["S_alpha"][0]), float(avg["F_w_beta"][0]), {k: avg[k] for k in CURVES})


def raw_pysod(pred: np.ndarray, gt: np.ndarray) -> dict[str, np.ndarray]:
    """pysodmetrics with its own defaults (normalize=True: min-max rescale, gt > 128)."""
    import py_sod_metrics as ps

    g = gt.astype(np.uint8) * 255
    sm, em, wfm = ps.Smeasure(), ps.Emeasure(), ps.WeightedFmeasure()
    fm = ps.FmeasureV2(metric_handlers={
        "F_beta": ps.FmeasureHandler(with_dynamic=True, with_adaptive=False, beta=0.3),
        "Dice": ps.DICEHandler(with_dynamic=True, with_adaptive=False),
        "Sensitivity": ps.SensitivityHandler(with_dynamic=True, with_adaptive=False)})
    for m in (sm, em, wfm, fm):
        m.step(pred, g)
    res = fm.get_results()
    return {"S_alpha": np.array([sm.get_results()["sm"]]), "F_w_beta": np.array([wfm.get_results()["wfm"]]),
            "E_phi": em.get_results()["em"]["curve"][::-1], **{k: res[k]["dynamic"][::-1] for k in CURVES[1:]}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", default="484ee69", help="git revision of the reference implementation")
    ap.add_argument("--limit", type=int, help="first N ClinicDB frames only")
    ap.add_argument("--json", help="write the result here")
    args = ap.parse_args(argv)
    ref = load_reference(args.rev)
    warnings.simplefilter("ignore")
    result: dict = {"reference": f"{args.rev}:autosam_core/video_metrics.py"}
    clinic = clinic_frames(args.limit)
    result["clinic_frames"] = len(clinic)
    result["clinic_clips"] = len({seq for seq, *_ in clinic})
    for mode in ("safe", "toolbox"):
        per_frame: dict = {}
        reported: dict = {}
        for kind in ("blur", "shift", "neighbour"):
            old_s, new_s = [], []
            for seq, stem, gt, preds in clinic:
                o = frame_values(ref.frame_scores(preds[kind], gt, mode=mode, name=stem))
                n = frame_values(new.frame_scores(preds[kind], gt, mode=mode, name=stem))
                worst(per_frame, diff(o, n), f"{kind}:{seq}/{stem}")
                old_s.append((seq, o))
                new_s.append((seq, n))
            ro, rn = clip_report(old_s, mode == "toolbox"), clip_report(new_s, mode == "toolbox")
            reported[kind] = {"reference": ro, "pysodmetrics": rn,
                              "max_abs_diff": max(abs(ro[k] - rn[k]) for k in METRIC_KEYS)}
        for name, pred, gt in synthetic_frames():
            o = frame_values(ref.frame_scores(pred, gt, mode=mode, name=name))
            n = frame_values(new.frame_scores(pred, gt, mode=mode, name=name))
            worst(per_frame, diff(o, n), f"synthetic:{name}")
        result[mode] = {"per_frame_max_abs_diff": {k: {"value": v, "where": w} for k, (v, w) in per_frame.items()},
                        "reported": reported}
    direct: dict = {}
    for seq, stem, gt, preds in clinic:
        for kind, pred in preds.items():
            worst(direct, diff(frame_values(ref.frame_scores(pred, gt, mode="toolbox")), raw_pysod(pred, gt)),
                  f"{kind}:{seq}/{stem}")
    for name, pred, gt in synthetic_frames():
        if gt.size > 1:
            worst(direct, diff(frame_values(ref.frame_scores(pred, gt, mode="toolbox")), raw_pysod(pred, gt)),
                  f"synthetic:{name}")
    result["pysodmetrics_defaults_vs_reference_toolbox"] = {k: {"value": v, "where": w}
                                                            for k, (v, w) in direct.items()}
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
