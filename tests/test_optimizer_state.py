"""``optimizer_state: keep``: a site's Adam moments carry from one round to the next of the same run,
in its state folder, and nowhere else (autosam_core.optimizer_state)."""

from __future__ import annotations

import pytest
import torch

from autosam_core.config import (ConfigError, DataRef, ModelConfig, PrivacyConfig, SamConfig, SiteConfig,
                                 load_yaml_config)
from autosam_core.model_factory import build_autosam
from autosam_core.optimizer_state import OptimizerStateError, OptimizerStateStore
from autosam_core.training import SiteTrainer

from tests.fl_helpers import make_dataset

G = ModelConfig(backbone="timm:mobilenetv3_small_050", g_input_size=64)


def _dataset(root, n):
    return make_dataset(root, n, seed=0)


def _trainer(tiny_sam, ds, tmp_path, state_dir, optimizer_state="keep", init_seed=0):
    site = SiteConfig(site_id="a", data=DataRef(dataset=str(ds)), batch_size=2, lr=1e-3, augmentation="none",
                      optimizer_state=optimizer_state)
    model = build_autosam(SamConfig(kind="tiny"), G, sam=tiny_sam, seed=init_seed)
    return SiteTrainer(model, site, cache_dir=tmp_path / "cache", progress=False, state_dir=state_dir)


def _saved(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_keep_carries_adam_steps_across_rounds_and_processes(tiny_sam, tmp_path):
    ds, state = _dataset(tmp_path / "ds", n=4), tmp_path / "state"
    first = _trainer(tiny_sam, ds, tmp_path, state)
    first.fit(1, seed=1, run_id="run7", server_round=1)  # 4 images, batch 2: 2 Adam steps
    f = state / "optimizer-a.pt"
    rec = _saved(f)
    assert (rec["run_id"], rec["server_round"]) == ("run7", 1)
    steps = {float(s["step"]) for s in rec["optimizer"]["state"].values()}
    assert steps == {2.0}
    # a fresh trainer (a restarted site worker, another simulation actor) continues from the file
    second = _trainer(tiny_sam, ds, tmp_path, state)
    second.fit(1, seed=2, run_id="run7", server_round=2)
    rec2 = _saved(f)
    assert rec2["server_round"] == 2
    assert {float(s["step"]) for s in rec2["optimizer"]["state"].values()} == {4.0}  # 2 kept + 2 new


def test_another_run_or_a_skipped_round_starts_a_fresh_adam(tiny_sam, tmp_path):
    ds, state = _dataset(tmp_path / "ds", n=4), tmp_path / "state"
    _trainer(tiny_sam, ds, tmp_path, state).fit(1, seed=1, run_id="run7", server_round=1)
    f = state / "optimizer-a.pt"
    for run_id, server_round in (("run8", 2), ("run7", 3), ("run7", 1)):
        _trainer(tiny_sam, ds, tmp_path, state).fit(1, seed=1, run_id=run_id, server_round=server_round)
        rec = _saved(f)
        assert (rec["run_id"], rec["server_round"]) == (run_id, server_round)
        assert {float(s["step"]) for s in rec["optimizer"]["state"].values()} == {2.0}


def test_reset_keeps_nothing_and_same_seed_gives_the_same_weights(tiny_sam, tmp_path):
    ds, state = _dataset(tmp_path / "ds", n=4), tmp_path / "state"
    reset = _trainer(tiny_sam, ds, tmp_path, state, optimizer_state="reset")
    assert reset.optimizer_store is None
    reset.fit(1, seed=1, run_id="r", server_round=1)
    reset.fit(1, seed=2, run_id="r", server_round=2)
    assert not (state / "optimizer-a.pt").exists()
    keep = _trainer(tiny_sam, ds, tmp_path, state)
    keep.fit(1, seed=1, run_id="r", server_round=1)
    # round 1 is identical (nothing to keep yet), round 2 differs: the moments carried over
    fresh = _trainer(tiny_sam, ds, tmp_path, None, optimizer_state="reset")
    fresh.fit(1, seed=1, run_id="r", server_round=1)
    assert all(torch.equal(a, b) for a, b in zip(keep.model.trainable_state().values(),
                                                 fresh.model.trainable_state().values()))
    keep.fit(1, seed=2, run_id="r", server_round=2)
    fresh.fit(1, seed=2, run_id="r", server_round=2)
    differing = [k for k, v in keep.model.trainable_state().items()
                 if v.is_floating_point() and not torch.equal(v, fresh.model.trainable_state()[k])]
    assert differing


def test_in_memory_store_without_a_state_folder(tiny_sam, tmp_path):
    ds = _dataset(tmp_path / "ds", n=4)
    tr = _trainer(tiny_sam, ds, tmp_path, None)
    tr.fit(1, seed=1, run_id="e", server_round=1)
    tr.fit(1, seed=2, run_id="e", server_round=2)
    assert {float(s["step"]) for s in tr.optimizer_store._memory["optimizer"]["state"].values()} == {4.0}
    assert not list(tmp_path.rglob("optimizer-*.pt"))


def test_unreadable_or_misfit_file_names_the_file(tiny_sam, tmp_path):
    ds, state = _dataset(tmp_path / "ds", n=4), tmp_path / "state"
    state.mkdir()
    f = state / "optimizer-a.pt"
    f.write_bytes(b"not a torch file")
    with pytest.raises(OptimizerStateError, match="optimizer-a.pt.*delete the file"):
        _trainer(tiny_sam, ds, tmp_path, state).fit(1, seed=1, run_id="r", server_round=2)
    # moments saved for another g (other shapes) are refused, not broadcast into this one
    other = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(other.parameters())
    other(torch.ones(1, 3)).sum().backward()
    opt.step()
    OptimizerStateStore(f).save(opt, "r", 1)
    with pytest.raises(OptimizerStateError, match="optimizer-a.pt"):
        _trainer(tiny_sam, ds, tmp_path, state).fit(1, seed=1, run_id="r", server_round=2)


def test_keep_with_privacy_is_refused_naming_the_key(tmp_path):
    with pytest.raises(ValueError, match="optimizer_state"):
        SiteConfig(site_id="a", data=DataRef(dataset="x"), optimizer_state="keep",
                   privacy=PrivacyConfig(noise_multiplier=1.0))
    y = tmp_path / "site.yaml"
    y.write_text("site_id: a\ndata: {dataset: x}\noptimizer_state: kept\n")
    with pytest.raises(ConfigError, match="optimizer_state"):
        load_yaml_config(y, SiteConfig)
