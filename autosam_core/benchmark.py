"""``autosam benchmark``: the paper's Tables 1-2 rows, measured on our splits, beside the published ones.

Rows (paper Tables 1-2, section 4):

* ``autosam``: SAM(g(I)), the AutoSAM output.
* ``surrogate``: h(g(I)), the surrogate decoder.
* ``sam_point``: frozen SAM with one ground-truth point, the interior point farthest from the mask
  boundary (maximum of the Euclidean distance transform).
* ``sam_box``: frozen SAM with the ground-truth bounding box.
* ``sam_gt_mask``: frozen SAM with the ground-truth mask as its mask prompt (as low-res logits +-10).
* ``sam_autosam_mask``: frozen SAM with AutoSAM's low-res logits as its mask prompt.

Image-level Dice/IoU as everywhere else: per image at the original size, logits > 0, averaged over
images. Images whose ground truth is empty have no point or box: those prompts are skipped and the
prediction is empty (Dice 1 if nothing is predicted, by the metric's convention); the count is reported.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from .autosam import AutoSam
from .config import DataRef
from .data.cache import EmbeddingCache, mirror
from .data.io import load_image, load_mask
from .boundary import boundary_ratio
from .metrics import dice_iou
from .precision import autocast
from .sam import resized_shape

log = logging.getLogger(__name__)

METHODS = {
    "autosam": "AutoSAM: SAM(g(I))",
    "surrogate": "surrogate decoder h(g(I))",
    "sam_point": "SAM w/ GT point prompt",
    "sam_box": "SAM w/ GT box prompt",
    "sam_gt_mask": "SAM w/ GT mask as prompt",
    "sam_autosam_mask": "SAM w/ AutoSAM output as the mask prompt",
}

# Published numbers (Dice, IoU in %), AutoSAM paper Tables 1-2; SAM ViT-H at 1024x1024.
PAPER = {
    "Kvasir": {"autosam": (91.0, 87.0), "surrogate": (86.5, 79.6)},
    "ClinicDB": {"autosam": (92.8, 89.3), "surrogate": (88.5, 82.0)},
    "ColonDB": {"autosam": (83.0, 76.7), "surrogate": (80.7, 72.4)},
    "ETIS": {"autosam": (79.7, 74.0), "surrogate": (71.5, 63.0)},
    "GlaS": {"autosam": (92.82, 87.08), "surrogate": (91.51, 84.80), "sam_point": (61.67, 46.40),
             "sam_gt_mask": (58.46, 42.81), "sam_autosam_mask": (87.71, 79.92)},
    "MoNuSeg": {"autosam": (82.43, 70.17), "surrogate": (76.75, 62.32), "sam_point": (29.65, 17.52),
                "sam_gt_mask": (30.24, 18.21), "sam_autosam_mask": (58.10, 41.26)},
}
PAPER_BACKBONE = "SAM ViT-H, 1024x1024 input, 200 epochs (paper section 4)"


def farthest_interior_point(mask: np.ndarray) -> tuple[int, int] | None:
    """(row, col) of the foreground pixel farthest from the mask boundary, or None for an empty mask.

    Uses the Euclidean distance transform (scipy.ndimage.distance_transform_edt) of the padded mask,
    so the image border counts as boundary.
    """
    from scipy.ndimage import distance_transform_edt

    if not mask.any():
        return None
    dist = distance_transform_edt(np.pad(mask > 0, 1))[1:-1, 1:-1]
    r, c = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return int(r), int(c)


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) in pixels of the foreground's bounding box, or None for an empty mask."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    return int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max())


@torch.no_grad()
def benchmark_image(model: AutoSam, image: np.ndarray, mask: np.ndarray, image_embeddings: torch.Tensor,
                    methods: list[str], mirrored_embeddings: torch.Tensor | None = None
                    ) -> dict[str, tuple[float, float, float, np.ndarray]]:
    """Run every method on one image.

    Args:
        image: uint8 (H, W, 3); mask: (H, W) {0, 1}; image_embeddings: (256, 64, 64).
        mirrored_embeddings: (256, 64, 64) of the image mirrored left-right; needed when ``model.tta``
            is "hflip", which the ``autosam`` row (and ``sam_autosam_mask``, which reads its mask) then
            uses exactly as :meth:`AutoSam.predict_low_res` does; the other rows never mirror.

    Returns:
        {method: (dice, iou, seconds, predicted mask bool (H, W), boundary ratio or None)}; methods
        that cannot run on this image (no h, empty GT for point/box) are absent.
    """
    sam = model.sam
    H, W = mask.shape
    input_size = resized_shape((H, W), sam.spec.input_size)
    sx, sy = input_size[1] / W, input_size[0] / H
    emb = image_embeddings.reshape(1, *image_embeddings.shape[-3:]).float()
    g_in = model.g_input(image)[None] if model.reads_images else None
    out = {}

    def finish(name, low, t0):
        pred = (sam.postprocess(low.float().cpu(), input_size, (H, W))[0, 0] > 0).numpy()
        d, j = dice_iou(pred, mask > 0)
        out[name] = (d, j, time.perf_counter() - t0, pred, boundary_ratio(pred, mask > 0))

    t0 = time.perf_counter()
    emb = emb.to(sam.device)
    with autocast(sam.device, sam.precision):
        dense = model.dense_prompt(emb, g_in)  # g(I) once, shared by SAM(g(I)) and h(g(I))
    t_g = time.perf_counter() - t0
    emb_m = g_m = None
    if model.tta == "hflip":
        if mirrored_embeddings is None:
            raise ValueError("benchmark_image: the model's tta is 'hflip' but no mirrored_embeddings were given")
        emb_m = mirrored_embeddings.reshape(1, *mirrored_embeddings.shape[-3:]).float().to(sam.device)
        g_m = model.g_input(mirror(image))[None] if model.reads_images else None
    with autocast(sam.device, sam.precision):  # the model's own inference (tta, refinement), reusing g(I)
        auto_low = model.predict_low_res(emb, g_in, valid=[resized_shape((H, W), sam.spec.low_res_size[0])],
                                         mirrored_embeddings=emb_m, mirrored_g_inputs=g_m,
                                         dense_prompt_embeddings=dense)
    if "autosam" in methods:
        finish("autosam", auto_low, t0)
    if "surrogate" in methods and model.surrogate_decoder is not None:
        t0 = time.perf_counter() - t_g  # charge h for g's forward too
        finish("surrogate", model.surrogate_decoder(dense.float()), t0)
    point, box = farthest_interior_point(mask), bounding_box(mask)
    if "sam_point" in methods and point is not None:
        t0 = time.perf_counter()
        coords = torch.tensor([[[point[1] * sx, point[0] * sy]]], dtype=torch.float32)
        finish("sam_point", sam.prompt_decode(emb, points=(coords, torch.ones(1, 1, dtype=torch.int64))), t0)
    if "sam_box" in methods and box is not None:
        t0 = time.perf_counter()
        b = torch.tensor([[box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy]], dtype=torch.float32)
        finish("sam_box", sam.prompt_decode(emb, boxes=b), t0)
    if "sam_gt_mask" in methods:
        t0 = time.perf_counter()
        target, _ = model.low_res_target(mask)
        finish("sam_gt_mask", sam.prompt_decode(emb, mask_logits=(target[None] - 0.5) * 20), t0)
    if "sam_autosam_mask" in methods:
        t0 = time.perf_counter()
        finish("sam_autosam_mask", sam.prompt_decode(emb, mask_logits=auto_low), t0)
    return out


def run_benchmark(model: AutoSam, refs: list[DataRef], out_dir: str | Path, methods: list[str] | None = None,
                  cache_dir: str | Path | None = None, base_dir: Path | None = None, meta: dict | None = None,
                  examples: int = 4, progress: bool = True) -> dict:
    """Evaluate every method on every benchmark split; write BENCHMARK.md, benchmark.json and plots.

    Returns:
        the JSON-able results: {"datasets": {label: {"num_images", "input_sizes", "methods":
        {method: {"dice", "iou", "seconds_per_image", "num_images"}}}}, "meta": ...}.
    """
    from tqdm import tqdm

    from .data.dataset import resolve_pairs

    methods = methods or list(METHODS)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = EmbeddingCache(model.sam, cache_dir)
    model.eval()
    results: dict = {"meta": dict(meta or {}), "datasets": {}}
    t_all = time.perf_counter()
    for ref in refs:
        pairs = resolve_pairs(ref, base_dir)
        cache.ensure([p.image_path for p in pairs], load_image, progress=progress, desc=f"{ref.label}: SAM embeddings")
        if model.tta == "hflip":
            cache.ensure([p.image_path for p in pairs], load_image, progress=progress,
                         desc=f"{ref.label}: SAM embeddings, mirrored", hflip=True)
        per = defaultdict(list)
        sizes, skipped_empty, shown = set(), 0, []
        for k, pair in enumerate(tqdm(pairs, desc=f"benchmark {ref.label}", disable=not progress, leave=False)):
            image, mask = load_image(pair.image_path), load_mask(pair.mask_path)
            sizes.add(f"{image.shape[1]}x{image.shape[0]}")
            skipped_empty += int(not mask.any())
            r = benchmark_image(model, image, mask, cache.get(pair.image_path), methods,
                                mirrored_embeddings=cache.get(pair.image_path, hflip=True) if model.tta == "hflip" else None)
            for name, (d, j, s, _, br) in r.items():
                per[name].append((d, j, s, br))
            if k < examples:
                shown.append((pair.stem, image, mask, {n: v[3] for n, v in r.items()}))
        ds = {"num_images": len(pairs), "input_sizes": sorted(sizes), "empty_ground_truth": skipped_empty,
              "methods": {}}
        for name in methods:
            vals = per.get(name, [])
            ds["methods"][name] = {
                "dice": float(np.mean([v[0] for v in vals])) if vals else None,
                "iou": float(np.mean([v[1] for v in vals])) if vals else None,
                "seconds_per_image": float(np.mean([v[2] for v in vals])) if vals else None,
                "boundary_ratio": (float(np.mean([v[3] for v in vals if v[3] is not None]))
                                   if any(v[3] is not None for v in vals) else None),
                "num_images": len(vals)}
        results["datasets"][ref.label] = ds
        _plot_examples(ref.label, shown, out_dir / f"examples_{_slug(ref.label)}.png")
    results["seconds"] = time.perf_counter() - t_all
    _plot_bars(results, out_dir / "dice_by_method.png")
    (out_dir / "benchmark.json").write_text(json.dumps(results, indent=2))
    (out_dir / "BENCHMARK.md").write_text(format_markdown(results))
    return results


def _slug(s: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in s)


def _paper_key(label: str) -> str | None:
    low = label.lower()
    for key in PAPER:
        if key.lower() in low:
            return key
    return None


def format_markdown(results: dict) -> str:
    """BENCHMARK.md text: one table per dataset, ours beside the paper's, plus the setup."""
    meta = results.get("meta", {})
    lines = ["# AutoSAM-FL benchmark", "",
             f"Ours: SAM `{meta.get('sam_kind', '?')}`, g `{meta.get('preset') or meta.get('backbone', '?')}`"
             f"{' (refine: ' + meta['refine'] + ')' if meta.get('refine', 'none') != 'none' else ''}"
             f"{' (tta: ' + meta['tta'] + ')' if meta.get('tta', 'none') != 'none' else ''}, "
             f"checkpoint `{meta.get('checkpoint', '?')}`. {meta.get('training', '')}".strip(),
             f"Paper: {PAPER_BACKBONE}. Paper numbers are the published ones, not re-measured.", "",
             "Dice and IoU in %, per image at the original size (logits > 0), averaged over images.",
             "Boundary ratio: mean over images of the predicted mask's boundary length (perimeter pixels)",
             "divided by the ground truth's (about 1 = as smooth as the annotation; speckle gives >> 1).", ""]
    if meta.get("sam_kind") == "lite_medsam":
        lines += ["Note: LiteMedSAM (MedSAM-Lite) was trained with box prompts only. Its point and mask prompt",
                  "pathways are effectively untrained (measured: a ground-truth mask prompt gives all-negative",
                  "logits, -25 to -13), so the point and mask-prompt rows are near 0 here; they are meaningful",
                  "with a segment-anything ViT checkpoint (`sam.kind: vit_h`).", ""]
    for label, ds in results["datasets"].items():
        paper = PAPER.get(_paper_key(label) or "", {})
        lines += [f"## {label}", "",
                  f"{ds['num_images']} images; sizes (WxH): {', '.join(ds['input_sizes'][:6])}"
                  f"{' ...' if len(ds['input_sizes']) > 6 else ''}; empty ground truth: {ds['empty_ground_truth']}",
                  "", "| method | Dice (ours) | IoU (ours) | boundary ratio | s/image | Dice (paper) | IoU (paper) |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for name, title in METHODS.items():
            m = ds["methods"].get(name)
            if m is None:
                continue
            br = m.get("boundary_ratio")
            ours = (f"{100 * m['dice']:.1f} | {100 * m['iou']:.1f} | {'-' if br is None else f'{br:.2f}'} | "
                    f"{m['seconds_per_image']:.3f}" if m["dice"] is not None else "n/a | n/a | n/a | n/a")
            p = paper.get(name)
            pub = f"{p[0]:.1f} | {p[1]:.1f}" if p else "- | -"
            lines.append(f"| {title} | {ours} | {pub} |")
        lines.append("")
    lines.append(f"Total benchmark time: {results.get('seconds', 0):.0f} s.")
    return "\n".join(lines) + "\n"


def _plot_examples(label: str, shown: list, path: Path) -> None:
    if not shown:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [("image", None), ("ground truth", "gt"), ("AutoSAM", "autosam"), ("h(g(I))", "surrogate"),
            ("SAM + GT box", "sam_box")]
    fig, axes = plt.subplots(len(shown), len(cols), figsize=(2.4 * len(cols), 2.2 * len(shown)), squeeze=False)
    for r, (stem, image, mask, preds) in enumerate(shown):
        for c, (title, key) in enumerate(cols):
            ax = axes[r, c]
            ax.axis("off")
            if key is None:
                ax.imshow(image)
                ax.set_title(stem[:18], fontsize=7)
            elif key == "gt":
                ax.imshow(mask, cmap="gray", interpolation="nearest")
            elif key in preds:
                ax.imshow(preds[key], cmap="gray", interpolation="nearest")
            else:
                ax.text(0.5, 0.5, "n/a", ha="center", va="center")
            if r == 0 and key is not None:
                ax.set_title(title, fontsize=9)
    fig.suptitle(label)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_bars(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results["datasets"])
    names = [n for n in METHODS if any(results["datasets"][d]["methods"].get(n, {}).get("dice") is not None
                                       for d in labels)]
    if not labels or not names:
        return
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(labels), 3.8))
    for i, n in enumerate(names):
        vals = [100 * (results["datasets"][d]["methods"].get(n, {}).get("dice") or 0) for d in labels]
        ax.bar(np.arange(len(labels)) + i * width, vals, width, label=METHODS[n])
    ax.set_xticks(np.arange(len(labels)) + width * (len(names) - 1) / 2, labels, fontsize=8)
    ax.set_ylabel("Dice (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
