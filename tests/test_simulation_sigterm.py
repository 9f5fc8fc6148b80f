"""SIGTERM to ``autosam simulate`` stops every process it started (private SuperLink, Flower's
simulation, Ray) and exits 130; nothing keeps training after the command is gone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.fl_helpers import make_federation

REPO = Path(__file__).resolve().parents[1]


def _proc_table() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, start time in clock ticks, command line) from /proc."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if fields[0] == "Z":
                continue
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            out[int(d.name)] = (int(fields[1]), fields[19], cmd)
        except (OSError, ValueError, IndexError):
            continue
    return out


def _descendants(root: int) -> dict[int, tuple[str, str]]:
    table = _proc_table()
    found, frontier = {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, start, cmd) in table.items():
            if ppid == parent and pid not in found:
                found[pid] = (start, cmd)
                frontier.append(pid)
    return found


def test_sigterm_stops_the_whole_simulation(tmp_path):
    fed = make_federation(tmp_path, sites={"a": 2, "b": 2}, rounds=50, round_timeout=120)
    autosam = Path(sys.executable).with_name("autosam")
    proc = subprocess.Popen([str(autosam), "simulate", str(fed)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 180
        children: dict[int, tuple[str, str]] = {}
        while time.monotonic() < deadline and proc.poll() is None:
            children = _descendants(proc.pid)
            if any("ClientAppActor" in cmd or "ray::" in cmd for _, cmd in children.values()):
                break
            time.sleep(1)
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert any("ray::" in cmd for _, cmd in children.values()), children
        time.sleep(2)
        children = _descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=90)
        assert proc.returncode == 130, out[-3000:]
        assert "every Flower/Ray process of this simulation was stopped" in out
        deadline = time.monotonic() + 10
        while True:
            table = _proc_table()
            left = {pid: cmd for pid, (start, cmd) in children.items() if pid in table and table[pid][1] == start}
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert not left, left
    finally:
        if proc.poll() is None:
            proc.kill()
