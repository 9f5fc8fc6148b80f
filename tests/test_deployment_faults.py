"""Faults in a real deployment on 127.0.0.1 (issue 12 item 4): ``autosam-server`` (SuperLink) and one
``autosam-client`` (SuperNode) per site as separate processes, TLS and site authentication on, tiny SAM.

- a site whose whole process tree is SIGKILLed during round 2 is named (its site id) in that round's
  failures, the round averages the other two (``min_sites: 2``), and the site, restarted with the same
  key, signs its stale node off with that key (instead of waiting for the SuperLink to miss two of its
  heartbeats) and contributes again in round 3;
- the coordinator SIGKILLed after round 2 and restarted with ``resume: true`` starts round 3 from the
  round-2 checkpoint's exact weights and keeps rounds 1-2 of the metric history;
- a site whose SAM weights differ from the federation's is refused with both fingerprints.

Slow rounds come from ``tests/fault_injection.py`` (``AUTOSAM_TEST_FAULT`` in the site process's
environment), never from a product hook.

The tests use the ``sam_head`` g (no timm import: each Flower process starts ~3 s of CPU sooner).
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.deploy_helpers import Deployment, descendants, kill
from tests.fault_injection import simulation_env
from tests.fl_helpers import make_federation, write_yaml

pytestmark = pytest.mark.skipif(
    shutil.which("flower-superlink", path=str(Path(sys.executable).parent)) is None
    and shutil.which("flower-superlink") is None,
    reason="flwr binaries (flower-superlink/flower-supernode) are not installed")

#: The shortest heartbeat interval the SuperLink accepts (autosam-client's default: 15 s).
HEARTBEAT = ("--heartbeat-interval", "10")
#: Generous: on a loaded 2-core machine (tests under nice) one Flower process takes tens of seconds to start.
START = 300


def _summary(tmp: Path) -> dict:
    return json.loads((tmp / "runs" / "fedtest" / "summary.json").read_text())


def _alive(pids: set[int]) -> set[int]:
    out = set()
    for p in pids:
        try:
            if Path(f"/proc/{p}/stat").read_text().split(") ")[-1][0] != "Z":
                out.add(p)
        except OSError:
            pass
    return out


def _wait_gone(pids: set[int], timeout: float) -> set[int]:
    deadline = time.time() + timeout
    while _alive(pids) and time.time() < deadline:
        time.sleep(0.2)
    return _alive(pids)


def _kill_tree(proc) -> set[int]:
    """SIGKILL a process and all its descendants at once (a power cut: nobody signs off); returns their PIDs."""
    tree = {proc.pid} | descendants(proc.pid)
    for pid in tree:
        kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)  # reaped: the site's connection marker then names a dead process
    return tree


def _temp_dirs_of(pids: set[int], prefix: str) -> list[Path]:
    """Temporary folders under /tmp named in the command lines of ``pids`` (removed by the test after a SIGKILL
    of the guard too, which would otherwise have removed them)."""
    found = set()
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
        except OSError:
            continue
        for p in Path("/tmp").glob(prefix + "*"):
            if str(p) in cmd:
                found.add(p)
    return sorted(found)


def test_site_killed_in_round_2_is_named_then_rejoins(tmp_path):
    sites = ["site_a", "site_b", "site_c"]
    fed = make_federation(tmp_path, sites={s: 2 for s in sites}, rounds=3, min_sites=2, round_timeout=240)
    rejoined = tmp_path / "site_c_rejoined"
    # site_c is slow in round 2 (killed in it); site_a and site_b hold round 2 until the restarted site_c is
    # connected again, so round 3 starts with all three sites connected.
    faults = simulation_env(f"site_c@2:sleep=600,site_a@2:wait={rejoined},site_b@2:wait={rejoined}")
    t0 = time.time()
    with Deployment(tmp_path, sites) as d:
        server = d.server(fed, sites, "--timeout", "900")
        d.wait_for("server", "registered sites", START)
        # A 10 s heartbeat (the SuperLink's shortest), so that even without the sign-off the test would end.
        clients = {s: d.client(s, tmp_path / "sites" / f"{s}.yaml", *HEARTBEAT, env=faults) for s in sites}
        d.wait_for("site_c", "round 2/3: training ...", 2 * START)
        killed_at = time.time()
        tree = _kill_tree(clients["site_c"])
        leftovers = _temp_dirs_of(tree, "autosam-site-site_c-")
        assert not _wait_gone(tree, 10), d.all_text()
        for p in leftovers:
            shutil.rmtree(p, ignore_errors=True)
        # Restarted at once with the same key: the SuperLink still holds the old node; the site signs it off.
        d.client("site_c", tmp_path / "sites" / "site_c.yaml", *HEARTBEAT, name="site_c-restarted")
        out = d.wait_for("site_c-restarted", "connected to", 240)
        rejoin_s = time.time() - killed_at
        rejoined.touch()
        rc = server.wait(timeout=600)
        summary = _summary(tmp_path)
        assert rc == 0, d.all_text()
        restarted_rc = d.procs["site_c-restarted"].wait(timeout=60)
        wall = time.time() - t0
    assert "previous connection of this site is still active" in out and "signed it off with this site's key" in out, out
    # Signed off before its first SuperNode started: the SuperLink never refused it (Flower's exit code 305).
    assert "Exit Code" not in out, out
    assert restarted_rc == 0, d.text("site_c-restarted")
    assert summary["status"] == "completed" and summary["rounds_completed"] == 3
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2, 3]  # round 0: the initial model
    _, r1, r2, r3 = summary["rounds"]
    assert set(r1["sites"]) == set(sites) and not r1["failed_sites"]
    # Round 2: averaged over the other two; the lost site is named by its site id with the cause.
    assert set(r2["sites"]) == {"site_a", "site_b"} and r2["aggregated"], r2
    assert list(r2["failed_sites"]) == ["site_c"], r2["failed_sites"]
    assert not any(k.startswith("node-") for r in summary["rounds"][1:] for k in [*r["sites"], *r["failed_sites"]])
    why = r2["failed_sites"]["site_c"]
    assert "Node Unavailable" in why or "connection was lost" in why or "no reply" in why, why
    # The restarted site contributes again in round 3.
    assert r3["sites"]["site_c"]["num_examples"] == 2 and set(r3["sites"]) == set(sites), r3
    assert not r3["failed_sites"] and r3["aggregated"], r3
    log = (tmp_path / "runs" / "fedtest" / "server.log").read_text()
    assert "round 2: site site_c" in log and "failed" in log
    print(f"\nwall {wall:.0f} s; site_c rejoined {rejoin_s:.0f} s after the kill; round 2 failure: {why}")


def test_coordinator_killed_after_round_2_resumes_from_its_checkpoint(tmp_path):
    from autosam_core.checkpoint import load_checkpoint
    from server.outputs import state_digest

    sites = ["site_a", "site_b"]
    fed = make_federation(tmp_path, sites={s: 2 for s in sites}, rounds=3, min_sites=2, round_timeout=240)
    run_dir = tmp_path / "runs" / "fedtest"
    # The coordinator is killed as soon as it logs round 2 (written after round 2's checkpoint and history), so
    # before round 3's; a site that received round 3 before the kill holds it until the kill is done, so round 3
    # cannot finish first. The sites give up 2 s after their SuperLink went away (--max-wait-time) and exit 4.
    killed = tmp_path / "coordinator_killed"
    slow = simulation_env(f"*@3:wait={killed}")
    t0 = time.time()
    with Deployment(tmp_path, sites) as d:
        server = d.server(fed, sites, "--timeout", "900")
        d.wait_for("server", "registered sites", START)
        for s in sites:
            d.client(s, tmp_path / "sites" / f"{s}.yaml", "--max-wait-time", "2", env=slow)
        d.wait_for("server", "round 2/3 |", 2 * START)
        tree = _kill_tree(server)
        killed.touch()
        assert not _wait_gone(tree | descendants(server.pid), 30), d.all_text()  # the guard stops the SuperLink
        ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
        history = json.loads((run_dir / "history.json").read_text())
        assert ckpt["metadata"]["server_round"] == 2 and [h["round"] for h in history] == [0, 1, 2]
        digest = state_digest(ckpt["trainable_state"])
        assert digest == ckpt["metadata"]["state_sha256"]
        # The sites notice that their coordinator is gone: the connection ended before the run finished (exit 4).
        for s in sites:
            assert d.procs[s].wait(timeout=START) == 4, d.text(s)
            assert "ended before the run finished" in d.text(s), d.text(s)

        raw = yaml.safe_load(fed.read_text())
        raw["resume"] = True
        write_yaml(fed, raw)
        resumed = d.server(fed, sites, "--timeout", "900", name="server-resumed")
        d.wait_for("server-resumed", "registered sites", START)
        for s in sites:
            d.client(s, tmp_path / "sites" / f"{s}.yaml", name=f"{s}-restarted")
        rc = resumed.wait(timeout=2 * START)
        assert rc == 0, d.all_text()
        summary = _summary(tmp_path)
        restarted = [d.procs[f"{s}-restarted"].wait(timeout=120) for s in sites]
        wall = time.time() - t0
    assert restarted == [0, 0], d.all_text()
    assert summary["status"] == "completed" and summary["rounds_completed"] == 3
    assert summary["resumed_from"]["round"] == 2
    # Round 3 starts from the round-2 checkpoint's exact weights.
    assert summary["resumed_from"]["state_sha256"] == digest
    assert summary["initial_state_sha256"] == digest
    # The metric history continues: rounds 0-2 as they were (round 0: the initial model), 3 appended.
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2, 3]
    assert summary["rounds"][:3] == history
    assert all(set(r["sites"]) == set(sites) and not r["failed_sites"] for r in summary["rounds"][1:])
    final = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert final["metadata"]["server_round"] == 3 and state_digest(final["trainable_state"]) != digest
    print(f"\nwall {wall:.0f} s")


def test_site_with_other_sam_weights_is_refused(tmp_path):
    import torch

    from autosam_core.sam import load_frozen_sam

    coord = tmp_path / "coordinator" / "sam_tiny.pth"
    coord.parent.mkdir(parents=True)
    torch.save(load_frozen_sam("tiny", seed=0).state_dict(), coord)
    same = tmp_path / "hospital_a" / "sam.pth"
    same.parent.mkdir(parents=True)
    shutil.copy(coord, same)
    other = tmp_path / "hospital_b" / "sam.pth"
    other.parent.mkdir(parents=True)
    torch.save(load_frozen_sam("tiny", seed=1).state_dict(), other)
    ours, theirs = load_frozen_sam("tiny", coord).weights_id, load_frozen_sam("tiny", other).weights_id
    assert ours != theirs

    sites = ["site_a", "site_b"]
    fed = make_federation(tmp_path, sites={s: 2 for s in sites}, rounds=2, min_sites=1, round_timeout=240,
                          site_options={"site_a": {"sam_checkpoint": str(same)},
                                        "site_b": {"sam_checkpoint": str(other)}})
    raw = yaml.safe_load(fed.read_text())
    raw["sam"] = {"kind": "tiny", "checkpoint": str(coord)}
    write_yaml(fed, raw)
    t0 = time.time()
    with Deployment(tmp_path, sites) as d:
        server = d.server(fed, sites, "--timeout", "900")
        d.wait_for("server", "registered sites", START)
        clients = {s: d.client(s, tmp_path / "sites" / f"{s}.yaml") for s in sites}
        rc_b = clients["site_b"].wait(timeout=2 * START)
        rc = server.wait(timeout=2 * START)
        rc_a = clients["site_a"].wait(timeout=60)
        wall = time.time() - t0
        out_b = d.text("site_b")
    summary = _summary(tmp_path)
    print(f"\nwall {wall:.0f} s; site_b exit {rc_b}\n{out_b[-1500:]}")
    # The coordinator names the site and both fingerprints (its log and the round's failures).
    r1, r2 = summary["rounds"][1:]
    refusal = r1["failed_sites"]["site_b"]
    assert ours in refusal and theirs in refusal and str(other) in refusal, refusal
    log = (tmp_path / "runs" / "fedtest" / "server.log").read_text()
    assert "round 1: site site_b" in log and ours in log and theirs in log
    # The others go on (min_sites 1). The refused site stops 10 s after its error reply, so round 2 asks it
    # again only if it starts within those seconds (it then refuses again).
    assert rc == 0 and rc_a == 0 and summary["status"] == "completed", d.all_text()
    assert set(r1["sites"]) == set(r2["sites"]) == {"site_a"}, r2
    # The site says why on its console and exits 2 (configuration error), not 0 (run finished).
    assert rc_b == 2, out_b
    assert "site site_b cannot take part in run" in out_b and ours in out_b and theirs in out_b, out_b
    assert "finished; last reply sent" not in out_b, out_b
