"""Record-level DP-SGD at a site (autosam_core.privacy): model fixes, per-sample gradients through the
frozen SAM, Poisson sampling with empty batches, accounting persisted across rounds, tiny sites.

SAM-facing tests use the random ``tiny`` SAM (real segment_anything decoder, one sample per call);
the accounting tests, which take tens of steps, use ``fast_sam``: a FrozenSam with SAM's interface
and shapes but a 1x1-conv "decoder", so they stay fast on 2 CPU cores.
"""

from __future__ import annotations

import json
import logging
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import default_collate

from autosam_core.autosam import AutoSam
from autosam_core.config import ConfigError, DataRef, PrivacyConfig, SiteConfig
from autosam_core.privacy import (
    DPCompatibilityError, DPSiteTrainer, PrivacyLedger, PrivacyLedgerError, PrivacyWarning,
    calibrate_noise_multiplier, check_delta, check_private_compatible, dp_train_epochs,
    groupnorm_groups, make_private_compatible, poisson_sample_rate, require_uniform_privacy)
from autosam_core.sam import SPECS, FrozenSam
from autosam_core.trainable_state import state_mismatches


def per_sample_gradients(model: AutoSam, batch: dict) -> dict[str, torch.Tensor]:
    """Per-sample gradients of the training loss w.r.t. g's parameters, ``{name: (B, *shape)}``.

    g is wrapped in an Opacus ``GradSampleModule`` for one forward/backward and unwrapped again
    (hooks removed, Opacus attributes deleted, ``.grad`` cleared). Test helper (was product code).
    """
    from opacus import GradSampleModule

    from autosam_core.privacy.trainer import _backward, _batch_loss, _drop_opacus_attrs

    g = model.prompt_generator
    check_private_compatible(g)
    was_training = g.training
    g.train()
    gsm = GradSampleModule(g, batch_first=True, loss_reduction="mean", strict=True)
    try:
        loss, _ = _batch_loss(model, gsm, batch)
        _backward(loss)
        return {n: p.grad_sample.detach().clone() for n, p in g.named_parameters() if p.requires_grad}
    finally:
        gsm._close()
        _drop_opacus_attrs(g)
        g.zero_grad(set_to_none=True)
        g.train(was_training)


class TinyG(nn.Module):
    """A small g: conv -> BatchNorm -> in-place ReLU -> 1x1 conv -> tanh; (B,3,64,64) -> (B,256,64,64) in [-1,1]."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(8)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 256, 1)

    def forward(self, x):
        return torch.tanh(self.conv2(self.act(self.norm(self.conv1(x)))))


class _StubPromptEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("pe", 0.1 * torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(1)))

    def get_dense_pe(self):
        return self.pe


class _StubMaskDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(256, 1, 1)

    def forward(self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                multimask_output):
        x = self.head(image_embeddings + image_pe + dense_prompt_embeddings)
        return F.interpolate(x, size=(256, 256), mode="bilinear", align_corners=False), x.new_zeros(x.shape[0], 1)


@pytest.fixture(scope="module")
def fast_sam() -> FrozenSam:
    torch.manual_seed(0)
    return FrozenSam(SPECS["tiny"], nn.Conv2d(3, 256, 4, stride=4), _StubPromptEncoder(), _StubMaskDecoder(),
                     weights_id="stub0")


def _dp_model(sam: FrozenSam, seed: int = 0) -> AutoSam:
    torch.manual_seed(seed)
    return AutoSam(sam, make_private_compatible(TinyG()), g_input_size=64)


def _items(model: AutoSam, n: int, seed: int = 0) -> list[dict]:
    """In-memory training items (random image, square mask, random cached-like embeddings)."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        image = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
        mask = np.zeros(image.shape[:2], np.uint8)
        mask[10:30, 20:40] = 1
        target, (h, w) = model.low_res_target(mask)
        out.append({"image_embeddings": torch.randn(256, 64, 64, generator=gen).half(),
                    "g_input": model.g_input(image), "target": target, "valid": torch.tensor([h, w])})
    return out


