"""benchmarks/fed_emulation.py: in-process FedAvg gives per-round validation, the best round and its test Dice."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.fl_helpers import make_federation

REPO = Path(__file__).resolve().parents[1]


def test_two_rounds_of_two_tiny_sites(tmp_path):
    fed = make_federation(tmp_path, sites={"site_a": 4, "site_b": 2}, rounds=1, val_fraction=0.5)
    out = tmp_path / "emu.json"
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "fed_emulation.py"), str(fed), "--rounds", "2",
                          "--device", "cpu", "--json", str(out)], capture_output=True, text=True, timeout=600,
                         cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["rounds"] == 2 and [h["round"] for h in data["history"]] == [1, 2]
    for h in data["history"]:
        # site_a trains on 2 images (2 held out), site_b on 1: one local epoch of batch 2 is 1 step each
        assert {k: v["steps"] for k, v in h["sites"].items()} == {"site_a": 1, "site_b": 1}
        assert set(h["val_dice_per_site"]) == {"site_a", "site_b"}
        per_site = h["val_dice_per_site"]  # image-weighted: 2 validation images at site_a, 1 at site_b
        assert abs(h["val_dice"] - (2 * per_site["site_a"] + per_site["site_b"]) / 3) < 1e-9
    best = max(data["history"], key=lambda h: h["val_dice"])
    assert data["best"]["round"] == best["round"]
    assert set(data["test_dice_of_best"]) == {"bench"} and 0.0 <= data["test_dice_of_best"]["bench"] <= 1.0


def test_kept_optimizer_server_momentum_and_extra_validation(tmp_path):
    fed = make_federation(tmp_path, sites={"site_a": 4, "site_b": 2}, rounds=2, val_fraction=0.5)
    stems = tmp_path / "val_stems.txt"
    val_dir = tmp_path / "data" / "val"
    stems.write_text("\n".join(p.stem for p in sorted((val_dir / "images").glob("*.png"))) + "\n")
    out = tmp_path / "emu.json"
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "fed_emulation.py"), str(fed), "--device", "cpu",
                          "--keep-optimizer", "--server-momentum", "0.5", "--extra-validation", f"{val_dir}:{stems}",
                          "--json", str(out)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["keep_optimizer"] is True and data["server_momentum"] == 0.5
    for h in data["history"]:
        assert list(h["extra_val_dice_per_set"]) == [f"{val_dir}:val_stems.txt"]
        assert h["extra_val_dice"] == h["extra_val_dice_per_set"][f"{val_dir}:val_stems.txt"]
        assert 0.0 <= h["extra_val_dice"] <= 1.0
