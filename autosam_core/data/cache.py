"""On-disk cache of the frozen SAM encoder's image_embeddings.

The frozen image encoder E_s is the dominant cost on a CPU (~2.4 s per image for LiteMedSAM on 2
cores) and its output never changes, so each (image content, backbone weights, preprocessing) is
encoded once and stored as float16 (256 x 64 x 64 x 2 bytes = 2 MiB per image), then reused across
epochs, runs and federated rounds. Keys hash the image file's bytes, so renaming or moving a file
keeps its entry. Writes are atomic (temporary file + ``os.replace``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..checkpoint import atomic_torch_save
from ..sam import FrozenSam

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``$AUTOSAM_CACHE`` or ``<repo>/.cache/embeddings``."""
    env = os.environ.get("AUTOSAM_CACHE")
    return Path(env) if env else Path(__file__).resolve().parents[2] / ".cache" / "embeddings"


def file_key(path: str | Path) -> str:
    """sha256 (first 20 hex digits) of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()[:20]


class EmbeddingCache:
    """image_embeddings of one frozen SAM, stored under ``<root>/<sam.cache_id>/<file_key>.pt``.

    Args:
        sam: the frozen SAM whose encoder fills the cache.
        root: cache directory (created on demand); defaults to :func:`default_cache_dir`.
    """

    def __init__(self, sam: FrozenSam, root: str | Path | None = None):
        self.sam = sam
        self.dir = Path(root or default_cache_dir()) / sam.cache_id
        self._keys: dict[str, str] = {}

    def key(self, image_path: str | Path) -> str:
        """Content key of an image file (memoised per path)."""
        p = str(image_path)
        if p not in self._keys:
            self._keys[p] = file_key(p)
        return self._keys[p]

    def path(self, image_path: str | Path) -> Path:
        """Where the embeddings of ``image_path`` are (or will be) stored."""
        return self.dir / f"{self.key(image_path)}.pt"

    def get(self, image_path: str | Path) -> torch.Tensor:
        """Cached image_embeddings float16 (256, 64, 64) of ``image_path``.

        Raises:
            KeyError: not cached yet (call :meth:`ensure` first).
        """
        p = self.path(image_path)
        if not p.is_file():
            raise KeyError(f"no cached image_embeddings for {image_path} (expected {p}); run `autosam embed`")
        return torch.load(p, map_location="cpu", weights_only=True)

    def ensure(self, image_paths: Sequence[str | Path], load_image: Callable[[Path], np.ndarray],
               batch_size: int = 4, desc: str = "SAM embeddings", progress: bool = True) -> dict[str, float]:
        """Encode every image not yet cached.

        Args:
            image_paths: image files.
            load_image: path -> uint8 RGB (H, W, 3).
            batch_size: images per encoder call.

        Returns:
            {"cached": n already present, "computed": n encoded now, "seconds": wall time (s)}.
        """
        t0 = time.perf_counter()
        todo = [Path(p) for p in dict.fromkeys(map(str, image_paths)) if not self.path(p).is_file()]
        cached = len(set(map(str, image_paths))) - len(todo)
        if todo:
            self.dir.mkdir(parents=True, exist_ok=True)
            log.info("encoding %d images with frozen %s (%d already cached)", len(todo), self.sam.spec.kind, cached)
        bar = tqdm(total=len(todo), desc=desc, unit="img", disable=not progress or not todo, leave=False)
        for i in range(0, len(todo), batch_size):
            chunk = todo[i:i + batch_size]
            x = torch.stack([self.sam.preprocess(load_image(p))[0] for p in chunk])
            emb = self.sam.encode(x).to(torch.float16)
            for p, e in zip(chunk, emb):
                atomic_torch_save(e.clone(), self.path(p))
            bar.update(len(chunk))
        bar.close()
        return {"cached": cached, "computed": len(todo), "seconds": time.perf_counter() - t0}
