"""Wall time and memory of a real deployment on 127.0.0.1 (issue 12 item 5).

    .venv/bin/python benchmarks/deployment_load.py [--sites 6] [--rounds 3] [--images 4] [--preset sam_head] [--workdir DIR]
    .venv/bin/python benchmarks/deployment_load.py --federation sites/polyp/demo.yaml   # the demo, deployed

Starts one ``autosam-server`` (SuperLink with TLS and SuperNode authentication, one registered key per
site) and ``--sites`` ``autosam-client`` processes (one SuperNode each) of the tiny SAM federation the
tests use (synthetic 64x64 images, ``timm:mobilenetv3_small_050`` g), runs ``--rounds`` rounds and samples
every 0.5 s, from ``/proc``, the resident set size (VmRSS) of

- the SuperLink process (``flower-superlink``) alone,
- the coordinator's tree: ``autosam-server`` and every descendant (guard, SuperLink, SuperExec, ServerApp,
  ``flwr run``),
- each site's tree: ``autosam-client`` (which holds the site worker: SAM, g, data) and its descendants
  (guard, SuperNode, SuperExec, the per-message ClientApp).

With ``--federation YAML`` the real federation is deployed instead (its ``sites:`` YAMLs are the sites,
their ``site_id`` the keys; the run folder is ``<workdir>/run``): compare its ``total_wall_seconds`` with
``autosam simulate YAML`` run just before or after on the same machine.
A tree's RSS is the sum over its processes (shared pages counted once per process, so an upper bound).
Prints JSON with stable keys: ``round_wall_seconds`` (list, from summary.json: rounds 1..N),
``total_wall_seconds`` (server start to server exit), ``superlink_peak_rss_mb``,
``server_tree_peak_rss_mb``, ``client_tree_peak_rss_mb`` (max over sites), ``sites``, ``rounds``;
also ``client_tree_peak_rss_mb_per_site``, ``server_tree_peak_rss_mb_by_process`` (peak of each
program in the coordinator's tree, separately), ``images_per_site``, ``preset``, ``status``, ``samples``.
Every process started is stopped by PID at the end. The timings depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from autosam_fl.processes import _all_pids, _proc_stat  # noqa: E402
from tests.deploy_helpers import Deployment  # noqa: E402
from tests.fl_helpers import make_federation  # noqa: E402


def rss_mb(pid: int) -> float:
    """VmRSS of ``pid`` in MB (0 when gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def program_name(cmd: str) -> str:
    """The program a command line runs: ``autosam-server``, ``flower-superlink``, ``python -m x``..."""
    words = cmd.split()
    if not words:
        return "?"
    if Path(words[0]).name.startswith("python") and len(words) > 1:
        if words[1] == "-m" and len(words) > 2:
            return f"python -m {words[2]}"
        return Path(words[1]).name
    return Path(words[0]).name


def children_map() -> dict[int, list[int]]:
    """ppid -> live child PIDs, from one scan of /proc."""
    children: dict[int, list[int]] = {}
    for p in _all_pids():
        st = _proc_stat(p)
        if st and st[2] != "Z":
            children.setdefault(st[0], []).append(p)
    return children


def tree_rss_mb(pid: int, children: dict[int, list[int]]) -> tuple[float, set[int]]:
    """Summed RSS (MB) of ``pid`` and its live descendants, and those PIDs."""
    pids, frontier = {pid}, [pid]
    while frontier:
        for c in children.get(frontier.pop(), []):
            if c not in pids:
                pids.add(c)
                frontier.append(c)
    return sum(rss_mb(p) for p in pids), pids


class Sampler(threading.Thread):
    """Peak RSS of the SuperLink, the server tree and each client tree, every ``every`` seconds."""

    def __init__(self, server_pid: int, clients: dict[str, int], every: float = 0.5):
        super().__init__(daemon=True)
        self.server_pid, self.clients, self.every = server_pid, clients, every
        self.superlink = self.server = 0.0
        self.per_site: dict[str, float] = {}
        self.server_by_process: dict[str, float] = {}  # peak RSS per program of the coordinator's tree
        self.samples = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            children = children_map()
            total, pids = tree_rss_mb(self.server_pid, children)
            self.server = max(self.server, total)
            link = sum(rss_mb(p) for p in pids if "flower-superlink" in cmdline(p))
            self.superlink = max(self.superlink, link)
            for p in pids:
                name = program_name(cmdline(p))
                self.server_by_process[name] = max(self.server_by_process.get(name, 0.0), rss_mb(p))
            for site, pid in list(self.clients.items()):
                self.per_site[site] = max(self.per_site.get(site, 0.0), tree_rss_mb(pid, children)[0])
            self.samples += 1
            self._halt.wait(self.every)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--images", type=int, default=4, help="training images per site")
    ap.add_argument("--workdir", default=None, help="folder for data, certs, logs and the run (default: a temp dir)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds for the whole run")
    ap.add_argument("--site-threads", type=int, default=None,
                    help="pass --threads N to every autosam-client (several sites sharing this machine's cores; "
                         "default 1, tests/deploy_helpers.py's)")
    ap.add_argument("--preset", default=None, choices=["sam_head", "paper"],
                    help="g of the tiny federation (default: the tests' timm mobilenetv3, 254 state tensors; "
                    "sam_head: 20) - Flower moves every array as its own object, so this sets the transfer cost")
    ap.add_argument("--federation", default=None,
                    help="deploy this federation YAML and its sites instead of the tiny synthetic one")
    args = ap.parse_args(argv)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="autosam-deployment-load-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    extra: list[str] = []
    if args.federation:
        from autosam_core.config import FederationConfig, SiteConfig, load_yaml_config

        fed = Path(args.federation).resolve()
        cfg = load_yaml_config(fed, FederationConfig)
        site_yamls = {load_yaml_config(fed.parent / rel, SiteConfig).site_id: (fed.parent / rel).resolve()
                      for rel in cfg.sites}
        sites = list(site_yamls)
        args.rounds, args.images = cfg.rounds, None
        extra = ["--run-dir", str(work / "run")]
        summary_path = work / "run" / "summary.json"
    else:
        sites = [f"site_{i}" for i in range(args.sites)]
        fed = make_federation(work, sites={s: args.images for s in sites}, rounds=args.rounds, min_sites=args.sites,
                              round_timeout=max(600.0, args.timeout / max(args.rounds, 1)),
                              model={"preset": args.preset} if args.preset else None)
        site_yamls = {s: work / "sites" / f"{s}.yaml" for s in sites}
        summary_path = work / "runs" / "fedtest" / "summary.json"
    status, rc = "failed", None
    with Deployment(work, sites) as d:
        t0 = time.time()
        server = d.server(fed, sites, "--timeout", str(args.timeout), *extra)
        sampler = Sampler(server.pid, {})
        sampler.start()
        try:
            d.wait_for("server", "registered sites", 600)
            for s in sites:
                threads = ["--threads", str(args.site_threads)] if args.site_threads else []
                sampler.clients[s] = d.client(s, site_yamls[s], *threads).pid
            rc = server.wait(timeout=args.timeout + 120)
        finally:
            total = time.time() - t0
            sampler.stop()
        for s in sites:
            try:
                d.procs[s].wait(timeout=60)
            except Exception:  # noqa: BLE001 - stopped by the tracker below
                pass
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    status = summary.get("status", "no summary")
    rounds = [r for r in summary.get("rounds", []) if r.get("round", 0) > 0]
    out = {
        "round_wall_seconds": [round(float(r["round_seconds"]), 2) for r in rounds],
        "total_wall_seconds": round(total, 2),
        "superlink_peak_rss_mb": round(sampler.superlink, 1),
        "server_tree_peak_rss_mb": round(sampler.server, 1),
        "client_tree_peak_rss_mb": round(max(sampler.per_site.values(), default=0.0), 1),
        "sites": len(sites),
        "site_threads": args.site_threads or 1,  # tests/deploy_helpers.py passes --threads 1 by default
        "rounds": args.rounds,
        "client_tree_peak_rss_mb_per_site": {s: round(v, 1) for s, v in sampler.per_site.items()},
        "server_tree_peak_rss_mb_by_process": {k: round(v, 1) for k, v in
                                               sorted(sampler.server_by_process.items(), key=lambda kv: -kv[1])},
        "images_per_site": args.images,
        "preset": args.preset if not args.federation else None,
        "status": status,
        "server_exit_code": rc,
        "samples": sampler.samples,
        "cpus": os.cpu_count(),
        "workdir": str(work),
    }
    print(json.dumps(out, indent=2))
    return 0 if rc == 0 and status == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
