"""The ClientApp's train/evaluate handlers called directly (tiny SAM, small g, synthetic data).

SAM weights never leave the site: every reply key starts with prompt_generator./surrogate_decoder.;
BatchNorm buffers round-trip with shape and dtype (num_batches_tracked int64); num-examples counts
training samples; the model is built once per process; a failing site raises an error tagged with
its site id.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

import client  # noqa: F401  (imports flwr's CLI deps quietly; see client/__init__.py)
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import Metadata

from client import app as client_app
from client import protocol as P
from tests.fault_injection import inject as inject_fault
from tests.fl_helpers import TINY_MODEL, make_federation

TRAINABLE = ("prompt_generator.", "surrogate_decoder.")


def _instruction(state, node: int, rnd: int, message_type: str = "train", model: dict | None = None,
                 **extra) -> Message:
    cfg = ConfigRecord({P.SERVER_ROUND: rnd, P.SAM_KIND: "tiny",
                        P.MODEL_CONFIG: json.dumps(model or TINY_MODEL), P.SEED: 0, P.LOCAL_EPOCHS: 1, **extra})
    meta = Metadata(run_id=1, message_id=f"ins-{node}-{rnd}-{time.time_ns()}", src_node_id=0, dst_node_id=node,
                    reply_to_message_id="", group_id="", created_at=time.time(), ttl=3600.0, message_type=message_type)
    return Message(RecordDict({P.ARRAYS: ArrayRecord(state), P.CONFIG: cfg}), metadata=meta)


def _context(node: int, node_config: dict, run_config: dict | None = None) -> Context:
    return Context(run_id=1, node_id=node, node_config=node_config, state=RecordDict(), run_config=run_config or {})


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("client")
    fed = make_federation(tmp, sites={"site_a": 3, "site_b": 2}, val_fraction=0.34)
    return tmp, fed


@pytest.fixture(scope="module")
def initial_state():
    from autosam_core.config import ModelConfig, SamConfig
    from autosam_core.model_factory import build_autosam

    return build_autosam(SamConfig(kind="tiny"), ModelConfig(**TINY_MODEL)).trainable_state()


def test_train_reply_holds_only_trainable_state_with_dtypes(federation, initial_state, monkeypatch):
    tmp, _ = federation
    monkeypatch.setenv("AUTOSAM_CACHE", str(tmp / "cache"))
    site_yaml = tmp / "sites" / "site_a.yaml"
    reply = client_app.train(_instruction(initial_state, 7, 1), _context(7, {P.NODE_SITE_CONFIG: str(site_yaml)}))
    assert not reply.has_error()
    content = reply.content
    assert len(content.array_records) == 1 and len(content.metric_records) == 1
    assert len(content[P.ARRAYS]) == 3  # packed: layout, float32 values, int64 counters (autosam_fl.transfer)
    got = client_app.received_state(content[P.ARRAYS], "float32")
    bad = [k for k in got if not k.startswith(TRAINABLE)]
    assert bad == [], f"keys that must never leave the site: {bad[:5]}"
    assert list(got) == list(initial_state)
    for k, v in initial_state.items():
        assert got[k].shape == v.shape and got[k].dtype == v.dtype, k
    nbt = [k for k in got if k.endswith("num_batches_tracked")]
    assert nbt and all(got[k].dtype == torch.int64 for k in nbt)
    assert any(int(got[k]) > int(initial_state[k]) for k in nbt)  # BN counters advanced by training
    metrics = content[P.METRICS]
    assert metrics[P.NUM_EXAMPLES] == 2  # 3 images, 1 held out for validation (val_fraction 0.34)
    assert set(metrics) >= {"train_loss", "train_dice", "train_seconds", "local_epochs"}
    assert content[P.SITE][P.SITE_ID] == "site_a"
    from autosam_core.precision import cpu_has_fast_bf16

    # the site reports where and in which precision it trained g (auto: bf16 only with bf16 units)
    assert content[P.SITE][P.DEVICE] == "cpu"
    assert content[P.SITE][P.PRECISION] == ("bf16" if cpu_has_fast_bf16() else "fp32")
    # built once per process: a second round reuses the same AutoSam (and SAM)
    models_before = dict(client_app._MODELS)
    client_app.train(_instruction(got, 7, 2), _context(7, {P.NODE_SITE_CONFIG: str(site_yaml)}))
    assert client_app._MODELS.keys() == models_before.keys()
    assert all(client_app._MODELS[k] is models_before[k] for k in models_before)


def test_simulation_partition_maps_to_site_and_evaluate(federation, initial_state, monkeypatch):
    tmp, fed = federation
    monkeypatch.setenv("AUTOSAM_CACHE", str(tmp / "cache"))
    ctx = _context(9, {"partition-id": 1, "num-partitions": 2}, {P.RUN_FEDERATION_CONFIG: str(fed)})
    assert client_app.resolve_site_yaml(ctx) == (tmp / "sites" / "site_b.yaml").resolve()
    reply = client_app.evaluate(_instruction(initial_state, 9, 1, "evaluate"), ctx)
    m = reply.content[P.METRICS]
    assert m[P.NUM_EXAMPLES] == 1 and 0.0 <= m["val_dice"] <= 1.0
    assert reply.content[P.SITE][P.SITE_ID] == "site_b"
    assert len(reply.content.array_records) == 0  # evaluation sends nothing of the model back


def test_failing_site_error_names_site(federation, initial_state, monkeypatch):
    tmp, _ = federation
    inject_fault(monkeypatch, "site_a@5")
    ctx = _context(7, {P.NODE_SITE_CONFIG: str(tmp / "sites" / "site_a.yaml")})
    with pytest.raises(RuntimeError) as info:
        client_app.train(_instruction(initial_state, 7, 5), ctx)
    site, text = P.parse_site_error(str(info.value))
    assert site == "site_a" and "round 5" in text and "InjectedFault" in text
    # a node that does not know its site fails with the fix in the message
    with pytest.raises(RuntimeError, match="site-config"):
        client_app.train(_instruction(initial_state, 8, 1), _context(8, {}))
    # a reply that does not fit the model (other backbone) is refused by the site, naming the key
    wrong = {k: v for k, v in list(initial_state.items())[1:]}
    with pytest.raises(RuntimeError, match="missing key"):
        client_app.train(_instruction(wrong, 7, 1), ctx)


def test_dp_site_uses_groupnorm_g_and_skips_when_budget_spent(tmp_path, monkeypatch):
    """A site with `privacy` builds a DP-compatible g (GroupNorm: no BatchNorm buffers travel) and trains
    with DPSiteTrainer; when its budget would be exceeded it replies with the unchanged global weights and
    num-examples 0 (which the server ignores); a DP setting that differs from the federation's is refused.
    (DP-SGD itself is tested in the core's privacy tests; it is too slow for this suite.)"""
    from autosam_core.config import ModelConfig, SamConfig
    from autosam_core.model_factory import build_autosam
    from autosam_core.privacy import DPSiteTrainer, make_autosam_private_compatible
    from tests.fl_helpers import make_dataset, write_yaml

    monkeypatch.setenv("AUTOSAM_CACHE", str(tmp_path / "cache"))
    make_dataset(tmp_path / "ds", 3, seed=5)
    site_yaml = write_yaml(tmp_path / "dp_site.yaml", {
        "site_id": "dp_site", "data": {"dataset": str(tmp_path / "ds")}, "batch_size": 2, "augmentation": "none",
        "privacy": {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5}})
    dp_model = {"backbone": "hardnet68", "g_input_size": 64}  # the DP conversion targets HarDNet's g
    model = make_autosam_private_compatible(build_autosam(SamConfig(kind="tiny"), ModelConfig(**dp_model)))
    state = model.trainable_state()
    assert not any("running_mean" in k or "num_batches_tracked" in k for k in state)
    ctx = _context(11, {P.NODE_SITE_CONFIG: str(site_yaml)})
    monkeypatch.setattr(DPSiteTrainer, "would_exceed", lambda self, epochs: True)
    reply = client_app.train(_instruction(state, 11, 1, model=dp_model, **{P.DP: True, P.PLANNED_ROUNDS: 2}), ctx)
    got = client_app.received_state(reply.content[P.ARRAYS], "float32")
    assert list(got) == list(state) and all(torch.equal(got[k], state[k]) for k in state)
    m = reply.content[P.METRICS]
    assert m[P.NUM_EXAMPLES] == 0 and "epsilon" in m and m["delta"] == 1e-5
    rt = next(r for r in client_app._SITES.values() if r.site.site_id == "dp_site")
    assert isinstance(rt.trainer, DPSiteTrainer)
    with pytest.raises(RuntimeError, match="key 'privacy'.*DP"):
        client_app.train(_instruction(state, 11, 1, model=dp_model, **{P.DP: False}), ctx)
