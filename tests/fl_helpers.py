"""Helpers for the federation tests: synthetic datasets and federation/site YAMLs (tiny SAM, small g)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from PIL import Image

#: The shipped recipe's g (narrow) with one refinement box per image: the random tiny SAM's first masks are
#: speckled, and up to 8 boxes each made every central evaluation of 4 images cost 0.7 s instead of ~0.1 s.
TINY_MODEL = {"preset": "sam_head", "head_channels": 16, "refine_max_boxes": 1}
# A DP federation needs HarDNet's g (timm backbones use BatchNormAct2d, which the GroupNorm conversion refuses).
DP_MODEL = {"backbone": "hardnet68", "g_input_size": 64}


def make_dataset(root: Path, n: int, seed: int, size: int = 64) -> Path:
    """``root/images/*.png`` + ``root/masks/*.png`` (0/255): noisy images with a bright square."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = rng.integers(0, 120, (size, size, 3), dtype=np.uint8)
        m = np.zeros((size, size), np.uint8)
        y, x = rng.integers(4, size // 2, 2)
        h = int(rng.integers(size // 6, size // 3))
        m[y:y + h, x:x + h] = 255
        img[m > 0] = np.clip(img[m > 0].astype(int) + 120, 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / "images" / f"s{seed}_{i:03d}.png")
        Image.fromarray(m).save(root / "masks" / f"s{seed}_{i:03d}.png")
    return root


def write_yaml(path: Path, data: dict) -> Path:
    """Write ``data`` as YAML (parents created); returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def make_federation(tmp: Path, *, sites: dict[str, int], rounds: int = 2, min_sites: int = 2,
                    val_fraction: float = 0.0, central_validation: bool = True, bench_images: int = 2,
                    round_timeout: float = 120.0, resume: bool = False, name: str = "fedtest",
                    model: dict | None = None, output_dir: Path | None = None, client_cpus: float = 1.0,
                    site_options: dict[str, dict] | None = None, fed_options: dict | None = None) -> Path:
    """Write synthetic data, one site YAML per entry of ``sites`` (site id -> images) and a federation YAML.

    ``site_options``: site id -> extra site YAML keys (e.g. ``privacy``, ``audit``); ``fed_options``:
    extra federation YAML keys (e.g. ``transfer_dtype``).
    """
    data = tmp / "data"
    site_files = []
    for i, (site_id, n) in enumerate(sites.items()):
        ds = data / f"ds_{site_id}"
        if not (ds / "images").is_dir():
            make_dataset(ds, n, seed=10 + i)
        site_files.append(write_yaml(tmp / "sites" / f"{site_id}.yaml", {
            "site_id": site_id, "data": {"dataset": str(ds)}, "local_epochs": 1, "batch_size": 2,
            "augmentation": "none", "val_fraction": val_fraction, **(site_options or {}).get(site_id, {})}).name)
    if not (data / "bench" / "images").is_dir():
        make_dataset(data / "bench", bench_images, seed=99)
    if not (data / "val" / "images").is_dir():
        make_dataset(data / "val", 2, seed=98)
    fed = {
        "name": name, "sam": {"kind": "tiny"}, "model": model or TINY_MODEL, "rounds": rounds,
        "min_sites": min_sites, "round_timeout": round_timeout, "sites": [f"sites/{f}" for f in site_files],
        "evaluate": [{"dataset": str(data / "bench"), "name": "bench"}],
        "validation": [{"dataset": str(data / "val"), "name": "val"}] if central_validation else [],
        "output_dir": str(output_dir or tmp / "runs"), "cache_dir": str(tmp / "cache"), "resume": resume,
        "client_cpus": client_cpus, **(fed_options or {}),
    }
    return write_yaml(tmp / f"{name}.yaml", fed)
