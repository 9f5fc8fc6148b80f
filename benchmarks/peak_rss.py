"""Run a command and report the wall time and the peak memory of every process in its tree (issues 9, 12).

    .venv/bin/python benchmarks/peak_rss.py [--interval 0.5] [--json out.json] -- COMMAND [ARGS...]

Samples ``/proc/<pid>/status`` (``VmRSS``) of the command and all its descendants every
``--interval`` seconds (Linux only; no dependency). Each process is put in a role by its command line
(``simulation`` = ``autosam simulate``, ``server`` = ``autosam-server``, ``site`` = ``autosam-client``,
``superlink``, ``supernode``, ``serverapp`` (also ``flwr-simulation``, where the ServerApp of a
simulation runs), ``clientapp`` (Flower's per-message app processes), ``ray-actor`` (a simulated
site), ``ray`` (Ray's own daemons), ``other``). Prints JSON: ``wall_seconds``,
``returncode``, ``peak_rss_mb_by_role`` (the largest single process of each role),
``peak_tree_rss_mb`` (the largest sum over the whole tree at one sample) and ``processes`` (pid, role,
peak MB, the first 160 characters of the command line). A process that lives shorter than the
interval can be missed: use a small interval for short-lived ones.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROLES = (  # first match wins
    ("ray::", "ray-actor"), ("workers/default_worker.py", "ray-actor"), ("flwr-simulation", "serverapp"),
    ("flwr-clientapp", "clientapp"), ("flwr-serverapp", "serverapp"),
    ("flower-superlink", "superlink"), ("flower-supernode", "supernode"), ("flower-superexec", "superexec"),
    ("simulate", "simulation"), ("server.cli", "server"), ("autosam-server", "server"),
    ("client.cli", "site"), ("autosam-client", "site"), ("ray/", "ray"), ("raylet", "ray"), ("gcs_server", "ray"),
)


def role_of(cmdline: str) -> str:
    """The role of a process from its command line (see the module docstring)."""
    for needle, role in ROLES:
        if needle in cmdline:
            return role
    return "other"


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        kids.setdefault(int(fields[1]), []).append(int(entry))
    return kids


def tree(root: int) -> list[int]:
    """``root`` and every descendant pid alive now."""
    kids, out, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def rss_mb(pid: int) -> float | None:
    """Resident set size of ``pid`` in MB (10**6 bytes), None if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        return None
    return 0.0


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--interval", type=float, default=0.5)
    ap.add_argument("--json", type=Path, help="also write the JSON here")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        ap.error("give the command after --")
    t0 = time.time()
    proc = subprocess.Popen(cmd)
    peaks: dict[int, tuple[float, str]] = {}
    peak_tree = 0.0
    while proc.poll() is None:
        total = 0.0
        for pid in tree(proc.pid):
            mb = rss_mb(pid)
            if mb is None:
                continue
            total += mb
            if mb > peaks.get(pid, (0.0, ""))[0]:
                peaks[pid] = (mb, peaks.get(pid, (0.0, ""))[1] or cmdline(pid))
        peak_tree = max(peak_tree, total)
        time.sleep(args.interval)
    wall = time.time() - t0
    by_role: dict[str, float] = {}
    rows = []
    for pid, (mb, line) in sorted(peaks.items()):
        role = role_of(line)
        by_role[role] = max(by_role.get(role, 0.0), mb)
        rows.append({"pid": pid, "role": role, "peak_rss_mb": round(mb, 1), "cmdline": line[:160]})
    out = {"command": cmd, "returncode": proc.returncode, "wall_seconds": round(wall, 1),
           "peak_rss_mb_by_role": {k: round(v, 1) for k, v in sorted(by_role.items())},
           "peak_tree_rss_mb": round(peak_tree, 1), "processes": rows}
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
