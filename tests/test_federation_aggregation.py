"""Server-side FedAvg on synthetic arrays and synthetic Flower replies (no training, no processes).

Three sites with 900, 100 and 0 training images: the global weights are exactly
numpy.average(..., weights=[900, 100, 0]) = 0.9 w_A + 0.1 w_B, the empty site is ignored, nothing
is NaN, BatchNorm counters stay int64, and a round where every reply has 0 examples keeps the
previous model. Failing sites are logged with their site id and error text; too few successful
sites stop the run with a clear error.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest

import server  # noqa: F401  (imports flwr's CLI deps quietly; see server/__init__.py)
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common import Metadata

from server.aggregation import AggregationError, check_state, weighted_average
from server.strategy import AutoSamFedAvg, AutoSamFedProx, MinSitesError, build_strategy

KEYS = ("prompt_generator.conv.weight", "prompt_generator.bn.running_mean", "prompt_generator.bn.num_batches_tracked",
        "surrogate_decoder.deconv.bias")


def _state(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        KEYS[0]: rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        KEYS[1]: rng.standard_normal(4).astype(np.float32),
        KEYS[2]: np.array(10 * (seed + 1), dtype=np.int64),
        KEYS[3]: rng.standard_normal(2).astype(np.float32),
    }


def test_weighted_average_900_100_0_equals_numpy_average():
    a, b, c = _state(0), _state(1), _state(2)
    out = weighted_average([a, b, c], [900, 100, 0])
    c_nan = {k: (np.full_like(v, np.nan) if v.dtype.kind == "f" else v) for k, v in c.items()}
    out_nan = weighted_average([a, b, c_nan], [900, 100, 0])  # an empty site's arrays never matter
    for k in KEYS:
        np.testing.assert_array_equal(out_nan[k], out[k])
    for k in KEYS:
        ref = np.average(np.stack([a[k], b[k], c[k]]).astype(np.float64), axis=0, weights=[900, 100, 0])
        if a[k].dtype == np.int64:
            ref = np.rint(ref)
        np.testing.assert_array_equal(out[k], ref.astype(a[k].dtype))
        assert out[k].dtype == a[k].dtype and out[k].shape == a[k].shape
        np.testing.assert_allclose(out[k], 0.9 * a[k] + 0.1 * b[k], rtol=1e-6, atol=1e-6)
        assert np.all(np.isfinite(out[k]))
    assert out[KEYS[2]].dtype == np.int64 and int(out[KEYS[2]]) == 11  # rint(0.9*10 + 0.1*20)


def test_weighted_average_rejects_all_zero_and_bad_weights():
    with pytest.raises(AggregationError, match="every weight is 0"):
        weighted_average([_state(0), _state(1)], [0, 0])
    with pytest.raises(AggregationError, match=">= 0"):
        weighted_average([_state(0)], [-1])
    with pytest.raises(AggregationError, match="finite"):
        weighted_average([_state(0)], [float("nan")])
    bad = _state(1)
    bad[KEYS[0]] = np.zeros((4, 3, 3, 1), np.float32)
    with pytest.raises(AggregationError, match=r"shape \(4, 3, 3, 1\).*\(4, 3, 3, 3\)"):
        weighted_average([_state(0), bad], [1, 1])


def test_check_state_rejects_sam_keys_nan_and_shape():
    s = _state(0)
    assert check_state(s, _state(1)) is None
    assert "not part of the trainable state" in check_state({**s, "sam.image_encoder.x": np.zeros(1)})
    nan = _state(0)
    nan[KEYS[1]][0] = np.nan
    assert "non-finite" in check_state(nan)
    assert "missing key" in check_state({k: v for k, v in s.items() if k != KEYS[3]}, _state(1))


# ----- strategy on synthetic Flower messages ------------------------------------------------------
_mid = iter(range(1, 10**6))


def _meta(src: int) -> Metadata:
    return Metadata(run_id=1, message_id=f"m{next(_mid)}", src_node_id=src, dst_node_id=0, reply_to_message_id="x",
                    group_id="", created_at=time.time(), ttl=3600.0, message_type="train")


def _reply(node: int, site: str, state: dict, n: float) -> Message:
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in state.items()}),
                          "metrics": MetricRecord({"num-examples": n, "train_loss": 0.5, "train_dice": 0.5}),
                          "site": ConfigRecord({"site-id": site})})
    return Message(content, metadata=_meta(node))


def _error(node: int, reason: str) -> Message:
    return Message(error=Error(code=0, reason=reason), metadata=_meta(node))


def _to_np(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def test_strategy_aggregates_900_100_0_and_ignores_empty_site(caplog):
    strat = AutoSamFedAvg(min_sites=2)
    strat._global_ref = _state(5)
    a, b, c = _state(0), _state(1), _state(2)
    with caplog.at_level(logging.WARNING, logger="autosam.server"):
        arrays, metrics = strat.aggregate_train(1, [_reply(1, "A", a, 900), _reply(2, "B", b, 100),
                                                    _reply(3, "C", c, 0)])
    out = _to_np(arrays)
    for k in KEYS:
        ref = np.average(np.stack([a[k], b[k]]).astype(np.float64), axis=0, weights=[900, 100])
        np.testing.assert_array_equal(out[k], (np.rint(ref) if a[k].dtype == np.int64 else ref).astype(a[k].dtype))
        assert out[k].dtype == a[k].dtype
    assert metrics["num_sites"] == 2
    rep = strat.reports[1]
    assert rep.aggregated and "C" in rep.ignored and rep.sites["C"]["num_examples"] == 0
    assert "site C sent 0 examples" in caplog.text
    assert all(rep.reply_keys_ok.values())


def test_all_zero_round_keeps_previous_model(caplog):
    strat = AutoSamFedAvg(min_sites=2)
    with caplog.at_level(logging.WARNING, logger="autosam.server"):
        arrays, metrics = strat.aggregate_train(3, [_reply(1, "A", _state(0), 0), _reply(2, "B", _state(1), 0)])
    assert arrays is None and metrics is None  # Flower's start() then keeps the previous global arrays
    assert "every reply has 0 training examples; keeping the previous global model" in caplog.text
    assert not strat.reports[3].aggregated


def test_failed_site_is_logged_with_id_and_text_and_survivors_aggregated(caplog):
    strat = AutoSamFedAvg(min_sites=2)
    reason = ("<class 'RayTaskError'>: Traceback ...\nRuntimeError: [site B] round 2: InjectedFault: disk on fire\n"
              "more traceback")
    with caplog.at_level(logging.ERROR, logger="autosam.server"):
        arrays, _ = strat.aggregate_train(2, [_reply(1, "A", _state(0), 10), _error(2, reason),
                                              _reply(3, "C", _state(2), 30)])
    assert arrays is not None
    assert "site B (node 2) failed: round 2: InjectedFault: disk on fire" in caplog.text
    assert strat.reports[2].failed == {"B": "round 2: InjectedFault: disk on fire"}
    assert set(strat.reports[2].sites) == {"A", "C"}


def test_min_sites_unmet_and_all_failed_raise_clear_errors():
    strat = AutoSamFedAvg(min_sites=3)
    with pytest.raises(MinSitesError, match=r"round 2: 2 of the required 3 sites.*B: round 2: RuntimeError: boom"):
        strat.aggregate_train(2, [_reply(1, "A", _state(0), 10), _error(2, "[site B] round 2: RuntimeError: boom"),
                                  _reply(3, "C", _state(2), 30)])
    strat = AutoSamFedAvg(min_sites=1)
    with pytest.raises(MinSitesError, match="0 of the required 1"):
        strat.aggregate_train(1, [_error(1, "[site A] round 1: X: a"), _error(2, "[site B] round 1: X: b")])


def test_reply_with_sam_key_or_nan_is_rejected_not_averaged(caplog):
    strat = AutoSamFedAvg(min_sites=1)
    strat._global_ref = _state(0)
    leaky = {**_state(1), "sam.image_encoder.patch_embed.weight": np.zeros(3, np.float32)}
    nan = _state(2)
    nan[KEYS[0]][0, 0, 0, 0] = np.inf
    good = _state(3)
    with caplog.at_level(logging.ERROR, logger="autosam.server"):
        arrays, _ = strat.aggregate_train(1, [_reply(1, "leaky", leaky, 5), _reply(2, "nan", nan, 5),
                                              _reply(3, "good", good, 5)])
    out = _to_np(arrays)
    for k in KEYS:
        np.testing.assert_array_equal(out[k], good[k])
    rep = strat.reports[1]
    assert rep.reply_keys_ok == {"leaky": False, "nan": True, "good": True}
    assert "not part of the trainable state" in rep.failed["leaky"] and "non-finite" in rep.failed["nan"]


def test_build_strategy_names():
    assert isinstance(build_strategy("fedavg", 0.0, min_sites=2), AutoSamFedAvg)
    prox = build_strategy("fedprox", 0.01, min_sites=2)
    assert isinstance(prox, AutoSamFedProx) and prox.proximal_mu == 0.01
    with pytest.raises(ValueError, match="fedavg or fedprox"):
        build_strategy("fedsgd", 0.0)


def test_first_round_waits_for_start_sites_later_rounds_for_min_sites(monkeypatch):
    """start_sites (default: every listed site) gates round 1; min_sites gates later rounds."""
    strat = AutoSamFedAvg(min_sites=1, start_sites=2, round_timeout=0.01)
    needed = []
    monkeypatch.setattr(strat, "_wait_for_nodes", lambda grid, rnd, n: needed.append(n) or (_ for _ in ()).throw(
        MinSitesError("stop")))
    for rnd in (1, 2):
        with pytest.raises(MinSitesError):
            strat.configure_train(rnd, ArrayRecord({}), ConfigRecord({}), grid=None)
    assert needed == [2, 1]
    assert AutoSamFedAvg(min_sites=2, start_sites=1).start_sites == 2  # never below min_sites
