"""A real deployment on 127.0.0.1: one SuperLink (autosam-server) and two SuperNodes (autosam-client)
as separate processes, TLS on, site authentication on, 2 rounds with the tiny SAM; an unregistered
site is refused. Every process started is stopped by PID and checked gone afterwards."""

from __future__ import annotations

import json
import queue
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.fl_helpers import make_federation

pytestmark = pytest.mark.skipif(
    shutil.which("flower-superlink", path=str(Path(sys.executable).parent)) is None
    and shutil.which("flower-superlink") is None,
    reason="flwr binaries (flower-superlink/flower-supernode) are not installed")


def _reader(proc, q: queue.Queue, sink: list) -> threading.Thread:
    def run():
        for line in proc.stdout:
            sink.append(line)
            q.put(line)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _float32_bytes() -> int:
    """Bytes of the tiny federation's g state as float32 Flower arrays (what travels without narrowing)."""
    from flwr.app import ArrayRecord

    from autosam_core.config import ModelConfig, SamConfig
    from autosam_core.model_factory import build_autosam
    from tests.fl_helpers import TINY_MODEL

    state = build_autosam(SamConfig(kind="tiny"), ModelConfig(**TINY_MODEL)).trainable_state()
    return int(sum(len(a.data) for a in ArrayRecord(state).values()))


def test_tls_deployment_two_sites_and_refused_rogue(tmp_path):
    from server.certs import generate_site_key, generate_tls
    from server.processes import ProcessTracker, flower_env, free_port

    certs = tmp_path / "certs"
    generate_tls(certs)
    for site in ("site_a", "site_b", "rogue"):
        generate_site_key(certs, site)
    # g travels in bfloat16 over the real TLS connection (issue 9: transfer_dtype)
    fed = make_federation(tmp_path, sites={"site_a": 1, "site_b": 1}, rounds=2, min_sites=2, round_timeout=150,
                          fed_options={"transfer_dtype": "bfloat16"})
    port = free_port()
    env = flower_env(tmp_path / "flwr_test_home")
    py = sys.executable
    tracker = ProcessTracker()
    t0 = time.time()
    try:
        server_q: queue.Queue = queue.Queue()
        server_out: list[str] = []
        server = tracker.popen("autosam-server", [
            py, "-m", "server.cli", str(fed), "--port", str(port), "--certs", str(certs),
            "--site-key", f"site_a={certs / 'site_a.pub'}", "--site-key", f"site_b={certs / 'site_b.pub'}",
            "--timeout", "170"], env=env, cwd=Path(__file__).resolve().parents[1], pipe=True)
        _reader(server, server_q, server_out)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                line = server_q.get(timeout=1)
            except queue.Empty:
                if server.poll() is not None:
                    break
                continue
            if "registered sites" in line:
                break
        assert any("registered sites" in ln for ln in server_out), "".join(server_out)[-3000:]
        assert "TLS" in "".join(server_out) and "site authentication on" in "".join(server_out)

        outs: dict[str, list[str]] = {}
        clients = {}
        for site in ("site_a", "site_b", "rogue"):
            outs[site] = []
            site_yaml = tmp_path / "sites" / f"{'site_a' if site == 'rogue' else site}.yaml"
            clients[site] = tracker.popen(f"autosam-client {site}", [
                py, "-m", "client.cli", "--site", str(site_yaml), "--superlink", f"127.0.0.1:{port}",
                "--root-certificates", str(certs / "ca.crt"), "--auth-key", str(certs / site)],
                env=env, cwd=Path(__file__).resolve().parents[1], pipe=True)
            _reader(clients[site], queue.Queue(), outs[site])

        rogue_rc = clients["rogue"].wait(timeout=90)
        assert rogue_rc == 3, "".join(outs["rogue"])[-2000:]
        rc = server.wait(timeout=max(10, 175 - (time.time() - t0)))
        text = "".join(server_out)
        sites_text = "".join(f"--- {k}:\n{''.join(v)[-1500:]}\n" for k, v in outs.items())
        assert rc == 0, text[-4000:] + sites_text
        summary = json.loads((tmp_path / "runs" / "fedtest" / "summary.json").read_text())
        assert summary["status"] == "completed"
        assert summary["rounds_completed"] == 2
        assert summary["launcher"]["tls"] is True and summary["launcher"]["site_authentication"] is True
        assert set(summary["num_examples_per_site"]) == {"site_a", "site_b"}
        for rec in summary["rounds"][1:]:
            assert set(rec["sites"]) == {"site_a", "site_b"} and not rec["failed_sites"]
            assert all(rec["reply_keys_ok"].values())
        assert "round 2/2" in text
        assert summary["transfer_dtype"] == "bfloat16"
        f32 = _float32_bytes()
        for site, b in summary["bytes_per_site_per_round"].items():
            assert 0.4 * f32 < b["upload"] <= 0.51 * f32 and 0.4 * f32 < b["download"] <= 0.51 * f32, (site, b, f32)
    finally:
        tracker.stop()
    assert tracker.alive() == [], f"processes still running: {tracker.alive()}"
    assert time.time() - t0 < 180
