"""The torch Dataset of AutoSAM samples (cached image_embeddings or SAM input, g input, low-res target)
and its DataLoader. Pairing files is :mod:`autosam_core.data.dataset`'s job.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .cache import EmbeddingCache, mirror
from .dataset import Pair
from .io import load_image, load_mask
from .transforms import build_augmentation

if TYPE_CHECKING:
    from ..autosam import AutoSam


class AutoSamDataset(Dataset):
    """Training/evaluation samples for AutoSAM.

    Items are dicts with ``g_input`` float32 (3, G, G) (absent when g reads no image), ``target`` float32 (1, 256, 256) in {0, 1}
    (low-res frame, padding = 0), ``valid`` int64 (2,) = (h, w) of the content region in that frame,
    and either ``image_embeddings`` float16 (256, 64, 64) from the cache or ``sam_input`` float32
    (3, S, S) to be encoded by the caller (uncached, paper-exact path).

    With a cache only photometric augmentation is applied (to g's input): the cached embeddings
    were computed from the unaugmented image, so the geometry must not change. Without a cache the
    full preset is applied to image and mask before both SAM and g see them. ``seed`` seeds the
    augmentation's own random streams (see :meth:`reseed`).

    ``hflip_p`` > 0 (needs a cache): geometric augmentation that the cache allows. Each access serves
    the sample mirrored left-right with probability ``hflip_p``: the cached image_embeddings of the
    mirrored image (``EmbeddingCache.ensure(..., hflip=True)`` fills them), the mirrored mask and,
    when g reads images, the mirrored image.

    Raises:
        ValueError: ``hflip_p`` outside [0, 1], or > 0 without a cache.
    """

    def __init__(self, model: AutoSam, pairs: Sequence[Pair], augmentation: str = "none",
                 cache: EmbeddingCache | None = None, seed: int = 0, hflip_p: float = 0.0):
        if not 0.0 <= hflip_p <= 1.0:
            raise ValueError(f"hflip_p must be in [0, 1], found {hflip_p!r}")
        if hflip_p > 0 and cache is None:
            raise ValueError("hflip_p > 0 serves cached embeddings of mirrored images: it needs a cache "
                             "(without one, use an augmentation preset with flips)")
        self.model = model
        self.pairs = list(pairs)
        self.cache = cache
        self.hflip_p = float(hflip_p)
        self.augment = build_augmentation(augmentation, photometric_only=cache is not None, seed=seed)
        self._flips = np.random.default_rng(seed)

    def reseed(self, seed: int) -> None:
        """Restart the augmentation's own random streams (albumentations and the mirror draws do not
        use torch's RNG)."""
        if self.augment is not None:
            self.augment.set_random_seed(int(seed))
        self._flips = np.random.default_rng(int(seed))

    def fill_cache(self, progress: bool = True, desc: str = "SAM embeddings") -> None:
        """Encode what this dataset will read and is not cached yet: every pair's image_embeddings
        and, with ``hflip_p`` > 0, those of the mirrored images (see :meth:`EmbeddingCache.ensure`).

        Raises:
            ValueError: no cache (``cache=None``).
        """
        if self.cache is None:
            raise ValueError("fill_cache needs a dataset built with an EmbeddingCache")
        paths = [p.image_path for p in self.pairs]
        self.cache.ensure(paths, load_image, progress=progress, desc=desc)
        if self.hflip_p > 0:
            self.cache.ensure(paths, load_image, progress=progress, desc=f"{desc}, mirrored", hflip=True)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        pair = self.pairs[i]
        mask = load_mask(pair.mask_path)
        flip = self.hflip_p > 0 and bool(self._flips.random() < self.hflip_p)
        if flip:
            mask = mirror(mask)
        out: dict = {}
        if self.cache is not None and not self.model.reads_images:
            # g reads only the cached SAM embeddings: the image itself is never decoded.
            out["image_embeddings"] = self.cache.get(pair.image_path, hflip=flip)
            target, (h, w) = self.model.low_res_target(mask)
            out.update(target=target, valid=torch.tensor([h, w]))
            return out
        image = load_image(pair.image_path)
        if flip:
            image = mirror(image)
        if self.cache is not None:
            out["image_embeddings"] = self.cache.get(pair.image_path, hflip=flip)
            if self.augment is not None:
                image = self.augment(image=image)["image"]
        else:
            if self.augment is not None:
                r = self.augment(image=image, mask=mask)
                image, mask = r["image"], r["mask"]
            out["sam_input"] = self.model.sam.preprocess(image)[0]
        target, (h, w) = self.model.low_res_target(mask)
        out.update(g_input=self.model.g_input(image), target=target, valid=torch.tensor([h, w]))
        return out


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """A CPU DataLoader (main process; workers would duplicate SAM-sized memory)."""
    g = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=g, num_workers=0)
