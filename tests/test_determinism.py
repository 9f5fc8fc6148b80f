"""Determinism (one seed fixes data order, augmentation and initialisation) and integrity of what a
site reads (an image edited in place between rounds is re-encoded, never served from a stale entry).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from autosam_core.config import DataRef, ModelConfig, SamConfig, SiteConfig
from autosam_core.model_factory import build_autosam
from autosam_core.training import SiteTrainer

G = ModelConfig(backbone="timm:mobilenetv3_small_050", g_input_size=64)


def _dataset(root: Path, n: int = 4, ext: str = ".png") -> Path:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / "images" / f"im{i}{ext}")
        m = np.zeros((40, 48), np.uint8)
        m[4 + 3 * i:24, 8:30 + 2 * i] = 255
        Image.fromarray(m, mode="L").save(root / "masks" / f"im{i}.png")
    return root


def _site(ds: Path, **kw) -> SiteConfig:
    return SiteConfig(site_id="a", data=DataRef(dataset=str(ds)), batch_size=2, lr=1e-3, augmentation="glas", **kw)


def _one_local_run(tiny_sam, ds, cache, seed, init_seed=0) -> dict:
    model = build_autosam(SamConfig(kind="tiny"), G, sam=tiny_sam, seed=init_seed)
    SiteTrainer(model, _site(ds), cache_dir=cache, progress=False).fit(1, seed=seed)
    return model.trainable_state()


def _differing(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def test_site_run_is_bit_identical_for_one_seed(tiny_sam, tmp_path):
    ds, cache = _dataset(tmp_path / "ds", n=3), tmp_path / "cache"
    first = _one_local_run(tiny_sam, ds, cache, seed=5)
    torch.rand(13), np.random.rand(3)  # whatever the caller's global RNGs did in between
    second = _one_local_run(tiny_sam, ds, cache, seed=5)
    assert _differing(first, second) == []
    other_seed = _one_local_run(tiny_sam, ds, cache, seed=6)  # other data order and colour jitter
    assert len(_differing(first, other_seed)) > 0.5 * len(first)


def test_initial_model_follows_the_seed(tiny_sam):
    def init(seed):
        return build_autosam(SamConfig(kind="tiny"), G, sam=tiny_sam, seed=seed).trainable_state()

    a = init(0)
    torch.rand(5)
    assert _differing(a, init(0)) == []
    weights = [k for k in a if a[k].ndim == 4]  # conv kernels (BatchNorm starts at 1 and 0 whatever the seed)
    changed = set(_differing(a, init(1)))
    assert len(changed & set(weights)) > 0.9 * len(weights)


def test_augmentation_stream_follows_the_seed(tiny_sam, tmp_path):
    from autosam_core.data.dataset import resolve_pairs
    from autosam_core.data.torch_dataset import AutoSamDataset

    model = build_autosam(SamConfig(kind="tiny"), G, sam=tiny_sam)
    pairs = resolve_pairs(DataRef(dataset=str(_dataset(tmp_path / "ds", n=1))))
    a = AutoSamDataset(model, pairs, "glas", seed=3)
    b = AutoSamDataset(model, pairs, "glas", seed=3)
    x = [a[0]["g_input"] for _ in range(3)]
    assert all(torch.equal(u, b[0]["g_input"]) for u in x)
    assert not torch.equal(x[0], x[1])  # the stream moves on within a run
    a.reseed(3)
    assert torch.equal(a[0]["g_input"], x[0])


def test_centralised_train_seed_fixes_the_run(tmp_path, capsys):
    """``train.seed`` fixes g's initialisation, the validation split, data order and augmentation."""
    from autosam_core.checkpoint import load_checkpoint
    from autosam_core.cli import main

    ds = _dataset(tmp_path / "ds", n=3)

    def run(name: str, seed: int) -> dict:
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(
            f"name: {name}\nsam: {{kind: tiny}}\nmodel: {{backbone: '{G.backbone}', g_input_size: {G.g_input_size}}}\n"
            f"train: {{epochs: 1, batch_size: 2, augmentation: glas, val_fraction: 0.0, lr: 0.001, seed: {seed}}}\n"
            f"train_data: [{{dataset: '{ds}'}}]\ncache_dir: '{tmp_path / 'cache'}'\n")
        assert main(["train", str(cfg), "--output", str(tmp_path / name)]) == 0
        return load_checkpoint(tmp_path / name / "last.pt")["trainable_state"]

    a, b = run("a", 0), run("b", 0)  # a different seed giving other weights: the site test above
    assert _differing(a, b) == []


def test_image_edited_in_place_between_rounds_is_reencoded(tiny_sam, tmp_path):
    """Same path, same size, new bytes (BMP: uncompressed): round 2 must not see round 1's embedding."""
    from autosam_core.data.io import load_image

    ds = _dataset(tmp_path / "ds", n=2, ext=".bmp")
    model = build_autosam(SamConfig(kind="tiny"), G, sam=tiny_sam)
    trainer = SiteTrainer(model, _site(ds), cache_dir=tmp_path / "cache", progress=False)
    trainer.fit(1, seed=1)
    target = ds / "images" / "im0.bmp"
    old_key, old_emb, size, inode = trainer.cache.key(target), trainer.cache.get(target).clone(), \
        target.stat().st_size, target.stat().st_ino
    time.sleep(0.05)  # past the file system's timestamp granularity
    edited = tmp_path / "edited.bmp"
    Image.fromarray(np.full((40, 48, 3), 17, np.uint8)).save(edited)
    with open(target, "r+b") as f:  # edited in place: same inode, same size
        f.write(edited.read_bytes())
    assert target.stat().st_size == size and target.stat().st_ino == inode
    trainer.fit(1, seed=2)
    new_key = trainer.cache.key(target)
    assert new_key != old_key
    emb = trainer.cache.get(target)
    direct = tiny_sam.encode(tiny_sam.preprocess(load_image(target))[0][None])[0]
    assert torch.allclose(emb.float(), direct, atol=1e-2 * direct.abs().max().item())
    assert not torch.allclose(emb.float(), old_emb.float(), atol=1e-2 * direct.abs().max().item())
    assert len(list(trainer.cache.dir.glob("*.pt"))) == 3  # 2 images in round 1, the edited one in round 2


@pytest.mark.parametrize("edit", ["same_bytes_touch", "rewrite_same_content"])
def test_unchanged_bytes_keep_their_entry(tiny_sam, tmp_path, edit):
    """A touched or rewritten-but-identical file is hashed again and keeps its entry (no re-encode)."""
    from autosam_core.data.cache import EmbeddingCache
    from autosam_core.data.io import load_image

    ds = _dataset(tmp_path / "ds", n=1)
    img = ds / "images" / "im0.png"
    cache = EmbeddingCache(tiny_sam, tmp_path / "cache")
    cache.ensure([img], load_image, progress=False)
    key = cache.key(img)
    time.sleep(0.05)
    if edit == "same_bytes_touch":
        img.touch()
    else:
        img.write_bytes(img.read_bytes())
    assert cache.key(img) == key
    assert cache.ensure([img], load_image, progress=False)["computed"] == 0
