"""Sites own their files (the coordinator sends the SAM kind and weights fingerprint, never a path), and
self-describing checkpoints: a DP federation's checkpoint evaluates and predicts through the CLI."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict
from PIL import Image

from autosam_core.config import ModelConfig, SamConfig
from autosam_core.model_factory import build_autosam
from autosam_core.sam import load_frozen_sam
from autosam_fl import protocol as P
from client import app as client_app
from tests.fl_helpers import DP_MODEL, TINY_MODEL, make_dataset, make_federation, write_yaml


def _instruction(state, node: int, sam_weights: str) -> Message:
    cfg = ConfigRecord({P.SERVER_ROUND: 1, P.SAM_KIND: "tiny", P.SAM_WEIGHTS: sam_weights,
                        P.MODEL_CONFIG: json.dumps(TINY_MODEL), P.SEED: 0, P.LOCAL_EPOCHS: 1})
    meta = Metadata(run_id=1, message_id=f"ins-{node}-{time.time_ns()}", src_node_id=0, dst_node_id=node,
                    reply_to_message_id="", group_id="", created_at=time.time(), ttl=3600.0, message_type="train")
    return Message(RecordDict({P.ARRAYS: ArrayRecord(state), P.CONFIG: cfg}), metadata=meta)


@pytest.fixture()
def sam_files(tmp_path):
    """The coordinator's SAM file, a byte-identical copy at another path on the site, and other weights."""
    coord = tmp_path / "coordinator" / "sam_tiny.pth"
    coord.parent.mkdir(parents=True)
    torch.save(load_frozen_sam("tiny", seed=0).state_dict(), coord)
    same = tmp_path / "hospital" / "weights" / "my_sam.pth"
    same.parent.mkdir(parents=True)
    shutil.copy(coord, same)
    other = tmp_path / "hospital" / "weights" / "other_sam.pth"
    torch.save(load_frozen_sam("tiny", seed=1).state_dict(), other)
    return coord, same, other


def _site(tmp_path, name: str, checkpoint: str) -> object:
    make_dataset(tmp_path / f"ds_{name}", 3, seed=4)
    return write_yaml(tmp_path / "hospital" / f"{name}.yaml", {
        "site_id": name, "data": {"dataset": str(tmp_path / f"ds_{name}")}, "batch_size": 2,
        "augmentation": "none", "sam_checkpoint": checkpoint})


