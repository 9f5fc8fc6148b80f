"""The site worker, the guard and the connection marker in isolation (no Flower processes, no training)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict


def _message(rnd: int) -> Message:
    meta = Metadata(run_id=3, message_id=f"m{rnd}", src_node_id=1, dst_node_id=7, reply_to_message_id="",
                    group_id="", created_at=time.time(), ttl=60.0, message_type="train")
    arrays = ArrayRecord({"w": Array(np.arange(6, dtype=np.float32).reshape(2, 3)),
                          "n": Array(np.array(4, dtype=np.int64))})
    return Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": rnd})}), metadata=meta)


def test_worker_round_trip_keeps_state_and_carries_errors(tmp_path):
    from client.worker import SiteWorker, WorkerUnavailable, call_worker

    calls = []

    def handler(kind, msg, ctx):
        calls.append((kind, ctx.node_config["site-config"], os.getpid()))
        if msg.content["config"]["server-round"] == 2:
            raise RuntimeError("[site a] round 2: ValueError: boom")
        w = msg.content["arrays"]["w"].numpy()
        return RecordDict({"arrays": ArrayRecord({"w": Array(w * 2)}), "metrics": MetricRecord({"num-examples": 5})})

    worker = SiteWorker(tmp_path / "w", handler).start()
    ctx = Context(run_id=3, node_id=7, node_config={"site-config": "/x/site.yaml"}, state=RecordDict(), run_config={})
    try:
        assert oct(os.stat(tmp_path / "w").st_mode & 0o777) == "0o700"
        assert oct(os.stat(tmp_path / "w" / "worker.key").st_mode & 0o777) == "0o600"
        status, content = call_worker(worker.address, "train", _message(1), ctx)
        assert status == "ok"
        np.testing.assert_array_equal(content["arrays"]["w"].numpy(), np.arange(6, dtype=np.float32).reshape(2, 3) * 2)
        assert int(content["metrics"]["num-examples"]) == 5
        reply = Message(content, reply_to=_message(1))
        assert reply.metadata.reply_to_message_id == "m1"
        assert call_worker(worker.address, "evaluate", _message(2), ctx) == ("error", "[site a] round 2: ValueError: boom")
        # Every call ran in this (the worker's) process, in order.
        assert calls == [("train", "/x/site.yaml", os.getpid()), ("evaluate", "/x/site.yaml", os.getpid())]
    finally:
        worker.close()
    try:
        call_worker(worker.address, "train", _message(3), ctx)
    except WorkerUnavailable as err:
        assert worker.address in str(err) and "autosam-client" in str(err)
    else:
        raise AssertionError("a closed worker answered")


def test_guard_stops_groups_and_removes_folders_when_its_owner_dies(tmp_path):
    # The owner (a child Python) starts a guard and a process group, then is SIGKILLed.
    folder = tmp_path / "flwr_home"
    folder.mkdir()
    (folder / "f.txt").write_text("x")
    script = (
        "import subprocess, sys, time\n"
        "from autosam_fl.guard import Guard\n"
        f"g = Guard([__import__('pathlib').Path({str(folder)!r})])\n"
        "p = subprocess.Popen(['sleep', '300'], start_new_session=True)\n"
        "g.watch_group(p.pid)\n"
        "print(p.pid, g.proc.pid, flush=True)\n"
        "time.sleep(300)\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    sleeper, guard = map(int, owner.stdout.readline().split())
    assert Path(f"/proc/{sleeper}").exists()
    owner.send_signal(signal.SIGKILL)
    owner.wait(timeout=10)
    deadline = time.time() + 20
    while time.time() < deadline and (Path(f"/proc/{sleeper}").exists() or folder.exists()):
        time.sleep(0.1)
    gone = not Path(f"/proc/{sleeper}").exists() or Path(f"/proc/{sleeper}/stat").read_text().split(") ")[1][0] == "Z"
    assert gone, f"sleep {sleeper} survived its owner"
    assert not folder.exists()
    deadline = time.time() + 10
    while time.time() < deadline and Path(f"/proc/{guard}").exists() and \
            Path(f"/proc/{guard}/stat").read_text().split(") ")[1][0] != "Z":
        time.sleep(0.1)
    assert not Path(f"/proc/{guard}").exists() or Path(f"/proc/{guard}/stat").read_text().split(") ")[1][0] == "Z"


def test_connection_marker_tells_a_stale_node_from_an_unknown_key(tmp_path):
    from autosam_fl.connect import (ACTIVATION_FAILED, CONNECTED, GAVE_UP, NODE_RELEASE_SECONDS, RETRYING,
                                    ConnectionMarker, classify_supernode_line, marker_path)

    key = tmp_path / "site_a"
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nxyz\n")
    path = marker_path(tmp_path / "state", "site_a", key)
    assert path.name.startswith("connection-site_a-") and len(path.stem.split("-")[-1]) == 12
    marker = ConnectionMarker(path, "127.0.0.1:9092")
    assert marker.release_in() is None  # never connected: a refusal means the key is unknown
    marker.beat()
    left = marker.release_in()
    assert NODE_RELEASE_SECONDS < left <= NODE_RELEASE_SECONDS + 5
    assert marker.live_owner() is None  # written by this very process
    assert ConnectionMarker(path, "10.0.0.1:9092").release_in() is None  # another SuperLink
    marker.clear()
    assert not path.exists() and marker.release_in() is None
    # A site that announced a 10 s heartbeat is released after 2 x 10 s: its restarted successor reads that.
    ConnectionMarker(path, "127.0.0.1:9092", heartbeat_seconds=10).beat()
    left = ConnectionMarker(path, "127.0.0.1:9092").release_in()
    assert 20 < left <= 25, left
    marker.clear()
    assert classify_supernode_line("[code: 2004] Failed to activate SuperNode.") == ACTIVATION_FAILED
    assert classify_supernode_line("INFO :      SuperNode ID: 123") == CONNECTED
    assert classify_supernode_line("INFO :      Received: train message") is None
    # Flower 1.42's line when its retries ran past --max-wait-time (it then retries again, forever)
    assert classify_supernode_line("WARNING :   Giving up reconnection after 15.00 seconds and 8 tries.") == GAVE_UP
    assert classify_supernode_line("WARNING :   Connection attempt failed, retrying in 0.18 seconds") == RETRYING


def test_stale_node_is_offered_for_sign_off_only_when_its_process_is_gone(tmp_path):
    import json
    import subprocess

    from autosam_fl.connect import ConnectionMarker, node_id_in, sign_off_node
    from autosam_fl.processes import free_port
    from server.certs import generate_site_key, generate_tls

    assert node_id_in("\x1b[92mINFO \x1b[0m:      SuperNode ID: 18211076668579113750\n") == 18211076668579113750
    assert node_id_in("INFO :      Received: train message") is None
    path = tmp_path / "connection-site_a.json"
    marker = ConnectionMarker(path, "127.0.0.1:9092")
    marker.beat()
    assert marker.stale_node_id() is None  # no node id recorded
    marker.beat(42)
    assert json.loads(path.read_text())["node_id"] == 42
    assert marker.stale_node_id() == 42  # recorded by this process, whose SuperNode is no longer connected
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "pid": dead.pid}))
    assert marker.stale_node_id() == 42  # its process has exited: this site may sign node 42 off
    assert ConnectionMarker(path, "10.0.0.1:9092").stale_node_id() is None  # another SuperLink
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        path.write_text(json.dumps({**data, "pid": running.pid}))
        assert marker.stale_node_id() is None  # another autosam-client still holds it
    finally:
        running.kill()
        running.wait()
    # Nothing listens: the sign-off reports why instead of raising (the caller then waits for the release).
    generate_tls(tmp_path / "certs")
    generate_site_key(tmp_path / "certs", "site_a")
    why = sign_off_node(f"127.0.0.1:{free_port()}", tmp_path / "certs" / "ca.crt", tmp_path / "certs" / "site_a", 42)
    assert why and "Connect" in why, why
    bad = sign_off_node("127.0.0.1:9", tmp_path / "certs" / "ca.crt", tmp_path / "certs" / "ca.crt", 42)
    assert bad and "private key" in bad, bad


def test_probe_names_refused_and_bad_address(tmp_path):
    from autosam_fl.connect import REFUSED, probe_superlink, split_address
    from autosam_fl.processes import free_port

    port = free_port()
    problem = probe_superlink(f"127.0.0.1:{port}", None, insecure=True)
    assert problem.cause == REFUSED and problem.retry and f"127.0.0.1:{port}" in problem.message
    assert split_address("[::1]:9092") == ("::1", 9092)
    try:
        split_address("coordinator.example.org")
    except ValueError as err:
        assert "HOST:PORT" in str(err)
    else:
        raise AssertionError("an address without a port was accepted")


def test_clientapp_handles_in_process_without_a_site_worker(monkeypatch, tmp_path):
    """Simulation path: no ``site-worker`` in the node config -> client.app handles the message here;
    with one -> the message goes to the worker and its error text is raised as the reply's error."""
    import pytest

    from client import app as site_app
    from client import entry
    from client.worker import SiteWorker

    seen = []
    monkeypatch.setattr(site_app, "train", lambda msg, ctx: seen.append(ctx.node_id) or "in-process reply")
    ctx = Context(run_id=3, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    assert entry.train(_message(1), ctx) == "in-process reply" and seen == [7]

    worker = SiteWorker(tmp_path / "w", lambda kind, msg, c: (_ for _ in ()).throw(
        RuntimeError("[site a] round 1: ValueError: no data"))).start()
    try:
        ctx = Context(run_id=3, node_id=7, node_config={"site-worker": worker.address, "site-id": "a"},
                      state=RecordDict(), run_config={})
        with pytest.raises(RuntimeError, match=r"^\[site a\] round 1: ValueError: no data$"):
            entry.train(_message(1), ctx)
    finally:
        worker.close()
    with pytest.raises(RuntimeError, match=r"^\[site a\] round 1: WorkerUnavailable: .*not reachable"):
        entry.train(_message(1), ctx)


def test_preload_imports_what_round_1_needs_without_building_a_model():
    """autosam-client runs client.app.preload in a thread while its SuperNode connects: afterwards the
    trainer, model factory, evaluation and timm are imported (Opacus only for a DP site) and no model exists."""
    code = ("import sys, client.app as a\n"
            "mods = ['timm', 'autosam_core.training', 'autosam_core.model_factory', 'autosam_core.evaluation']\n"
            "before = [m in sys.modules for m in mods]\n"
            "seconds = a.preload(dp=False)\n"
            "print(before, [m in sys.modules for m in mods], 'autosam_core.privacy' in sys.modules,\n"
            "      len(a._MODELS), seconds > 0)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == "[False, False, False, False] [True, True, True, True] False 0 True"


def test_supernode_shutdown_noise_is_not_echoed_after_the_last_reply(capsys):
    """Before the run's last reply every warning and Traceback header of the SuperNode is echoed; after it
    (this CLI is stopping the SuperNode) only ERROR lines are, so a finished site does not end on a bare
    'Traceback (most recent call last):'."""
    import io
    import queue
    import threading

    from client.cli import _pump

    lines = ["WARNING :   Connection attempt failed, retrying in 0.5 seconds\n", "Traceback (most recent call last):\n",
             "ERROR :     Failed to send message abc\n", "INFO :      Sent successfully\n"]
    done = threading.Event()
    _pump(io.StringIO("".join(lines)), queue.Queue(), False, done)
    assert capsys.readouterr().out == "".join(lines[:3])
    done.set()
    events = queue.Queue()
    _pump(io.StringIO("".join(lines)), events, False, done)
    assert capsys.readouterr().out == lines[2]
    assert [events.get_nowait() for _ in range(2)] == ["retrying", "sent"]  # still classified
