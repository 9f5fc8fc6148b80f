"""Pairing prediction files with ground-truth files for the SUN-SEG metrics, and reading them.

Layout (SUN-SEG, Ji et al. 2022): ``<root>/<clip>/<frame>.<png|jpg|...>`` for predictions and ground
truth alike (``video=True``), or two flat folders of frames. Frames are paired by clip name and file
stem, never by sorted position; stems are ordered naturally ("9" < "10"). Pairing problems are
collected, never silently dropped: :class:`ClipPairing` lists them and the caller warns.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FRAME_SUFFIXES", "FramePairingWarning", "ClipFrames", "ClipPairing", "natural_key",
           "list_frames", "pair_clips", "load_prediction", "resize_prediction"]

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class FramePairingWarning(UserWarning):
    """Frames or clips that could not be paired, were excluded, or were resized (all listed)."""


def natural_key(stem: str) -> list[tuple[int, Any]]:
    """Sort key ordering digit runs by value: ``"9" < "10" < "a2" < "a10"``."""
    return [(0, int(t)) if t.isdigit() else (1, t) for t in re.split(r"(\d+)", stem)]


def list_frames(folder: Path) -> dict[str, Path]:
    """``{stem: path}`` of the frame files in ``folder`` (hidden files and other suffixes ignored).

    Raises:
        ValueError: two frame files share a stem (e.g. ``1.png`` and ``1.jpg``), naming both.
    """
    frames: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        if path.suffix.lower() not in FRAME_SUFFIXES:
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


@dataclass
class ClipFrames:
    """One clip's ground-truth frames in natural stem order, each with its prediction or None.

    Attributes:
        clip: clip name ("" for flat folders).
        frames: ``[(stem, gt_path, pred_path | None)]``.
    """

    clip: str
    frames: list[tuple[str, Path, Path | None]]


@dataclass
class ClipPairing:
    """Result of :func:`pair_clips`.

    Attributes:
        clips: ground-truth clips in natural order.
        orphan_predictions: ``clip/stem`` (or ``stem``) of predictions without ground truth.
        orphan_clips: prediction clip folders without a ground-truth clip.
    """

    clips: list[ClipFrames]
    orphan_predictions: list[str] = field(default_factory=list)
    orphan_clips: list[str] = field(default_factory=list)


def pair_clips(pred_dir: Path, gt_dir: Path, video: bool) -> ClipPairing:
    """Pair prediction and ground-truth frames by clip and stem.

    Args:
        pred_dir, gt_dir: existing folders.
        video: clip layout (sub-folders of ``gt_dir`` are the clips) or flat folders.

    Returns:
        :class:`ClipPairing`; a clip whose prediction folder is missing has every prediction None.

    Raises:
        ValueError: ``video=True`` and ``gt_dir`` has no clip sub-folder; duplicate stems.
    """
    if video:
        gt_clips = _subdirs(gt_dir)
        if not gt_clips:
            raise ValueError(
                f"{gt_dir}: no clip sub-folders; expected GT/<clip>/<frame>.png "
                f"(use video=False / no --video for flat folders)"
            )
        pred_clips = _subdirs(pred_dir)
        folders = [(c, gt_clips[c], pred_clips.get(c)) for c in sorted(gt_clips, key=natural_key)]
        orphan_clips = sorted(set(pred_clips) - set(gt_clips), key=natural_key)
    else:
        folders = [("", gt_dir, pred_dir)]
        orphan_clips = []
    clips, orphans = [], []
    for clip, gdir, pdir in folders:
        gt_frames = list_frames(gdir)
        pred_frames = list_frames(pdir) if pdir is not None else {}
        prefix = f"{clip}/" if video else ""
        stems = sorted(gt_frames, key=natural_key)
        clips.append(ClipFrames(clip, [(s, gt_frames[s], pred_frames.get(s)) for s in stems]))
        orphans += [prefix + s for s in sorted(set(pred_frames) - set(gt_frames), key=natural_key)]
    return ClipPairing(clips=clips, orphan_predictions=orphans, orphan_clips=orphan_clips)


def load_prediction(path: Path) -> np.ndarray:
    """Prediction file as uint8 (H, W) 0..255 (colour maps: ITU-R 601 luma, as cv2 grayscale).

    Raises:
        ValueError / FileNotFoundError: unreadable file (from :func:`autosam_core.data.io.load_image`).
    """
    from ..data.io import load_image

    rgb = load_image(path)
    if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all():
        return np.ascontiguousarray(rgb[..., 0])
    luma = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    return np.clip(np.rint(luma), 0, 255).astype(np.uint8)


def resize_prediction(pred: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a uint8 (h, w) map to ``shape`` (H, W) (cv2.resize, as the toolbox)."""
    import cv2

    return cv2.resize(pred, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