def _no_hooks(module: nn.Module) -> list[str]:
    return [name for name, m in module.named_modules()
            if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks]


# ----- model preparation -----------------------------------------------------------------------------
def test_groupnorm_groups_keep_two_channels_per_group():
    assert [groupnorm_groups(c) for c in (256, 1280, 48, 14, 8, 3, 2)] == [32, 32, 24, 7, 4, 1, 1]
    for c in range(2, 300):
        g = groupnorm_groups(c)
        assert c % g == 0 and g <= 32 and c // g >= 2
    with pytest.warns(PrivacyWarning):
        assert groupnorm_groups(1) == 1


def test_make_private_compatible_replaces_batchnorm_and_inplace(caplog):
    from opacus.validators import ModuleValidator

    g = TinyG()
    with caplog.at_level(logging.INFO, logger="autosam_core.privacy"):
        fixed = make_private_compatible(g)
    assert isinstance(g.norm, nn.BatchNorm2d) and g.act.inplace  # the input is untouched
    assert isinstance(fixed.norm, nn.GroupNorm) and (fixed.norm.num_groups, fixed.norm.num_channels) == (4, 8)
    assert not fixed.act.inplace
    assert torch.equal(fixed.norm.weight, g.norm.weight) and torch.equal(fixed.norm.bias, g.norm.bias)
    assert any("norm" in r.getMessage() and "C=8" in r.getMessage() and "groups=4" in r.getMessage()
               for r in caplog.records)
    assert ModuleValidator.validate(fixed.train(), strict=False) == []
    check_private_compatible(fixed)
    with pytest.raises(DPCompatibilityError, match="norm"):
        check_private_compatible(g)
    # DP changes g's state keys: the comparison a reply audit makes tells them apart; equal models agree.
    assert "norm.running_mean" in g.state_dict() and "norm.running_mean" not in fixed.state_dict()
    assert state_mismatches(fixed.state_dict(), g.state_dict(), compare_dtypes=True)
    fresh = make_private_compatible(TinyG()).state_dict()
    assert state_mismatches(fixed.state_dict(), fresh, compare_dtypes=True) == []


def test_make_private_compatible_refuses_what_it_cannot_fix():
    class FancyBN(nn.BatchNorm2d):  # a BatchNorm with extra behaviour (like timm's BatchNormAct2d)
        def forward(self, x):
            return torch.relu(super().forward(x))

    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 4, 1), FancyBN(4))
            self.rnn = nn.LSTM(4, 4)

    with pytest.raises(DPCompatibilityError) as err:
        make_private_compatible(Bad())
    assert isinstance(err.value, ValueError)
    assert "stem.1 (FancyBN)" in str(err.value) and "rnn (LSTM)" in str(err.value)


