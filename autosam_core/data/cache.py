"""On-disk cache of the frozen SAM encoder's image_embeddings.

The frozen image encoder E_s is the dominant cost on a CPU (~2.4 s per image for LiteMedSAM on 2
cores) and its output never changes, so each (image content, backbone weights, preprocessing) is
encoded once and stored as float16 (256 x 64 x 64 x 2 bytes = 2 MiB per image), then reused across
epochs, runs and federated rounds. Keys hash the image file's bytes, so renaming or moving a file
keeps its entry, and a file edited in place gets a new key (the hash is memoised per
(path, size, mtime_ns, ctime_ns), so an edit between rounds of a long-lived process is seen).
Writes are atomic (:func:`autosam_core.checkpoint.atomic_torch_save`); nothing of the wrong shape or
dtype is ever stored, and an entry read back with the wrong shape or dtype, or unreadable, is
recomputed with a warning.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..checkpoint import atomic_torch_save
from ..files import file_sha256
from ..sam import FrozenSam
from .dataset import default_cache_dir  # noqa: F401  (torch-free, so the coordinator can use it; re-exported)

log = logging.getLogger(__name__)


def file_key(path: str | Path) -> str:
    """Cache key of an image file: the first 20 hex digits of the sha256 of its bytes."""
    return file_sha256(path)[:20]


def mirror(array: np.ndarray) -> np.ndarray:
    """``array`` (H, W[, C]) mirrored left-right (columns reversed), contiguous, same dtype."""
    return np.ascontiguousarray(array[:, ::-1])


class CacheEntryWarning(UserWarning):
    """A cached image_embeddings file was unreadable or of the wrong shape/dtype and is recomputed."""


class EmbeddingCache:
    """image_embeddings of one frozen SAM, stored under ``<root>/<sam.cache_id>/<file_key>.pt``.

    Args:
        sam: the frozen SAM whose encoder fills the cache.
        root: cache directory (created on demand); defaults to :func:`default_cache_dir`.
        load_image: path -> uint8 RGB (H, W, 3), used to recompute a poisoned entry on read
            (default :func:`autosam_core.data.io.load_image`).
    """

    def __init__(self, sam: FrozenSam, root: str | Path | None = None,
                 load_image: Callable[[Path], np.ndarray] | None = None):
        self.sam = sam
        self.dir = Path(root or default_cache_dir()) / sam.cache_id
        self._keys: dict[tuple[str, int, int, int], str] = {}
        self._load_image = load_image

    @property
    def entry_shape(self) -> tuple[int, int, int]:
        """Shape of one stored entry: (256, 64, 64) (the SAM's embed_dim and embedding_size)."""
        return (self.sam.spec.embed_dim, *self.sam.spec.embedding_size)

    def key(self, image_path: str | Path) -> str:
        """Content key of an image file: sha256 of its bytes, memoised per (path, size, mtime_ns, ctime_ns).

        Raises:
            FileNotFoundError: the image does not exist.
        """
        p = str(image_path)
        st = os.stat(p)
        memo = (p, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if memo not in self._keys:
            self._keys[memo] = file_key(p)
        return self._keys[memo]

    def path(self, image_path: str | Path, hflip: bool = False) -> Path:
        """Where the embeddings of ``image_path`` (mirrored left-right first when ``hflip``) are stored."""
        return self.dir / f"{self.key(image_path)}{'-hflip' if hflip else ''}.pt"

    def _problem(self, entry: object) -> str | None:
        """None if ``entry`` is a float16 tensor of :attr:`entry_shape`, else what it is."""
        if not isinstance(entry, torch.Tensor):
            return f"a {type(entry).__name__}, not a tensor"
        if tuple(entry.shape) != self.entry_shape or entry.dtype != torch.float16:
            return f"{entry.dtype} of shape {tuple(entry.shape)}"
        return None

    def get(self, image_path: str | Path, hflip: bool = False) -> torch.Tensor:
        """Cached image_embeddings float16 (256, 64, 64) of ``image_path`` (of its left-right mirror
        image when ``hflip``: the encoder's output for the flipped pixels, not a flipped tensor).

        An entry that cannot be read, or holds anything but a float16 (256, 64, 64) tensor, is
        deleted and recomputed with a :class:`CacheEntryWarning`.

        Raises:
            KeyError: not cached yet (call :meth:`ensure` first).
        """
        p = self.path(image_path, hflip)
        if not p.is_file():
            raise KeyError(f"no cached image_embeddings for {image_path}{' (mirrored)' if hflip else ''} "
                           f"(expected {p}); run `autosam embed`")
        try:
            entry = torch.load(p, map_location="cpu", weights_only=True)
            problem = self._problem(entry)
        except Exception as err:  # a truncated or foreign file: torch raises many types
            problem = f"unreadable ({type(err).__name__})"
        if problem is None:
            return entry
        warnings.warn(f"embedding cache entry {p} for {image_path} is {problem}, expected float16 "
                      f"{self.entry_shape}; recomputing it", CacheEntryWarning, stacklevel=2)
        p.unlink(missing_ok=True)
        if self._load_image is None:
            from .io import load_image

            self._load_image = load_image
        self.ensure([image_path], self._load_image, progress=False, hflip=hflip)
        return torch.load(p, map_location="cpu", weights_only=True)

    def ensure(self, image_paths: Sequence[str | Path], load_image: Callable[[Path], np.ndarray],
               batch_size: int = 4, desc: str = "SAM embeddings", progress: bool = True,
               hflip: bool = False) -> dict[str, float]:
        """Encode every image not yet cached.

        Args:
            image_paths: image files.
            load_image: path -> uint8 RGB (H, W, 3).
            batch_size: images per encoder call.
            hflip: encode each image mirrored left-right (``image[:, ::-1]``) into its ``-hflip`` entry,
                for geometric augmentation with a cache (:class:`~autosam_core.data.torch_dataset.AutoSamDataset`).

        Returns:
            {"cached": n already present, "computed": n encoded now, "seconds": wall time (s)}.

        Raises:
            ValueError: the encoder returned something other than (B, 256, 64, 64) (nothing is stored).
        """
        t0 = time.perf_counter()
        todo = [Path(p) for p in dict.fromkeys(map(str, image_paths)) if not self.path(p, hflip).is_file()]
        cached = len(set(map(str, image_paths))) - len(todo)
        if todo:
            self.dir.mkdir(parents=True, exist_ok=True)
            log.info("encoding %d %simages with frozen %s (%d already cached)", len(todo), "mirrored " if hflip else "",
                     self.sam.spec.kind, cached)
        bar = tqdm(total=len(todo), desc=desc, unit="img", disable=not progress or not todo, leave=False)
        for i in range(0, len(todo), batch_size):
            chunk = todo[i:i + batch_size]
            x = torch.stack([self.sam.preprocess(mirror(load_image(p)) if hflip else load_image(p))[0] for p in chunk])
            emb = self.sam.encode(x)
            self.sam.check_embeddings(emb, len(chunk), "EmbeddingCache.ensure")
            for p, e in zip(chunk, emb.to(torch.float16)):
                problem = self._problem(e)
                if problem is not None:  # never store a tensor of the wrong shape or dtype
                    raise ValueError(f"refusing to cache image_embeddings of {p}: {problem}, expected float16 "
                                     f"{self.entry_shape}")
                atomic_torch_save(e.clone(), self.path(p, hflip))
            bar.update(len(chunk))
        bar.close()
        return {"cached": cached, "computed": len(todo), "seconds": time.perf_counter() - t0}
