"""Geometric augmentation with a cache: embeddings of mirrored images, served with mirrored masks (issue 10)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from autosam_core.config import DataRef, ModelConfig, SamConfig, SiteConfig, TrainConfig
from autosam_core.data.cache import EmbeddingCache
from autosam_core.data.dataset import resolve_pairs
from autosam_core.data.io import load_image, load_mask
from autosam_core.data.torch_dataset import AutoSamDataset
from autosam_core.model_factory import build_autosam
from autosam_core.training import SiteTrainer
from tests.fl_helpers import make_dataset


@pytest.fixture()
def pairs(tmp_path):
    return resolve_pairs(DataRef(dataset=str(make_dataset(tmp_path / "data", 4, seed=3))))


def test_mirrored_entries_are_the_encoder_on_the_mirrored_image(tmp_path, tiny_sam, pairs):
    cache = EmbeddingCache(tiny_sam, tmp_path / "cache")
    paths = [p.image_path for p in pairs]
    cache.ensure(paths, load_image, progress=False)
    with pytest.raises(KeyError, match="mirrored"):
        cache.get(paths[0], hflip=True)
    stats = cache.ensure(paths, load_image, progress=False, hflip=True)
    assert stats["computed"] == 4 and stats["cached"] == 0
    assert cache.path(paths[0], hflip=True) != cache.path(paths[0])
    image = load_image(paths[0])
    direct = tiny_sam.encode(tiny_sam.preprocess(np.ascontiguousarray(image[:, ::-1]))[0][None])[0]
    got = cache.get(paths[0], hflip=True).float()
    assert torch.allclose(got, direct, atol=1e-2 * direct.abs().max().item())
    assert not torch.allclose(got, cache.get(paths[0]).float(), atol=1e-2 * direct.abs().max().item())
    assert cache.ensure(paths, load_image, progress=False, hflip=True)["computed"] == 0


@pytest.mark.parametrize("g", [ModelConfig(preset="sam_head"), ModelConfig(backbone="hardnet68", g_input_size=64)])
def test_dataset_serves_embedding_mask_and_image_mirrored_together(tmp_path, tiny_sam, pairs, g):
    model = build_autosam(SamConfig(kind="tiny"), g, sam=tiny_sam)
    cache = EmbeddingCache(tiny_sam, tmp_path / "cache")
    for hflip in (False, True):
        cache.ensure([p.image_path for p in pairs], load_image, progress=False, hflip=hflip)
    always = AutoSamDataset(model, pairs, "none", cache, hflip_p=1.0)
    never = AutoSamDataset(model, pairs, "none", cache, hflip_p=0.0)
    for i, pair in enumerate(pairs):
        mask = load_mask(pair.mask_path)
        a, n = always[i], never[i]
        assert torch.equal(a["image_embeddings"], cache.get(pair.image_path, hflip=True))
        assert torch.equal(n["image_embeddings"], cache.get(pair.image_path))
        assert torch.equal(a["target"], model.low_res_target(np.ascontiguousarray(mask[:, ::-1]))[0])
        assert torch.equal(n["target"], model.low_res_target(mask)[0])
        assert not torch.equal(a["target"], n["target"])  # the squares are off-centre: mirroring moves them
        if model.reads_images:
            image = load_image(pair.image_path)
            assert torch.equal(a["g_input"], model.g_input(np.ascontiguousarray(image[:, ::-1])))


def test_half_mirrored_seeded_and_reproducible(tmp_path, tiny_sam, pairs):
    model = build_autosam(SamConfig(kind="tiny"), ModelConfig(preset="sam_head"), sam=tiny_sam)
    cache = EmbeddingCache(tiny_sam, tmp_path / "cache")
    for hflip in (False, True):
        cache.ensure([p.image_path for p in pairs], load_image, progress=False, hflip=hflip)
    plain = [model.low_res_target(load_mask(p.mask_path))[0] for p in pairs]

    def pattern(ds, n=40):
        return [not torch.equal(ds[k % 4]["target"], plain[k % 4]) for k in range(n)]

    ds = AutoSamDataset(model, pairs, "none", cache, seed=5, hflip_p=0.5)
    first = pattern(ds)
    assert 10 <= sum(first) <= 30  # about half of 40 draws (binomial, p = 0.5)
    ds.reseed(5)
    assert pattern(ds) == first
    assert pattern(AutoSamDataset(model, pairs, "none", cache, seed=5, hflip_p=0.5)) == first


def test_bad_settings_are_refused(tiny_sam, pairs):
    model = build_autosam(SamConfig(kind="tiny"), ModelConfig(preset="sam_head"), sam=tiny_sam)
    with pytest.raises(ValueError, match="needs a cache"):
        AutoSamDataset(model, pairs, "none", None, hflip_p=0.5)
    with pytest.raises(ValueError, match=r"hflip_p must be in \[0, 1\]"):
        AutoSamDataset(model, pairs, "none", EmbeddingCache(tiny_sam), hflip_p=1.5)
    with pytest.raises(ValidationError, match="use_cache"):
        TrainConfig(hflip=0.5, use_cache=False)
    with pytest.raises(ValidationError, match="hflip"):
        SiteConfig(site_id="a", data=DataRef(dataset="x"), hflip=2)


def test_site_trainer_fills_the_mirrored_cache_and_trains(tmp_path, tiny_sam, pairs):
    model = build_autosam(SamConfig(kind="tiny"), ModelConfig(preset="sam_head"), sam=tiny_sam)
    site = SiteConfig(site_id="a", data=DataRef(dataset=str(tmp_path / "data")), batch_size=2, hflip=0.5,
                      precision="fp32", cache_dir=str(tmp_path / "cache"))
    trainer = SiteTrainer(model, site, progress=False)
    stats = trainer.fit(1, seed=0)
    assert stats["num_examples"] == 4 and np.isfinite(stats["loss"])
    assert all(trainer.cache.path(p.image_path, hflip=True).is_file() for p in pairs)
