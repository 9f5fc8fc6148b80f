"""End-to-end on real Kvasir images with the embedded LiteMedSAM (no download, CPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from autosam_core.cli import main
from autosam_core.config import DataRef, ModelConfig, SamConfig
from autosam_core.data.cache import EmbeddingCache
from autosam_core.data.io import load_image
from autosam_core.data.dataset import resolve_pairs
from autosam_core.data.torch_dataset import AutoSamDataset, make_loader
from autosam_core.evaluation import evaluate_pairs
from autosam_core.model_factory import build_autosam
from autosam_core.training import masked_loss_and_dice, recalibrate_batchnorm

pytestmark = pytest.mark.e2e


def test_training_on_kvasir_lowers_the_loss(lite_sam, shared_data):
    torch.manual_seed(0)
    model = build_autosam(SamConfig(), ModelConfig(backbone="hardnet85"), sam=lite_sam)
    pairs = resolve_pairs(DataRef(dataset="Kvasir-SEG", split="pranet_train", limit=4))
    cache = EmbeddingCache(lite_sam)
    assert cache.ensure([p.image_path for p in pairs], load_image, progress=False)["computed"] == 4
    batch = next(iter(make_loader(AutoSamDataset(model, pairs, "none", cache), 4, shuffle=False)))
    opt = torch.optim.Adam(model.prompt_generator.parameters(), lr=3e-4, weight_decay=1e-5)
    losses = []
    model.train()
    for _ in range(6):
        loss, _ = masked_loss_and_dice(model(batch["image_embeddings"], batch["g_input"]), batch["target"], batch["valid"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.6 * losses[0], losses
    recalibrate_batchnorm(model, [batch])
    result = evaluate_pairs(model, pairs, cache)
    assert result["num_images"] == 4 and 0.0 < result["dice"] <= 1.0
    assert all(0 <= r.iou <= r.dice <= 1 for r in result["per_image"])


def test_cli_train_evaluate_predict_info(tmp_path, shared_data, capsys):
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"""
name: e2e
model: {{backbone: hardnet68, g_input_size: 256, surrogate: true}}
train: {{epochs: 2, batch_size: 3, augmentation: polyp, surrogate_epochs: 1, val_fraction: 0.25}}
train_data:
  - {{dataset: Kvasir-SEG, split: pranet_train, limit: 4}}
evaluate:
  - {{dataset: CVC-ClinicDB, split: pranet_test, limit: 2, name: ClinicDB}}
output_dir: {tmp_path / 'runs'}
""")
    assert main(["train", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "| ClinicDB | 2 |" in out
    run = tmp_path / "runs" / "e2e"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train_images"] == 3 and summary["val_images"] == 1
    assert len(summary["history"]) == 2 and (run / "training.png").is_file()
    ckpt = torch.load(run / "best.pt", weights_only=True)
    meta = ckpt["metadata"]
    assert meta["backbone"] == "hardnet68" and meta["sam_kind"] == "lite_medsam" and len(meta["config_hash"]) == 12
    assert any(k.startswith("surrogate_decoder.") for k in ckpt["trainable_state"])

    js = tmp_path / "eval.json"
    assert main(["evaluate", "--checkpoint", str(run / "best.pt"), "--data", "CVC-ClinicDB:pranet_test",
                 "--limit", "2", "--json", str(js)]) == 0
    res = json.loads(js.read_text())["results"]["CVC-ClinicDB/pranet_test"]
    assert res["num_images"] == 2 and 0 <= res["iou"] <= res["dice"] <= 1

    # predict: any size / format in, binary PNG at the original size out
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(load_image(shared_data / "Kvasir-SEG" / "images" / f"{resolve_pairs(DataRef(dataset='Kvasir-SEG', split='pranet_test', limit=1))[0].stem}.jpg")).save(src / "a.jpg")
    Image.fromarray(np.full((389, 517), 90, np.uint8)).save(src / "gray.png")
    assert main(["predict", "--checkpoint", str(run / "best.pt"), "--input", str(src), "--output", str(tmp_path / "pred")]) == 0
    gray = np.array(Image.open(tmp_path / "pred" / "masks" / "gray.png"))
    assert gray.shape == (389, 517) and set(np.unique(gray)) <= {0, 255}
    assert (tmp_path / "pred" / "overlays" / "a.png").is_file()

    capsys.readouterr()
    assert main(["info", "--json", "--backbone", "hardnet68"]) == 0
    info = json.loads(capsys.readouterr().out)
    for key in ("g_params", "h_params", "sam_params", "sam_trainable_params", "dense_prompt_shape", "sam_backbone"):
        assert key in info
    assert info["sam_trainable_params"] == 0 and info["dense_prompt_shape"] == ["B", 256, 64, 64]


def test_cli_reports_bad_config_cleanly(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("name: x\ntrain_data: [{dataset: No-Such-Dataset}]\n")
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "No-Such-Dataset" in err and "AUTOSAM_DATA" in err