def test_site_trains_from_its_own_sam_path_and_refuses_other_weights(tmp_path, monkeypatch, sam_files):
    coord, _same, _other = sam_files
    monkeypatch.setenv("AUTOSAM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(client_app, "_SITES", {})
    monkeypatch.setattr(client_app, "_MODELS", {})
    fingerprint = load_frozen_sam("tiny", coord).weights_id
    state = build_autosam(SamConfig(kind="tiny"), ModelConfig(**TINY_MODEL)).trainable_state()

    good = _site(tmp_path, "good", "weights/my_sam.pth")  # relative to the site YAML; not the coordinator's path
    ctx = Context(run_id=1, node_id=3, node_config={P.NODE_SITE_CONFIG: str(good)}, state=RecordDict(), run_config={})
    reply = client_app.train(_instruction(state, 3, fingerprint), ctx)
    assert reply.content[P.METRICS][P.NUM_EXAMPLES] == 3
    model = next(iter(client_app._MODELS.values()))
    assert model.sam.weights_id == fingerprint
    assert torch.equal(model.sam.mask_decoder.state_dict()["output_upscaling.0.weight"],
                       torch.load(coord)["mask_decoder.output_upscaling.0.weight"])

    bad = _site(tmp_path, "bad", "weights/other_sam.pth")
    ctx = Context(run_id=1, node_id=4, node_config={P.NODE_SITE_CONFIG: str(bad)}, state=RecordDict(), run_config={})
    theirs = load_frozen_sam("tiny", tmp_path / "hospital" / "weights" / "other_sam.pth").weights_id
    with pytest.raises(RuntimeError) as err:
        client_app.train(_instruction(state, 4, fingerprint), ctx)
    msg = str(err.value)
    assert fingerprint in msg and theirs in msg and "weights/other_sam.pth" in msg and fingerprint != theirs


def test_server_instruction_carries_no_coordinator_path(tmp_path, sam_files):
    """The train instruction names the SAM kind and fingerprint; no value is a coordinator file path."""
    from server.runner import FederatedServer

    coord, _, _ = sam_files
    fed_yaml = make_federation(tmp_path, sites={"a": 2, "b": 2},
                               model={**TINY_MODEL, "pretrained": str(tmp_path / "coordinator" / "imagenet.pth")})
    raw = json.loads(json.dumps(__import__("yaml").safe_load(fed_yaml.read_text())))
    raw["sam"] = {"kind": "tiny", "checkpoint": str(coord)}
    write_yaml(fed_yaml, raw)
    server = FederatedServer(fed_yaml)
    server.model = build_autosam(SamConfig(kind="tiny", checkpoint=str(coord)),
                                 server.fed.model.model_copy(update={"pretrained": None}))
    server.dp = False
    cfg = server._model_config()
    assert cfg[P.SAM_WEIGHTS] == load_frozen_sam("tiny", coord).weights_id
    values = [str(v) for v in cfg.values()]
    assert not any(str(tmp_path) in v for v in values), values
    assert json.loads(str(cfg[P.MODEL_CONFIG]))["pretrained"] is None


@pytest.mark.parametrize("kind", ["dp", "fedprox", "plain"])
def test_federation_checkpoint_evaluates_and_predicts_through_the_cli(tmp_path, caplog, kind):
    """A federation's round checkpoint (written with the runner's metadata) rebuilds its g: the GroupNorm g
    of a DP federation, the BatchNorm g of a FedAvg or FedProx one."""
    from autosam_core.checkpoint import save_checkpoint
    from autosam_core.cli import main
    from autosam_fl.preflight import load_federation
    from server.runner import checkpoint_metadata

    priv = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5}
    options = {"a": {"privacy": priv}, "b": {"privacy": priv}} if kind == "dp" else None
    fed_yaml = make_federation(tmp_path, sites={"a": 2, "b": 2}, model=DP_MODEL, site_options=options)
    if kind == "fedprox":
        raw = __import__("yaml").safe_load(fed_yaml.read_text())
        raw["strategy"] = {"name": "fedprox", "mu": 0.01}
        write_yaml(fed_yaml, raw)
    fed, _ = load_federation(fed_yaml)
    assert fed.model.dp_compatible == (kind == "dp")
    model = build_autosam(fed.sam, fed.model)
    state = model.trainable_state()
    assert any("running_mean" in k for k in state) == (kind != "dp")  # GroupNorm: no BatchNorm buffers
    ckpt = save_checkpoint(tmp_path / "best.pt", state, checkpoint_metadata(fed, 1, state))

    data = tmp_path / "data" / "bench"
    assert main(["evaluate", "--checkpoint", str(ckpt), "--data", str(data), "--json", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())["results"]
    assert next(iter(result.values()))["num_images"] == 2
    out = tmp_path / "pred"
    with caplog.at_level("INFO", logger="autosam"):
        assert main(["predict", "--checkpoint", str(ckpt), "--input", str(data / "images"), "--output", str(out),
                     "--refine", "box_only"]) == 0
    assert "refinement box_only (checkpoint: none)" in caplog.text
    masks = sorted((out / "masks").glob("*.png"))
    assert len(masks) == 2
    m = np.asarray(Image.open(masks[0]))
    assert m.shape == np.asarray(Image.open(sorted((data / "images").glob("*.png"))[0])).shape[:2]
    assert set(np.unique(m)) <= {0, 255}
