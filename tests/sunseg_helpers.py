"""Shared helpers of the SUN-SEG metric tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def square_gt(size: int = 100, lo: int = 40, hi: int = 60) -> np.ndarray:
    gt = np.zeros((size, size), dtype=np.uint8)
    gt[lo:hi, lo:hi] = 1
    return gt


def save_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)
