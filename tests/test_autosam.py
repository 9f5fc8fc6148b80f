"""AutoSam composite: gradient flow, trainable state, checkpoints, embedding cache, config errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from autosam_core.autosam import AutoSam, StateMismatchError
from autosam_core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from autosam_core.config import ConfigError, ModelConfig, SamConfig, SiteConfig, load_yaml_config
from autosam_core.data.cache import EmbeddingCache
from autosam_core.data.io import load_image
from autosam_core.model_factory import build_autosam
from autosam_core.training import masked_loss_and_dice
from tests.conftest import save_as_if_cuda

SMALL_G = ModelConfig(backbone="hardnet68", g_input_size=64, surrogate=True)


@pytest.fixture(scope="module")
def model(tiny_sam) -> AutoSam:
    return build_autosam(SamConfig(kind="tiny"), SMALL_G, sam=tiny_sam)


def _batch(model, n=2, seed=0):
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (48 + 8 * i, 64, 3), dtype=np.uint8) for i in range(n)]
    masks = [np.zeros(im.shape[:2], np.uint8) for im in images]
    for m in masks:
        m[10:30, 20:40] = 1
    emb = model.sam.encode(torch.stack([model.sam.preprocess(im)[0] for im in images]))
    g = torch.stack([model.g_input(im) for im in images])
    tg = [model.low_res_target(m) for m in masks]
    return emb, g, torch.stack([t for t, _ in tg]), torch.tensor([s for _, s in tg])


def test_one_step_updates_g_only(model):
    emb, g, target, valid = _batch(model)
    sam_before = {k: v.clone() for k, v in model.sam.state_dict().items()}
    g_before = {k: v.clone() for k, v in model.prompt_generator.state_dict().items()}
    opt = torch.optim.Adam(model.prompt_generator.parameters(), lr=1e-3)
    model.train()
    loss, _ = masked_loss_and_dice(model(emb, g), target, valid)
    opt.zero_grad()
    loss.backward()
    missing = [n for n, p in model.prompt_generator.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    assert all(p.grad is None for p in model.sam.parameters())
    opt.step()
    assert all(torch.equal(v, model.sam.state_dict()[k]) for k, v in sam_before.items())
    changed = [k for k, v in model.prompt_generator.state_dict().items() if not torch.equal(v, g_before[k])]
    assert len(changed) > 0.9 * len(g_before)
    assert not model.sam.training


def test_trainable_state_holds_only_g_and_h(model):
    state = model.trainable_state()
    assert state and all(k.startswith(("prompt_generator.", "surrogate_decoder.")) for k in state)
    assert not any(k.startswith("sam.") for k in state)
    counts = model.num_trainable_parameters()
    assert counts["sam_trainable_params"] == 0
    n_params = sum(v.numel() for k, v in state.items() if "running_" not in k and "num_batches" not in k)
    assert n_params == counts["g_params"] + counts["h_params"]
    nbt = [v for k, v in state.items() if k.endswith("num_batches_tracked")]
    assert nbt and all(v.dtype == torch.int64 for v in nbt)


def test_channels_last_g_gives_the_same_prompt_and_exports_contiguous_state(tiny_sam):
    torch.manual_seed(5)
    m = build_autosam(SamConfig(kind="tiny"), ModelConfig(preset="sam_head"), sam=tiny_sam).eval()
    emb = torch.randn(2, 256, 64, 64) * 0.1
    ref = m.dense_prompt(emb, None)
    m.set_channels_last(True)
    conv = next(p for p in m.prompt_generator.parameters() if p.ndim == 4)
    assert m.channels_last and conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert torch.allclose(m.dense_prompt(emb, None), ref, atol=1e-5)
    state = m.trainable_state()
    assert all(v.is_contiguous() for v in state.values())
    m.set_channels_last(False)
    assert conv.is_contiguous() and not m.channels_last

def test_load_trainable_state_names_mismatch(model, tiny_sam):
    other = build_autosam(SamConfig(kind="tiny"), ModelConfig(backbone="hardnet85", g_input_size=64), sam=tiny_sam)
    with pytest.raises(StateMismatchError) as err:
        model.load_trainable_state(other.trainable_state())
    assert "prompt_generator." in str(err.value)
    bad = model.trainable_state()
    bad["sam.mask_decoder.iou_token.weight"] = torch.zeros(1, 256)
    with pytest.raises(StateMismatchError, match="sam.mask_decoder"):
        model.load_trainable_state(bad)
    state = model.trainable_state()
    k = next(k for k in state if k.endswith(".weight") and state[k].ndim == 4)
    state[k] = torch.zeros(1, 1, 1, 1)
    with pytest.raises(StateMismatchError, match=r"\(1, 1, 1, 1\)"):
        model.load_trainable_state(state)


def test_checkpoint_roundtrip_atomic_and_cuda(tmp_path, model):
    path = save_checkpoint(tmp_path / "ck.pt", model.trainable_state(), {"backbone": "hardnet68", "epoch": 3})
    payload = load_checkpoint(path)
    assert payload["metadata"]["epoch"] == 3
    assert all(torch.equal(payload["trainable_state"][k], v) for k, v in model.trainable_state().items())
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temporary file left behind
    cuda_path = tmp_path / "cuda.pt"
    save_as_if_cuda({"format_version": 1, "trainable_state": model.trainable_state(), "metadata": {}}, cuda_path)
    assert load_checkpoint(cuda_path)["trainable_state"].keys() == model.trainable_state().keys()
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")


def test_failed_save_leaves_previous_checkpoint(tmp_path, model, monkeypatch):
    path = save_checkpoint(tmp_path / "ck.pt", {"prompt_generator.x": torch.ones(2)}, {"epoch": 1})

    def broken_save(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save_checkpoint(path, {"prompt_generator.x": torch.zeros(2)}, {"epoch": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["metadata"]["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


def test_embedding_cache_computes_once(tmp_path, tiny_sam):
    paths = []
    for i in range(3):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(np.full((40, 60, 3), 40 * i, np.uint8)).save(p)
        paths.append(p)
    cache = EmbeddingCache(tiny_sam, tmp_path / "cache")
    first = cache.ensure(paths, load_image, progress=False)
    assert first["computed"] == 3 and first["cached"] == 0
    again = EmbeddingCache(tiny_sam, tmp_path / "cache").ensure(paths, load_image, progress=False)
    assert again["computed"] == 0 and again["cached"] == 3
    emb = cache.get(paths[1])
    assert emb.dtype == torch.float16 and emb.shape == (256, 64, 64)
    direct = tiny_sam.encode(tiny_sam.preprocess(load_image(paths[1]))[0][None])[0]
    assert torch.allclose(emb.float(), direct, atol=1e-2 * direct.abs().max().item())
    new = tmp_path / "new.png"
    Image.fromarray(np.full((40, 60, 3), 7, np.uint8)).save(new)
    with pytest.raises(KeyError, match="autosam embed"):
        cache.get(new)


def test_config_errors_name_file_and_key(tmp_path):
    p = tmp_path / "site.yaml"
    p.write_text("site_id: a\ndata: {dataset: Kvasir-SEG}\nlocal_epoch: 2\n")
    with pytest.raises(ConfigError) as err:
        load_yaml_config(p, SiteConfig)
    msg = str(err.value)
    assert "site.yaml" in msg and "local_epoch" in msg and "local_epochs" in msg
    p.write_text("site_id: a\ndata: {dataset: Kvasir-SEG}\nbatch_size: many\n")
    with pytest.raises(ConfigError, match="batch_size"):
        load_yaml_config(p, SiteConfig)
    p.write_text("model: {g_input_size: 100}\nsite_id: a\n")
    with pytest.raises(ConfigError, match="divisible by 32"):
        load_yaml_config(tmp_path / "site.yaml", __import__("autosam_core.config", fromlist=["TrainJobConfig"]).TrainJobConfig)


def test_stems_file_partition(tmp_path, shared_data):
    from autosam_core.config import DataRef
    from autosam_core.data.dataset import resolve_pairs

    (tmp_path / "part.txt").write_text("train_3\ntrain_5\n\n")
    pairs = resolve_pairs(DataRef(dataset="GlaS", stems_file="part.txt"), tmp_path)
    assert [p.stem for p in pairs] == ["train_3", "train_5"]
    with pytest.raises(ConfigError, match="not both"):
        resolve_pairs(DataRef(dataset="GlaS", split="train", stems_file="part.txt"), tmp_path)
    with pytest.raises(ConfigError, match="missing.txt"):
        resolve_pairs(DataRef(dataset="GlaS", stems_file="missing.txt"), tmp_path)


@pytest.mark.parametrize("cfg", [SMALL_G, ModelConfig(preset="sam_head", head_channels=16),
                                 ModelConfig(preset="sam_head", head_channels=16, dp_compatible=True)],
                         ids=["hardnet68+h", "sam_head", "sam_head-dp"])
def test_trainable_state_template_is_the_built_models_state(tiny_sam, cfg):
    from autosam_core.model_factory import trainable_state_template

    built = build_autosam(SamConfig(kind="tiny"), cfg, sam=tiny_sam, seed=3).trainable_state()
    template = trainable_state_template(SamConfig(kind="tiny"), cfg, seed=3)
    assert list(template) == list(built)
    assert any(k.startswith("surrogate_decoder.") for k in template) == cfg.surrogate
    assert any("running_mean" in k for k in template) != cfg.dp_compatible  # GroupNorm in the DP g
    for k, v in built.items():
        assert template[k].dtype == v.dtype and torch.equal(template[k], v), k
    with pytest.raises(ValueError, match="unknown SAM kind 'vit_q'"):
        trainable_state_template(SamConfig.model_construct(kind="vit_q"), cfg)
