"""The SUN-SEG evaluation protocol: which frames count and how their scores are averaged.

Source: Ji et al., "Video polyp segmentation: a deep learning perspective", Machine Intelligence
Research 19(6), 2022, and its toolbox (github.com/GewelsJI/VPS, ``eval/vps_evaluator.py``), as used by
the AutoSAM paper (section 4, Table 3).

* Each frame gives two scalars (S_alpha, F^w_beta) and four 256-point curves (E_phi, F_beta, Dice,
  Sensitivity), :mod:`.sunseg_frame`.
* ``averaging="clip"`` (default for video): frames are averaged per clip (scalars and curves
  element-wise), then clips are averaged; ``averaging="frame"`` pools all frames.
* "mean" metrics are the mean of the averaged curve over the 256 thresholds, "max" metrics its max.
  At t = 0 every pixel is foreground, so the mean of a perfect binary (0/255) prediction is below 1
  for Dice, F_beta and E_phi (e.g. Dice(t=0) = 2|G| / (H*W + |G|)); the max is 1.
* Toolbox mode drops the first and the last frame of every clip (the toolbox's ``[1:-1]``, after
  DAVSOD); a clip left with no frame is NaN (its mean over nothing) and so is the dataset mean.
  Safe mode keeps all frames and leaves clips without a scored frame out of the mean (listed).
* A ground-truth frame without prediction is skipped, scored as an empty map, or an error
  (``on_missing``); a prediction of another size is resized to its ground truth (bilinear). Every
  such frame is listed in the result and warned about.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .frame_files import FramePairingWarning, load_prediction, pair_clips, resize_prediction
from .sunseg_conventions import NUM_THRESHOLDS, check_mode, conventions, prepare_frame
from .sunseg_frame import CURVES, score_frame

__all__ = ["METRIC_KEYS", "evaluate_frames", "evaluate_clips", "report"]

METRIC_KEYS = ("S_alpha", "E_phi_mean", "E_phi_max", "F_w_beta", "F_beta_mean", "F_beta_max",
               "Dice", "Dice_max", "Sensitivity", "Sensitivity_max")
_SHOW = 5  # names shown in a warning; the output lists all


class _Accumulator:
    """Running sums of frame scores (memory independent of the number of frames)."""

    def __init__(self) -> None:
        self.n = 0
        self.s_alpha = 0.0
        self.f_w_beta = 0.0
        self.curves = {k: np.zeros(NUM_THRESHOLDS) for k in CURVES}

    def add(self, s: float, fw: float, curves: dict[str, np.ndarray]) -> None:
        self.n += 1
        self.s_alpha += s
        self.f_w_beta += fw
        for k in CURVES:
            self.curves[k] += curves[k]

    def mean(self) -> tuple[float, float, dict[str, np.ndarray]]:
        """Means; NaN when empty (the toolbox's mean over nothing)."""
        if self.n == 0:
            nan = float("nan")
            return nan, nan, {k: np.full(NUM_THRESHOLDS, nan) for k in CURVES}
        return (self.s_alpha / self.n, self.f_w_beta / self.n,
                {k: v / self.n for k, v in self.curves.items()})


def report(s: float, fw: float, curves: dict[str, np.ndarray]) -> dict[str, float]:
    """The ten reported numbers from averaged scores: curves reduced by mean and max over thresholds.

    Args:
        s, fw: averaged S_alpha and F^w_beta.
        curves: averaged curves, each float64 (256,).

    Returns:
        ``{key: float}`` for :data:`METRIC_KEYS`.
    """
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
        (:data:`METRIC_KEYS`), ``degenerate_frames``, ``conventions``. Safe mode: every metric in
        [0, 1].

    Raises:
        ValueError: no frames, bad shapes or values, unknown mode.

    Warns:
        DegenerateGroundTruthWarning: once per degenerate frame, naming it.
    """
    check_mode(mode)
    scale = (mode == "toolbox") if rescale is None else bool(rescale)
    acc = _Accumulator()
    degenerate: list[dict[str, str]] = []
    for name, pred, gt in _pairs_iter(pairs):
        fs = score_frame(prepare_frame(pred, gt, mode, scale), name)
        acc.add(fs.s_alpha, fs.f_w_beta, fs.curves)
        if fs.degenerate:
            degenerate.append({"frame": name, "ground_truth": fs.degenerate})
    if acc.n == 0:
        raise ValueError("evaluate_frames: no frames given")
    return {
        "mode": mode,
        "averaging": "frame-pooled mean over frames",
        "num_frames": acc.n,
        "metrics": report(*acc.mean()),
        "degenerate_frames": degenerate,
        "conventions": conventions(mode, scale, False),
    }


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
        mode: ``"safe"`` (default) or ``"toolbox"`` (:mod:`.sunseg_conventions`).
        averaging: ``"clip"`` (per-clip mean, then mean over clips; default for video) or
            ``"frame"`` (frame-pooled; the only choice for flat folders).
        drop_ends: exclude the first and last frame (natural stem order) of every clip, as the
            toolbox; default True in toolbox mode, False in safe mode; video only.
        on_missing: ground-truth frame without a prediction: ``"skip"`` (excluded, listed, warned),
            ``"empty"`` (scored as an all-zero map, listed, warned) or ``"error"``.
        rescale: per-frame min-max rescale of the maps; default True in toolbox mode, else False.

    Returns:
        JSON-ready dict: ``mode``, ``averaging`` (text), ``video``, ``num_clips`` (clips averaged),
        ``num_frames`` (frames scored), ``metrics`` (:data:`METRIC_KEYS`), ``per_clip``
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
    from ..data.io import load_mask

    check_mode(mode)
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

    # ---- which frames count (all problems collected before any scoring)
    pairing = pair_clips(pred_dir, gt_dir, video)
    plan: list[tuple[str, list[tuple[str, Path, Path | None]]]] = []
    missing, excluded = [], []
    for clip in pairing.clips:
        prefix = f"{clip.clip}/" if video else ""
        kept = clip.frames[1:-1] if drop_ends else clip.frames
        kept_stems = {stem for stem, _, _ in kept}
        excluded += [prefix + stem for stem, _, _ in clip.frames if stem not in kept_stems]
        items = []
        for stem, gt_path, pred_path in kept:
            if pred_path is None:
                missing.append(prefix + stem)
                if on_missing == "skip":
                    continue
            items.append((prefix + stem, gt_path, pred_path))
        plan.append((clip.clip, items))
    if missing and on_missing == "error":
        shown = ", ".join(missing[:_SHOW]) + (", ..." if len(missing) > _SHOW else "")
        raise FileNotFoundError(f"{len(missing)} ground-truth frames have no prediction in "
                                f"{pred_dir}: {shown}")
    _warn_list("ground-truth frames have no prediction", missing,
               "excluded from the averages" if on_missing == "skip"
               else "scored as empty (all-zero) predictions")
    _warn_list("predictions have no ground truth", pairing.orphan_predictions, "not scored")
    _warn_list("prediction clips have no ground-truth clip", pairing.orphan_clips, "not scored")
    if excluded:
        warnings.warn(
            f"{len(excluded)} end frames (first and last of each clip) excluded, as the SUN-SEG "
            f"toolbox does; listed in 'excluded_end_frames'", FramePairingWarning, stacklevel=2)

    # ---- scoring and averaging
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
                pred = load_prediction(pred_path)
                if pred.shape != gt.shape:
                    resized.append(name)
                    pred = resize_prediction(pred, gt.shape)
                if mode == "safe" and not scale and 0 < int(pred.max()) <= 1:
                    warnings.warn(
                        f"frame {name}: prediction {pred_path} holds only 0/1; expected a 0-255 "
                        f"map (thresholds t >= 2 see it as empty); save predictions x255",
                        FramePairingWarning, stacklevel=2)
            fs = score_frame(prepare_frame(pred, gt, mode, scale), name)
            acc.add(fs.s_alpha, fs.f_w_beta, fs.curves)
            pooled.add(fs.s_alpha, fs.f_w_beta, fs.curves)
            if fs.degenerate:
                degenerate.append({"frame": name, "ground_truth": fs.degenerate})
        if video:
            per_clip[clip] = {"num_frames": acc.n, "metrics": report(*acc.mean())}
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
        curves = {k: sum(m[2][k] for m in clip_means) / n for k in CURVES}
        metrics = report(s, fw, curves)
        label = "per-clip mean, then mean over clips"
    else:
        metrics = report(*pooled.mean())
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
        "orphan_predictions": pairing.orphan_predictions,
        "orphan_prediction_clips": pairing.orphan_clips,
        "excluded_end_frames": excluded,
        "empty_clips": empty_clips,
        "resized_predictions": resized,
        "degenerate_frames": degenerate,
        "conventions": conventions(mode, scale, drop_ends),
    }
