"""Simulated federations through Flower's simulation runtime (real ServerApp/ClientApp, Ray actors).

Three sites with the tiny SAM and a small g on synthetic images:
- site B raises in round 2: round 2 aggregates A and C, the server log shows B's id and error text;
  then stop after 2 rounds and resume: round 3 starts from bit-identical weights and the metric
  history continues;
- min_sites = 3 and B raises in round 2: the run stops with a clear error within the round timeout,
  the round-1 model stays the checkpoint;
- every site fails in round 1: non-zero exit, no weights written (initial weights untouched).
Every Flower/Ray process started is stopped (checked by PID). Failing sites come from the test-only
:mod:`tests.fault_injection` (the product has no fault hook).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import server  # noqa: F401  (imports flwr's CLI deps quietly; see server/__init__.py)
from server.outputs import state_digest
from server.simulation import FederationRunError, run_simulation_from_yaml
from tests.fault_injection import simulation_env as fault_env
from tests.fl_helpers import make_federation

REPO = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def _flower_pids() -> set[int]:
    out = set()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        if stat[stat.rfind(")") + 2] == "Z":
            continue
        if any(s in cmd for s in ("flower-superlink", "flower-superexec", "flwr-simulation", "raylet", "gcs_server")):
            out.add(int(d))
    return out


@pytest.fixture
def no_leftover_processes():
    before = _flower_pids()
    yield
    deadline = time.time() + 15
    while time.time() < deadline and (_flower_pids() - before):
        time.sleep(0.5)
    assert not (_flower_pids() - before), f"Flower/Ray processes left running: {_flower_pids() - before}"


def _ckpt_state(path: Path) -> dict:
    from autosam_core.checkpoint import load_checkpoint

    return load_checkpoint(path)


def test_site_failure_then_resume(tmp_path, no_leftover_processes):
    fed = make_federation(tmp_path, sites={"site_a": 1, "site_b": 1, "site_c": 1}, rounds=2, min_sites=2,
                          site_options={"site_a": {"optimizer_state": "keep"}})
    lines: list[str] = []
    run_dir = run_simulation_from_yaml(fed, echo=lines.append, timeout=300, extra_env=fault_env("site_b@2"))
    # site_a keeps its Adam moments in its state folder: 1 step per round, carried into round 2
    kept = torch.load(tmp_path / "cache" / "site-state" / "optimizer-site_a.pt", weights_only=True)
    assert kept["server_round"] == 2 and {float(v["step"]) for v in kept["optimizer"]["state"].values()} == {2.0}
    assert not list((tmp_path / "cache" / "site-state").glob("optimizer-site_[bc].pt"))  # reset: nothing kept
    s1 = json.loads((run_dir / "summary.json").read_text())
    assert s1["status"] == "completed" and [r["round"] for r in s1["rounds"]] == [0, 1, 2]
    r1, r2 = s1["rounds"][1], s1["rounds"][2]
    assert set(r1["sites"]) == {"site_a", "site_b", "site_c"} and r1["aggregated"]
    assert set(r2["sites"]) == {"site_a", "site_c"} and r2["aggregated"]
    assert "InjectedFault" in r2["failed_sites"]["site_b"]
    log = (run_dir / "server.log").read_text()
    assert "site site_b (node" in log and "failed: round 2: InjectedFault: injected fault" in log
    assert any("round 2/2" in ln and "failed: site_b" in ln for ln in lines)  # progress per round
    for rec in s1["rounds"][1:]:  # every reply carried only g/h keys
        assert rec["reply_keys_ok"] and all(rec["reply_keys_ok"].values())
    assert s1["num_examples_per_site"] == {"site_a": 1, "site_b": 1, "site_c": 1}
    from autosam_core.precision import cpu_has_fast_bf16

    auto = "bf16" if cpu_has_fast_bf16() else "fp32"
    assert s1["runtime"]["central_evaluation"] == {"device": "cpu", "precision": auto}
    assert s1["runtime"]["sites"] == {s: {"device": "cpu", "precision": auto} for s in ("site_a", "site_b", "site_c")}
    assert f"site site_a trains g on cpu in {auto}" in log and f"central evaluation: device cpu, precision {auto}" in log
    assert all(v["upload"] > 0 for v in s1["bytes_per_site_per_round"].values())
    assert s1["best"]["round"] in (1, 2) and (run_dir / "checkpoints" / "best.pt").is_file()
    for name in ("global_dice.png", "predictions.png"):
        assert (run_dir / name).read_bytes()[:8] == PNG
    assert (run_dir / "metrics.csv").read_text().startswith("round,split,kind,dice,iou,num_images")
    ck2 = _ckpt_state(run_dir / "checkpoints" / "last.pt")
    assert ck2["metadata"]["server_round"] == 2 and ck2["metadata"]["backbone"] == s1["backbone"]
    assert ck2["metadata"]["config_hash"] == s1["config_hash"]
    assert ck2["metadata"]["runtime"] == s1["runtime"]
    digest2 = state_digest(ck2["trainable_state"])

    # stop after 2 rounds, resume for a third
    cfg = yaml.safe_load(fed.read_text())
    cfg.update(rounds=3, resume=True)
    fed.write_text(yaml.safe_dump(cfg))
    run_dir2 = run_simulation_from_yaml(fed, echo=lines.append, timeout=300)
    assert run_dir2 == run_dir
    s2 = json.loads((run_dir / "summary.json").read_text())
    assert s2["status"] == "completed"
    assert s2["resumed_from"]["round"] == 2 and s2["resumed_from"]["state_sha256"] == digest2
    assert s2["initial_state_sha256"] == digest2  # round 3 starts from bit-identical weights
    assert [r["round"] for r in s2["rounds"]] == [0, 1, 2, 3]
    for old, new in zip(s1["rounds"], s2["rounds"][:3]):
        assert old["benchmarks"] == new["benchmarks"] and old.get("sites") == new.get("sites")
    assert set(s2["rounds"][3]["sites"]) == {"site_a", "site_b", "site_c"}
    assert _ckpt_state(run_dir / "checkpoints" / "last.pt")["metadata"]["server_round"] == 3
    kept3 = torch.load(tmp_path / "cache" / "site-state" / "optimizer-site_a.pt", weights_only=True)
    # the resumed federation is another run: round 3 starts a fresh Adam (1 step, not 3)
    assert kept3["server_round"] == 3 and kept3["run_id"] != kept["run_id"]
    assert {float(v["step"]) for v in kept3["optimizer"]["state"].values()} == {1.0}
    assert "\n3,bench,test," in (run_dir / "metrics.csv").read_text()


def test_min_sites_unmet_stops_with_clear_error(tmp_path, no_leftover_processes):
    timeout = 90.0
    fed = make_federation(tmp_path, sites={"site_a": 1, "site_b": 1, "site_c": 1}, rounds=2, min_sites=3,
                          round_timeout=timeout)
    with pytest.raises(FederationRunError) as info:
        run_simulation_from_yaml(fed, echo=lambda s: None, timeout=300, extra_env=fault_env("site_b@2"))
    msg = str(info.value)
    assert "round 2: 2 of the required 3 sites (min_sites) replied successfully" in msg, msg
    assert "site_b" in msg and "InjectedFault" in msg
    run_dir = tmp_path / "runs" / "fedtest"
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "failed" and "MinSitesError" in s["error"]
    assert s["rounds_completed"] == 1
    assert s["wall_seconds"] - s["rounds"][-1]["wall_seconds"] < timeout  # stopped within the round timeout
    ck = _ckpt_state(run_dir / "checkpoints" / "last.pt")
    assert ck["metadata"]["server_round"] == 1  # the previous global model is kept


def test_every_site_fails_in_round_1_exits_nonzero(tmp_path, no_leftover_processes):
    fed = make_federation(tmp_path, sites={"site_a": 1, "site_b": 1, "site_c": 1}, rounds=2, min_sites=2)
    env = dict(os.environ, **fault_env("*@1"))
    res = subprocess.run([sys.executable, "-m", "server.simulation", str(fed), "--timeout", "300"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=360)
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    assert "0 of the required 2 sites" in res.stderr
    run_dir = tmp_path / "runs" / "fedtest"
    assert not (run_dir / "checkpoints" / "last.pt").exists()  # initial weights untouched, nothing saved
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "failed" and s["rounds_completed"] == 0
    for site in ("site_a", "site_b", "site_c"):
        assert f"site {site} (node" in (run_dir / "server.log").read_text()