def test_hardnet_prompt_generator_becomes_compatible():
    from opacus.validators import ModuleValidator

    from autosam_core.prompt_generator import PromptGenerator

    torch.manual_seed(0)
    g = PromptGenerator(backbone="hardnet68")
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in g.modules())
    fixed = make_private_compatible(g)
    gns = [m for m in fixed.modules() if isinstance(m, nn.GroupNorm)]
    assert len(gns) == n_bn > 0
    assert all(m.num_channels // m.num_groups >= 2 for m in gns)
    assert not any(getattr(m, "inplace", False) for m in fixed.modules())
    assert ModuleValidator.validate(fixed.train(), strict=False) == []


def test_mixed_federation_is_refused():
    data = DataRef(dataset="x")
    dp = SiteConfig(site_id="a", data=data, privacy=PrivacyConfig(noise_multiplier=1.0))
    plain = SiteConfig(site_id="b", data=data)
    assert require_uniform_privacy([dp, dp]) is True and require_uniform_privacy([plain]) is False
    with pytest.raises(ConfigError, match=r"\['a'\].*\['b'\]"):
        require_uniform_privacy([dp, plain])


# ----- DP-SGD through the frozen SAM -------------------------------------------------------------
def test_one_dp_step_trains_g_only_and_leaves_sam_untouched(tiny_sam):
    model = _dp_model(tiny_sam)
    ds = _items(model, 4)
    sam_before = {k: v.clone() for k, v in tiny_sam.state_dict().items()}
    g_before = {k: v.clone() for k, v in model.prompt_generator.state_dict().items()}
    ledger = PrivacyLedger(None)
    stats = dp_train_epochs(model, ds, epochs=1, batch_size=4, noise_multiplier=1.0, max_grad_norm=1.0,
                            ledger=ledger, insecure_seed=0)
    assert (stats["steps"], stats["samples"], stats["empty_steps"]) == (1, 4, 0)
    assert math.isfinite(stats["loss"]) and stats["loss"] > 0
    g_after = model.prompt_generator.state_dict()
    assert all(not torch.equal(g_after[k], v) for k, v in g_before.items())
    sam_after = tiny_sam.state_dict()
    assert sam_after.keys() == sam_before.keys()
    assert all(torch.equal(sam_after[k], v) for k, v in sam_before.items())
    assert not tiny_sam.training and not any(m.training for m in tiny_sam.modules())
    assert _no_hooks(tiny_sam) == [] and _no_hooks(model.prompt_generator) == []
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    assert all(p.grad is None for p in tiny_sam.parameters())
    assert ledger.steps == 1 and 0 < ledger.spent_epsilon(1e-5) < math.inf


def test_per_sample_gradients_only_for_g_and_independent_across_samples(tiny_sam):
    model = _dp_model(tiny_sam)
    a, b, c = _items(model, 3, seed=3)
    g_names = [n for n, p in model.prompt_generator.named_parameters()]
    grads_ab = per_sample_gradients(model, default_collate([a, b]))
    assert sorted(grads_ab) == sorted(g_names)
    g_params = dict(model.prompt_generator.named_parameters())
    assert all(v.shape == (2, *g_params[n].shape) for n, v in grads_ab.items())
    assert all(not hasattr(p, "grad_sample") and p.grad is None for p in tiny_sam.parameters())
    assert _no_hooks(tiny_sam) == [] and _no_hooks(model.prompt_generator) == []
    # Sample 0's gradient does not depend on who else is in the batch (GroupNorm, per-sample decode).
    grads_ac = per_sample_gradients(model, default_collate([a, c]))
    for n in g_names:
        assert torch.allclose(grads_ab[n][0], grads_ac[n][0], rtol=1e-5, atol=1e-7), n
    assert any(not torch.allclose(grads_ab[n][1], grads_ac[n][1]) for n in g_names)
    # ... and the per-sample gradients average to the ordinary gradient of the batch-mean loss.
    from autosam_core.training import masked_loss_and_dice

    batch = default_collate([a, b])
    loss, _ = masked_loss_and_dice(model(batch["image_embeddings"], batch["g_input"]), batch["target"],
                                   batch["valid"])
    loss.backward()
    for n, p in g_params.items():
        assert torch.allclose(grads_ab[n].mean(0), p.grad, rtol=1e-4, atol=1e-6), n
    model.zero_grad(set_to_none=True)


def test_fedprox_under_dp_runs(fast_sam):
    model = _dp_model(fast_sam)
    stats = dp_train_epochs(model, _items(model, 4), epochs=2, batch_size=2, noise_multiplier=1.0,
                            max_grad_norm=1.0, proximal_mu=0.1, insecure_seed=1)
    assert stats["steps"] == 4 and math.isfinite(stats["loss"])


# ----- a site over several rounds -------------------------------------------------------------------
def _write_site(root, n: int) -> None:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "images" / f"im{i:02d}.png")
        mask = np.zeros((32, 32), np.uint8)
        mask[8:20, 4 + i % 10:20 + i % 10] = 255
        Image.fromarray(mask).save(root / "masks" / f"im{i:02d}.png")


