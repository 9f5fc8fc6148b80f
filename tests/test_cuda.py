"""CUDA path (issue 9): one training step, evaluation, a cache fill and a DP step on the GPU, and the
trainable state comes back on the CPU. Marked ``cuda``; skipped with the reason where no GPU exists
(CI never has one)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")]


@pytest.fixture()
def gpu_model():
    from autosam_core.config import ModelConfig, SamConfig
    from autosam_core.model_factory import build_autosam
    from autosam_core.sam import load_frozen_sam

    sam = load_frozen_sam("tiny", seed=0).to("cuda").set_precision("bf16")
    return build_autosam(SamConfig(kind="tiny"), ModelConfig(preset="sam_head", head_channels=16), sam=sam)


def _pairs(tmp_path, n=4):
    from PIL import Image

    from autosam_core.data.dataset import pair_by_stem

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(tmp_path / "images" / f"s{i}.png")
        m = np.zeros((64, 80), np.uint8)
        m[10:40, 20:50] = 255
        Image.fromarray(m).save(tmp_path / "masks" / f"s{i}.png")
    return list(pair_by_stem(tmp_path / "images", tmp_path / "masks").pairs)


def test_train_step_cache_fill_and_evaluation_on_cuda(gpu_model, tmp_path):
    from autosam_core.data.cache import EmbeddingCache
    from autosam_core.data.io import load_image
    from autosam_core.data.torch_dataset import AutoSamDataset, make_loader
    from autosam_core.evaluation import evaluate_pairs
    from autosam_core.training import train_epochs

    pairs = _pairs(tmp_path)
    cache = EmbeddingCache(gpu_model.sam, tmp_path / "cache")
    assert cache.ensure([p.image_path for p in pairs], load_image, progress=False)["computed"] == 4
    before = gpu_model.trainable_state()
    opt = torch.optim.Adam(gpu_model.prompt_generator.parameters(), lr=1e-3)
    stats = train_epochs(gpu_model, make_loader(AutoSamDataset(gpu_model, pairs, "none", cache), 2, True), 1, opt,
                         progress=False)
    assert stats["steps"] == 2 and next(gpu_model.prompt_generator.parameters()).is_cuda
    after = gpu_model.trainable_state()
    assert all(v.device.type == "cpu" for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)
    res = evaluate_pairs(gpu_model, pairs, cache)
    assert res["num_images"] == 4 and 0.0 <= res["dice"] <= 1.0


def test_dp_step_on_cuda(tmp_path):
    from autosam_core.config import ModelConfig, SamConfig
    from autosam_core.data.cache import EmbeddingCache
    from autosam_core.data.io import load_image
    from autosam_core.data.torch_dataset import AutoSamDataset
    from autosam_core.model_factory import build_autosam
    from autosam_core.privacy import dp_train_epochs, make_autosam_private_compatible
    from autosam_core.sam import load_frozen_sam

    sam = load_frozen_sam("tiny", seed=0).to("cuda")
    model = make_autosam_private_compatible(
        build_autosam(SamConfig(kind="tiny"), ModelConfig(backbone="hardnet68", g_input_size=64), sam=sam))
    pairs = _pairs(tmp_path)
    cache = EmbeddingCache(sam, tmp_path / "cache")
    cache.ensure([p.image_path for p in pairs], load_image, progress=False)
    stats = dp_train_epochs(model, AutoSamDataset(model, pairs, "none", cache), epochs=1, batch_size=2,
                            noise_multiplier=1.0, max_grad_norm=1.0, lr=1e-3, weight_decay=0.0, insecure_seed=0)
    assert stats["steps"] >= 1
    assert all(v.device.type == "cpu" for v in model.trainable_state().values())
