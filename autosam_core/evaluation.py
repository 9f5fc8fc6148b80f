"""Evaluation of AutoSAM: image-level Dice/IoU and boundary ratio on image/mask pairs (batched),
the server's central evaluation on benchmark splits (:class:`CentralEvaluator`), and
:func:`evaluate_refs` for the CLI. Never imports flwr.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .autosam import AutoSam
from .config import DataRef
from .data.cache import EmbeddingCache, mirror
from .data.dataset import Pair, resolve_data, resolve_pairs
from .data.io import image_size, load_image, load_mask
from .metrics import dice_iou


@dataclass
class ImageResult:
    """Per-image evaluation result (kept on the evaluating machine; never sent by a site)."""

    stem: str
    dice: float
    iou: float
    boundary_ratio: float | None = None  # predicted / ground-truth boundary length (None: empty GT)


@torch.no_grad()
def evaluate_pairs(model: AutoSam, pairs: Sequence[Pair], cache: EmbeddingCache | None = None,
                   surrogate: bool = False, progress: bool = False, desc: str = "eval",
                   batch_size: int = 8) -> dict:
    """Image-level Dice and IoU (paper section 4 'Evaluation Metrics'), averaged over images.

    Images are processed in batches of ``batch_size`` (one batched g and SAM-decoder call each);
    with ``model.tta`` "hflip" the mirrored images' embeddings are cached (or encoded) too; each
    prediction is postprocessed to its image's original size and thresholded at logits > 0,
    then compared with the full-resolution ground truth. ``model.refine`` applies. With a cache and a
    g that reads no image (``sam_head``) the image pixels are never decoded: the size comes from the
    file's header (:func:`autosam_core.data.io.image_size`).

    Returns:
        {"dice", "iou" (means in [0, 1]), "boundary_ratio" (mean predicted / ground-truth boundary
        length, :mod:`autosam_core.boundary`), "num_images", "seconds_per_image", "per_image": [ImageResult]}.
    """
    from .boundary import boundary_ratio
    from .precision import autocast
    from .sam import resized_shape

    t0 = time.perf_counter()
    needs_embeddings = not surrogate or not model.reads_images
    tta = not surrogate and model.tta == "hflip"
    if cache is not None and needs_embeddings:
        cache.ensure([p.image_path for p in pairs], load_image, progress=progress, desc=f"{desc}: SAM embeddings")
        if tta:
            cache.ensure([p.image_path for p in pairs], load_image, progress=progress,
                         desc=f"{desc}: SAM embeddings, mirrored", hflip=True)
    was_training = model.training
    model.eval()
    sam, results = model.sam, []
    bar = tqdm(total=len(pairs), desc=desc, leave=False, disable=not progress, unit="img")
    try:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            # pixels only where g reads the image or SAM must encode it; else the header's size will do
            images = ([load_image(p.image_path) for p in chunk] if model.reads_images or cache is None
                      else None)
            sizes = ([im.shape[:2] for im in images] if images is not None
                     else [image_size(p.image_path) for p in chunk])
            g_in = torch.stack([model.g_input(im) for im in images]) if model.reads_images else None
            emb = emb_m = g_in_m = None
            if needs_embeddings:
                emb = _embeddings(model, chunk, images, cache, hflip=False)
            if tta:
                emb_m = _embeddings(model, chunk, images, cache, hflip=True)
                g_in_m = torch.stack([model.g_input(mirror(im)) for im in images]) if model.reads_images else None
            valid = [resized_shape(size, sam.spec.low_res_size[0]) for size in sizes]
            with autocast(sam.device, sam.precision):
                low = (model.surrogate_logits(g_in, emb) if surrogate
                       else model.predict_low_res(emb, g_in, valid=valid, mirrored_embeddings=emb_m,
                                                  mirrored_g_inputs=g_in_m)).float().cpu()
            for i, (pair, size) in enumerate(zip(chunk, sizes)):
                input_size = resized_shape(size, sam.spec.input_size)
                logits = sam.postprocess(low[i:i + 1], input_size, size)[0, 0]
                pred, gt = (logits > 0).numpy(), load_mask(pair.mask_path) > 0
                d, j = dice_iou(pred, gt)
                results.append(ImageResult(pair.stem, d, j, boundary_ratio(pred, gt)))
            bar.update(len(chunk))
    finally:
        bar.close()
        model.train(was_training)
    n = len(results)
    ratios = [r.boundary_ratio for r in results if r.boundary_ratio is not None]
    return {"dice": float(np.mean([r.dice for r in results])) if n else float("nan"),
            "iou": float(np.mean([r.iou for r in results])) if n else float("nan"),
            "boundary_ratio": float(np.mean(ratios)) if ratios else float("nan"),
            "num_images": n, "seconds_per_image": (time.perf_counter() - t0) / max(n, 1), "per_image": results}


def _embeddings(model: AutoSam, chunk: Sequence[Pair], images: Sequence[np.ndarray] | None,
                cache: EmbeddingCache | None, hflip: bool) -> torch.Tensor:
    """SAM image_embeddings (B, 256, 64, 64) of a batch (mirrored left-right first when ``hflip``), from
    the cache when there is one (``images`` may then be None), else encoded now from ``images``; on
    SAM's device."""
    sam = model.sam
    if cache is not None:
        return torch.stack([cache.get(p.image_path, hflip=hflip) for p in chunk]).to(sam.device)
    return sam.encode(torch.stack([sam.preprocess(mirror(im) if hflip else im)[0] for im in images]))