def _seed_with_empty_batch(n: int, q: float, steps: int) -> int:
    """A sampling seed whose Poisson batches (Opacus UniformWithReplacementSampler) include an empty one."""
    for seed in range(100):
        gen = torch.Generator().manual_seed(seed)
        if any(int((torch.rand(n, generator=gen) < q).sum()) == 0 for _ in range(steps)):
            return seed
    raise AssertionError("no seed with an empty batch")


def test_site_with_empty_poisson_batches_resumes_its_accountant(fast_sam, tmp_path):
    _write_site(tmp_path / "data", 40)
    site = SiteConfig(site_id="s40", data=DataRef(dataset=str(tmp_path / "data")), batch_size=2, local_epochs=1,
                      augmentation="none", cache_dir=str(tmp_path / "cache"),
                      privacy=PrivacyConfig(target_epsilon=4.0, delta=1e-3, planned_rounds=2))
    state_dir = tmp_path / "state"
    seed = _seed_with_empty_batch(40, 0.05, 20)

    trainer = DPSiteTrainer(_dp_model(fast_sam), site, state_dir=state_dir, progress=False)
    assert trainer.sample_rate == 0.05 and trainer.steps_per_epoch == 20
    r1 = trainer.fit(1, insecure_seed=seed)
    assert r1["skip_reason"] is None and r1["num_examples"] == 40
    assert r1["steps"] == 20 and r1["empty_steps"] > 0
    assert 0 < r1["samples"] < 80  # records drawn over 20 Poisson batches (about 40 expected)
    assert trainer.ledger.steps == 20  # every step counted, the empty ones included
    saved = json.loads((state_dir / "privacy-s40.json").read_text())
    assert sum(s for *_, s in saved["history"]) == 20 and saved["mechanism"] == "rdp"
    eps1 = r1["epsilon"]
    assert 0 < eps1 <= 4.0

    # Round 2 in a "fresh process": new model and trainer, the accountant restored from the file.
    trainer2 = DPSiteTrainer(_dp_model(fast_sam), site, state_dir=state_dir, progress=False)
    assert trainer2.ledger.steps == 20 and trainer2.spent_epsilon() == pytest.approx(eps1)
    r2 = trainer2.fit(1, insecure_seed=seed + 1)
    assert r2["steps"] == 20 and trainer2.ledger.steps == 40
    assert eps1 < r2["epsilon"] <= 4.0

    # Round 3 would exceed the target: nothing is trained and the reply says why.
    trainer3 = DPSiteTrainer(_dp_model(fast_sam, seed=5), site, state_dir=state_dir, progress=False)
    assert trainer3.would_exceed(1)
    before = {k: v.clone() for k, v in trainer3.model.trainable_state().items()}
    r3 = trainer3.fit(1)
    assert r3["num_examples"] == 0 and r3["steps"] == 0 and "target epsilon 4.0" in r3["skip_reason"]
    assert r3["epsilon"] == pytest.approx(r2["epsilon"])
    assert all(torch.equal(v, trainer3.model.trainable_state()[k]) for k, v in before.items())
    assert trainer3.ledger.steps == 40


def test_budget_check_never_writes_the_ledger(fast_sam, tmp_path):
    import os

    _write_site(tmp_path / "data", 40)
    site = SiteConfig(site_id="ro", data=DataRef(dataset=str(tmp_path / "data")), batch_size=2, local_epochs=1,
                      augmentation="none", cache_dir=str(tmp_path / "cache"),
                      privacy=PrivacyConfig(target_epsilon=4.0, delta=1e-3, planned_rounds=2))
    state_dir = tmp_path / "state"
    path = state_dir / "privacy-ro.json"
    # No ledger yet: answering calibrates sigma for the answer only; nothing is written or stored.
    fresh = DPSiteTrainer(_dp_model(fast_sam), site, state_dir=state_dir, progress=False)
    assert fresh.would_exceed(1) is False
    assert not path.exists() and fresh.ledger.noise_multiplier is None
    # Ledgers from another sample rate (0.5; the site's is 0.05), so that answering recalibrates sigma
    # (in memory only): one far from its budget (epsilon 0.49 at delta 1e-3), one past it.
    for steps, expected in ((3, False), (400, True)):
        old = PrivacyLedger(path)
        old.history = []
        old.noise_multiplier, old.sample_rate, old.planned_steps = 5.0, 0.5, 6
        old.record(5.0, 0.5, steps)
        old.save()
        os.utime(path, ns=(1_000_000_000, 1_000_000_000))
        before_bytes, before_mtime = path.read_bytes(), path.stat().st_mtime_ns
        trainer = DPSiteTrainer(_dp_model(fast_sam), site, state_dir=state_dir, progress=False)
        assert trainer.would_exceed(1) is expected
        assert path.read_bytes() == before_bytes and path.stat().st_mtime_ns == before_mtime == 1_000_000_000
        assert (trainer.ledger.noise_multiplier, trainer.ledger.sample_rate) == (5.0, 0.5)

