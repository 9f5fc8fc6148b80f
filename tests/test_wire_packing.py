"""g's state travels packed: one Flower Array per dtype plus a layout (autosam_fl.transfer, issue 12)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

import server  # noqa: F401  (imports flwr's CLI deps quietly)
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import Metadata

from autosam_fl import protocol as P
from autosam_fl.transfer import (LAYOUT_KEY, PACKED_KEY, WireFormatError, from_wire, pack_arrays, to_wire,
                                 unpack_arrays)


def _mixed() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {"prompt_generator.conv.weight": rng.standard_normal((8, 4, 3, 3)).astype(np.float32),
            "prompt_generator.bn.num_batches_tracked": np.array(5, dtype=np.int64),  # 0-d, as BatchNorm keeps it
            "prompt_generator.bits": rng.integers(0, 2**16, 7, dtype=np.uint16),
            "prompt_generator.empty": np.zeros((0, 3), np.float32),
            "prompt_generator.bn.running_var": rng.random(8).astype(np.float32)}


def test_pack_round_trip_is_bit_exact_in_key_order_with_one_array_per_dtype():
    state = _mixed()
    wire = pack_arrays(state)
    assert sorted(wire) == sorted([LAYOUT_KEY] + [PACKED_KEY.format(dtype=d) for d in ("float32", "int64", "uint16")])
    assert wire[PACKED_KEY.format(dtype="float32")].shape == (8 * 4 * 9 + 0 + 8,)
    back = unpack_arrays(wire)
    assert list(back) == list(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        assert back[k].tobytes() == v.tobytes(), k
    layout = json.loads(wire[LAYOUT_KEY].tobytes())
    assert layout[1] == ["prompt_generator.bn.num_batches_tracked", [], "int64"]


def test_tiny_model_of_254_tensors_travels_as_three_arrays_and_comes_back_equal():
    from autosam_core.config import ModelConfig, SamConfig
    from autosam_core.model_factory import build_autosam

    # a g with many small tensors (timm's MobileNetV3: 254), where one Flower Array per tensor cost most
    state = build_autosam(SamConfig(kind="tiny"), ModelConfig(backbone="timm:mobilenetv3_small_050",
                                                              g_input_size=64)).trainable_state()
    assert len(state) > 200
    for dtype in ("float32", "bfloat16"):
        rec = to_wire(state, dtype)
        assert len(rec) == 3, sorted(rec)  # layout, floats (float32 or bfloat16 bits), int64 counters
        back = from_wire(rec, dtype, reference={k: v.numpy() for k, v in state.items()})
        assert list(back) == list(state)
        for k, v in state.items():
            tol = 0.0 if dtype == "float32" or not v.dtype.is_floating_point else 2.0 ** -8
            np.testing.assert_allclose(back[k], v.numpy(), rtol=tol, atol=1e-30, err_msg=k)


def test_a_record_built_per_key_by_hand_reads_the_same():
    state = _mixed()
    rec = ArrayRecord({k: Array(v) for k, v in state.items()})
    back = unpack_arrays(rec)
    assert list(back) == list(state) and all(np.array_equal(back[k], state[k]) for k in state)


def _tampered(change) -> dict[str, np.ndarray]:
    wire = pack_arrays(_mixed())
    change(wire)
    return wire


F32 = PACKED_KEY.format(dtype="float32")


@pytest.mark.parametrize("change,message", [
    (lambda w: w.__setitem__(F32, np.concatenate([w[F32], np.ones(4, np.float32)])),
     r"'__packed_float32__' holds 300 values, its layout accounts for 296"),
    (lambda w: w.__setitem__(F32, w[F32][:-1]), r"'prompt_generator.bn.running_var' \(8,\) needs values 288..296 of "
                                                  r"'__packed_float32__', which holds 295"),
    (lambda w: w.pop(PACKED_KEY.format(dtype="int64")), r"'prompt_generator.bn.num_batches_tracked' is int64 but the record "
                                                         r"holds no '__packed_int64__'"),
    (lambda w: w.__setitem__("hidden", np.ones(3, np.float32)), r"1 array\(s\) its layout does not name, first 'hidden'"),
    (lambda w: w.__setitem__(LAYOUT_KEY, np.frombuffer(b"[1, 2", np.uint8)), r"not UTF-8 JSON"),
    (lambda w: w.__setitem__(LAYOUT_KEY, np.frombuffer(json.dumps([["a", [2], "float32"], ["a", [2], "float32"]])
                                                       .encode(), np.uint8)), r"names array 'a' twice"),
    (lambda w: w.__setitem__(LAYOUT_KEY, np.frombuffer(json.dumps([["a", [-1], "float32"]]).encode(), np.uint8)),
     r"entry 0 must be \[key, \[dims >= 0\], numeric dtype name\]"),
    (lambda w: w.__setitem__(F32, w[F32].astype(np.float64)), r"'__packed_float32__' must be 1-D float32, found float64"),
])
def test_a_packed_record_that_does_not_match_its_layout_is_refused_by_name(change, message):
    with pytest.raises(WireFormatError, match=message):
        unpack_arrays(_tampered(change))


def _reply(node: int, site: str, arrays: dict[str, np.ndarray]) -> Message:
    meta = Metadata(run_id=1, message_id=f"r{node}-{time.time_ns()}", src_node_id=node, dst_node_id=0,
                    reply_to_message_id="x", group_id="", created_at=time.time(), ttl=3600.0, message_type="train")
    content = RecordDict({P.ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          P.METRICS: MetricRecord({P.NUM_EXAMPLES: 10, "train_loss": 0.5, "train_dice": 0.5}),
                          P.SITE: ConfigRecord({P.SITE_ID: site})})
    return Message(content, metadata=meta)


def test_server_rejects_a_reply_with_values_its_layout_hides_and_averages_the_honest_one():
    from server.strategy import AutoSamFedAvg

    ref = {k: v for k, v in _mixed().items() if k != "prompt_generator.bits"}
    strat = AutoSamFedAvg(min_sites=1)
    strat._global_ref = ref
    honest = pack_arrays(ref)
    smuggled = pack_arrays(ref)
    smuggled[F32] = np.concatenate([smuggled[F32], np.full(16, 7.0, np.float32)])
    out, _ = strat.aggregate_train(1, [_reply(1, "A", honest), _reply(2, "B", smuggled)])
    assert "its layout accounts for" in strat.reports[1].failed["B"]
    assert strat.reports[1].sites.keys() == {"A"}
    np.testing.assert_array_equal(out["prompt_generator.conv.weight"].numpy(), ref["prompt_generator.conv.weight"])


def test_audit_blocks_packed_arrays_with_values_the_layout_does_not_name():
    from client.audit import check_arrays

    state = {k: v for k, v in _mixed().items() if k != "prompt_generator.bits"}
    expected = {k: (tuple(v.shape), v.dtype.name) for k, v in state.items()}
    assert check_arrays(pack_arrays(state), expected) == []
    wire = pack_arrays(state)
    wire[F32] = np.concatenate([wire[F32], np.ones(5, np.float32)])
    problems = check_arrays(wire, expected)
    assert len(problems) == 1 and "do not match their layout" in problems[0] and "accounts for" in problems[0]
    renamed = pack_arrays({("sam.image_encoder.w" if k == "prompt_generator.conv.weight" else k): v for k, v in state.items()})
    assert any("'sam.image_encoder.w'" in p for p in check_arrays(renamed, expected))


def test_audit_allows_only_fixed_device_and_precision_texts_in_the_site_record():
    from client.audit import check_site_record

    assert check_site_record({P.SITE_ID: "a", P.DEVICE: "cuda", P.PRECISION: "bf16"}, "a") == []
    bad = check_site_record({P.SITE_ID: "a", P.DEVICE: "cuda:1", P.PRECISION: "int8"}, "a")
    assert len(bad) == 2 and "'device'" in bad[0] and "'precision'" in bad[1]
    bad = check_site_record({P.SITE_ID: "a", P.DEVICE: "gpu-node-07.hospital.local"}, "a")  # a host name never leaves
    assert len(bad) == 1 and "not one of ['cpu', 'cuda']" in bad[0]