def image_weighted_mean(results: Mapping[str, Mapping[str, float]], key: str = "dice") -> float:
    """Mean of ``results[split][key]`` weighted by each split's ``num_images`` (per-image mean over all the
    splits' images, as if they were one split); 0.0 when there is no image.

    Args:
        results: split name -> an :func:`evaluate_pairs` result (``key`` and ``num_images``).
        key: ``dice`` or ``iou`` (values in [0, 1]).
    """
    n = sum(r["num_images"] for r in results.values())
    return sum(r[key] * r["num_images"] for r in results.values()) / n if n else 0.0


class CentralEvaluator:
    """Server-side evaluation of the global model on public benchmark splits.

    Args:
        model: AutoSam holding the global trainable state (moved to ``device``).
        refs: benchmark splits (:class:`DataRef`).
        cache_dir: embedding cache root.
        device, precision: as in :mod:`autosam_core.precision` (``auto``: CUDA if present; bf16 where
            fast), so the server's cache keys match the sites' when both use ``auto``.
    """

    def __init__(self, model: AutoSam, refs: Sequence[DataRef], cache_dir: Path | None = None,
                 base_dir: Path | None = None, progress: bool = False, device: str = "auto",
                 precision: str = "auto"):
        from .precision import resolve_device, resolve_precision

        dev = resolve_device(device)
        model.sam.set_precision(resolve_precision(precision, dev))
        self.model, self.progress = model.to(dev), progress
        self.benchmarks = {r.label: resolve_pairs(r, base_dir) for r in refs}
        self.cache = EmbeddingCache(model.sam, cache_dir)

    def evaluate(self, per_image: bool = False) -> dict[str, dict]:
        """{label: {"dice", "iou", "num_images", "seconds_per_image"}} (plus "per_image" if asked)."""
        out = {}
        for label, pairs in self.benchmarks.items():
            r = evaluate_pairs(self.model, pairs, self.cache, progress=self.progress, desc=label)
            if not per_image:
                r.pop("per_image")
            out[label] = r
        return out


def evaluate_refs(model: AutoSam, refs: Sequence[DataRef], cache_dir: str | Path | None = None,
                  base: Path | None = None, surrogate: bool = False) -> dict[str, dict]:
    """:func:`evaluate_pairs` on each data reference (unreadable pairs are skipped and counted, never
    silently: ``skipped`` and ``skipped_reasons`` say how many and why).

    Returns:
        {label: {"dice", "iou", "boundary_ratio", "num_images", "seconds_per_image", "skipped",
        "skipped_reasons"}}.
    """
    cache = EmbeddingCache(model.sam, cache_dir)
    results = {}
    for ref in refs:
        report = resolve_data(ref, base, unreadable="skip")
        r = evaluate_pairs(model, report.pairs, cache, surrogate=surrogate, progress=True, desc=ref.label)
        r.pop("per_image")
        r["skipped"] = report.num_skipped
        r["skipped_reasons"] = report.summary() if report.num_skipped else ""
        results[ref.label] = r
    return results