def test_dp_site_refuses_batchnorm_g(fast_sam, tmp_path):
    _write_site(tmp_path / "data", 4)
    site = SiteConfig(site_id="bn", data=DataRef(dataset=str(tmp_path / "data")),
                      privacy=PrivacyConfig(noise_multiplier=1.0))
    with pytest.raises(DPCompatibilityError, match="norm"):
        DPSiteTrainer(AutoSam(fast_sam, TinyG(), g_input_size=64), site, state_dir=tmp_path, progress=False)


# ----- tiny sites, delta, ledger ---------------------------------------------------------------------
def test_tiny_site_clamps_sample_rate_and_warns(fast_sam):
    with pytest.warns(PrivacyWarning, match="clamped to 1.0"):
        assert poisson_sample_rate(5, 8) == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert poisson_sample_rate(40, 2) == 0.05 and poisson_sample_rate(45, 10) == 0.2
    with pytest.raises(ConfigError):
        poisson_sample_rate(0, 8)
    sigma = calibrate_noise_multiplier(3.0, 1e-3, 1.0, 10)  # no "math domain error" at q = 1
    assert 0 < sigma < math.inf
    model = _dp_model(fast_sam)
    ledger = PrivacyLedger(None)
    with pytest.warns(PrivacyWarning, match="clamped"):
        stats = dp_train_epochs(model, _items(model, 5), epochs=1, batch_size=8, noise_multiplier=sigma,
                                max_grad_norm=1.0, ledger=ledger, insecure_seed=0)
    assert (stats["steps"], stats["samples"], stats["sample_rate"]) == (1, 5, 1.0)
    assert ledger.history == [(sigma, 1.0, 1)] and math.isfinite(ledger.spent_epsilon(1e-3))


def test_delta_at_least_one_over_n_warns():
    with pytest.warns(PrivacyWarning, match="1/N"):
        check_delta(0.2, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_delta(1e-3, 5)


def test_ledger_persists_and_bounds_the_budget(tmp_path):
    path = tmp_path / "privacy-x.json"
    led = PrivacyLedger(path)
    assert led.spent_epsilon(1e-5) == 0.0 and led.steps == 0
    led.noise_multiplier, led.sample_rate = 1.1, 0.05
    led.record(1.1, 0.05, 30)
    led.record(1.1, 0.05, 10)
    led.save()
    again = PrivacyLedger(path)
    assert again.history == [(1.1, 0.05, 40)] and again.steps == 40
    eps = again.spent_epsilon(1e-5)
    assert not again.would_exceed(eps + 1e-9, 1e-5, 0)
    assert again.would_exceed(eps, 1e-5, 1) and not again.would_exceed(eps * 10, 1e-5, 1)
    prv = PrivacyLedger(None, mechanism="prv")
    prv.record(1.1, 0.05, 40)
    assert 0 < prv.spent_epsilon(1e-5) < eps  # PRV (Gopi et al. 2021) is tighter than RDP here
    with pytest.raises(PrivacyLedgerError, match="rdp"):
        PrivacyLedger(path, mechanism="prv")
    path.write_text("{not json")
    with pytest.raises(PrivacyLedgerError, match="unreadable"):
        PrivacyLedger(path)
