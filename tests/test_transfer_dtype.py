"""transfer_dtype: g's arrays on the wire in bfloat16 / float16, averaged in float32 (issue 9, item 5)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import server  # noqa: F401  (imports flwr's CLI deps quietly)
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import Metadata

from autosam_fl import protocol as P
from autosam_fl.transfer import (TransferDtypeError, bfloat16_bits_to_float32, decode_state, encode_state,
                                 float32_to_bfloat16_bits, to_wire, unpack_arrays, wire_signature)
from server.strategy import AutoSamFedAvg, arrayrecord_nbytes, wire_record

W, B, N = "prompt_generator.conv.weight", "prompt_generator.bn.running_var", "prompt_generator.bn.num_batches_tracked"


def _state(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {W: rng.standard_normal((64, 32, 3, 3)).astype(np.float32),
            B: rng.random(64).astype(np.float32) + 0.5,
            N: np.array(7 + seed, dtype=np.int64)}


def test_bfloat16_bits_match_torch_rounding_and_specials():
    x = np.random.default_rng(0).standard_normal(10_000).astype(np.float32) * 10.0 ** np.arange(-20, 20, 0.004)[:10_000]
    x = np.concatenate([x, np.array([0.0, -0.0, np.inf, -np.inf, 3.4e38, 1e-40, 1.0 + 2**-8, 1.0 + 3 * 2**-8],
                                    dtype=np.float32)]).astype(np.float32)
    ours = float32_to_bfloat16_bits(x)
    ref = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(ours, ref)
    back = bfloat16_bits_to_float32(ours)
    np.testing.assert_array_equal(back, torch.from_numpy(x).to(torch.bfloat16).float().numpy())
    # ties go to even: 1 + 2**-8 is halfway between 1 and 1 + 2**-7 -> 1; 1 + 3*2**-8 -> 1 + 2**-6
    assert back[-2] == 1.0 and back[-1] == np.float32(1.0 + 2**-6)
    nan = bfloat16_bits_to_float32(float32_to_bfloat16_bits(np.array([np.nan, -np.nan], np.float32)))
    assert np.isnan(nan).all()
    finite = np.isfinite(x) & (np.abs(x) > 1e-37) & (np.abs(x) < 3e38)
    rel = np.abs(back[finite] - x[finite]) / np.abs(x[finite])
    assert rel.max() <= 2.0 ** -8


@pytest.mark.parametrize("dtype,wire,tol", [("float32", np.float32, 0.0), ("bfloat16", np.uint16, 2.0 ** -8),
                                            ("float16", np.float16, 2.0 ** -11)])
def test_encode_decode_round_trip_keeps_keys_shapes_and_int64(dtype, wire, tol):
    s = _state(0)
    enc = encode_state(s, dtype)
    assert list(enc) == list(s)
    assert enc[W].dtype == wire and enc[W].shape == s[W].shape
    assert enc[N].dtype == np.int64 and int(enc[N]) == 7  # integer buffers travel unchanged
    dec = decode_state(enc, dtype, reference=s)
    assert {k: v.dtype for k, v in dec.items()} == {W: np.float32, B: np.float32, N: np.int64}
    rel = np.abs(dec[W] - s[W]) / np.maximum(np.abs(s[W]), 1e-6)
    assert rel.max() <= tol
    assert wire_signature({W: ((64, 32, 3, 3), "float32"), N: ((), "int64")}, dtype) == \
        {W: ((64, 32, 3, 3), np.dtype(wire).name), N: ((), "int64")}


def test_decode_names_the_key_when_a_float_arrives_in_the_wrong_dtype():
    s = _state(0)
    with pytest.raises(TransferDtypeError, match=r"'prompt_generator.conv.weight'.*bfloat16.*uint16.*found float32"):
        decode_state(s, "bfloat16", reference=s)
    bad = encode_state(s, "float16")
    bad[N] = np.array(7.0, dtype=np.float16)
    with pytest.raises(TransferDtypeError, match=r"num_batches_tracked.*int64.*found float16"):
        decode_state(bad, "float16", reference=s)
    with pytest.raises(TransferDtypeError, match=r"one of \['float32', 'bfloat16', 'float16'\].*'int8'"):
        encode_state(s, "int8")


def _reply(node: int, site: str, arrays: dict[str, np.ndarray], n: float) -> Message:
    meta = Metadata(run_id=1, message_id=f"r{node}-{time.time_ns()}", src_node_id=node, dst_node_id=0,
                    reply_to_message_id="x", group_id="", created_at=time.time(), ttl=3600.0, message_type="train")
    content = RecordDict({P.ARRAYS: to_wire(arrays, "float32"),
                          P.METRICS: MetricRecord({P.NUM_EXAMPLES: n, "train_loss": 0.5, "train_dice": 0.5}),
                          P.SITE: ConfigRecord({P.SITE_ID: site})})
    return Message(content, metadata=meta)


def test_server_averages_bfloat16_replies_in_float32_and_counts_half_the_bytes():
    glob = _state(9)
    strat = AutoSamFedAvg(min_sites=2, transfer_dtype="bfloat16")
    strat._global_ref = glob
    a, b = _state(0), _state(1)
    out, _ = strat.aggregate_train(1, [_reply(1, "A", encode_state(a, "bfloat16"), 300),
                                       _reply(2, "B", encode_state(b, "bfloat16"), 100)])
    avg = {k: v.numpy() for k, v in out.items()}
    assert avg[W].dtype == np.float32 and avg[N].dtype == np.int64  # the global model stays float32
    da, db = (decode_state(encode_state(s, "bfloat16"), "bfloat16", s) for s in (a, b))
    np.testing.assert_allclose(avg[W], 0.75 * da[W] + 0.25 * db[W], rtol=1e-6, atol=1e-7)
    assert int(avg[N]) == 7  # rint(0.75 * 7 + 0.25 * 8 = 7.25)
    rep = strat.reports[1].sites["A"]
    f32 = arrayrecord_nbytes(ArrayRecord({k: Array(v) for k, v in a.items()}))
    assert rep["upload_bytes"] <= 0.51 * f32
    wire = wire_record(ArrayRecord({k: Array(v) for k, v in glob.items()}), "bfloat16")
    assert arrayrecord_nbytes(wire) <= 0.51 * f32 and unpack_arrays(wire)[W].dtype == np.uint16


def test_server_rejects_a_float32_reply_when_bfloat16_was_asked(caplog):
    strat = AutoSamFedAvg(min_sites=1, transfer_dtype="bfloat16")
    strat._global_ref = _state(9)
    out, _ = strat.aggregate_train(1, [_reply(1, "A", encode_state(_state(0), "bfloat16"), 10),
                                       _reply(2, "B", _state(1), 10)])
    assert "B" in strat.reports[1].failed and "must travel as uint16" in strat.reports[1].failed["B"]
    assert strat.reports[1].sites.keys() == {"A"}
    assert out[W].numpy().dtype == np.float32


def test_site_trains_from_bfloat16_arrays_and_replies_in_bfloat16(tmp_path, monkeypatch):
    """A site decodes the instruction's bfloat16 arrays, trains in float32 and narrows its reply; the
    reply audit checks the wire dtypes (uint16 for floats, int64 counters unchanged)."""
    import json

    from flwr.app import Context

    from autosam_core.config import ModelConfig, SamConfig
    from autosam_core.model_factory import build_autosam
    from client import app as client_app
    from tests.fl_helpers import TINY_MODEL, make_federation

    make_federation(tmp_path, sites={"site_a": 3}, val_fraction=0.34)
    monkeypatch.setenv("AUTOSAM_CACHE", str(tmp_path / "cache"))
    state = build_autosam(SamConfig(kind="tiny"), ModelConfig(**TINY_MODEL)).trainable_state()
    cfg = ConfigRecord({P.SERVER_ROUND: 1, P.SAM_KIND: "tiny", P.MODEL_CONFIG: json.dumps(TINY_MODEL), P.SEED: 0,
                        P.LOCAL_EPOCHS: 1, P.TRANSFER_DTYPE: "bfloat16"})
    meta = Metadata(run_id=1, message_id=f"ins-{time.time_ns()}", src_node_id=0, dst_node_id=3,
                    reply_to_message_id="", group_id="", created_at=time.time(), ttl=3600.0, message_type="train")
    msg = Message(RecordDict({P.ARRAYS: to_wire(state, "bfloat16"), P.CONFIG: cfg}),
                  metadata=meta)
    ctx = Context(run_id=1, node_id=3, state=RecordDict(), run_config={},
                  node_config={P.NODE_SITE_CONFIG: str(tmp_path / "sites" / "site_a.yaml"), P.NODE_AUDIT: True})
    reply = client_app.train(msg, ctx)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    got = unpack_arrays(reply.content[P.ARRAYS])
    assert list(got) == list(state)
    for k, v in state.items():
        want = np.int64 if not v.dtype.is_floating_point else np.uint16
        assert got[k].dtype == want and got[k].shape == tuple(v.shape), k
    dec = decode_state(got, "bfloat16", {k: v.numpy() for k, v in state.items()})
    moved = [k for k, v in state.items() if v.dtype.is_floating_point and not np.array_equal(dec[k], v.numpy())]
    assert moved  # the site trained from the decoded weights and sent its own back
    rec = json.loads(next((tmp_path).rglob("audit-site_a.json")).read_text())["replies"][-1]
    assert rec["verdict"] == "sent", rec
    # a float32 instruction into the same site still works (the default when the key is absent)
    cfg32 = ConfigRecord({k: v for k, v in cfg.items() if k != P.TRANSFER_DTYPE})
    msg32 = Message(RecordDict({P.ARRAYS: ArrayRecord(state), P.CONFIG: cfg32}), metadata=meta)
    reply32 = client_app.train(msg32, ctx)
    assert {v.dtype for v in unpack_arrays(reply32.content[P.ARRAYS]).values()} == {np.dtype(np.float32),
                                                                                    np.dtype(np.int64)}
