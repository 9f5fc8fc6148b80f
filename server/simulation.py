"""Simulated federation on one machine with Flower's simulation runtime (``autosam simulate``).

How it is launched, and why (verified with flwr 1.42 on this machine):

1. Pre-flight (seconds, before any Flower process): federation and site YAMLs, data folders,
   splits, held-out validation, disjointness of the central validation split from test and
   training data, client CPUs vs. cores, and resume-checkpoint compatibility.
2. A private ``flower-superlink --simulation`` on a free loopback port with a private
   ``FLWR_HOME`` (temporary), then ``flwr run <repo> <connection> --stream`` with the run config in
   a TOML file and ``--federation-config num-supernodes=<sites> client-resources-num-cpus=...``.
   This is Flower's supported path (``run_simulation()`` is deprecated and ignores the pyproject
   config); starting our own SuperLink instead of ``flwr run``'s ``:local:`` one avoids the fixed
   port 39091 and a background SuperLink that outlives the run. The ServerApp and ClientApps are
   exactly those of a real deployment; each simulated SuperNode gets ``partition-id`` and maps
   it to ``sites[partition-id]`` of the federation YAML.
3. ``flwr run`` exits 0 even when the run fails, so the status is read back with
   the ServerApp's own ``summary.json`` (status ``completed``) or else ``flwr ls --run-id``, and a failed
   run raises :class:`FederationRunError`.
4. Every process started (SuperLink, SuperExec, flwr-simulation, Ray) is stopped by PID, also on
   errors and Ctrl-C.

Progress: the ServerApp's per-round lines (``[autosam] round r/R ...``) are echoed; the full Flower
output is in ``<run_dir>/flower.log`` and the server's own log in ``<run_dir>/server.log``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from autosam_core.config import ConfigError

from autosam_fl.preflight import available_cpus, check_client_resources, check_sites, check_validation, load_federation
from autosam_fl.processes import (FlowerProcessError, ProcessTracker, flower_env, free_port, finished_status, start_superlink,
                        submit_run, write_connection)
from .outputs import LAST, resolve_cache_dir, resolve_run_dir
from .runner import check_resume_checkpoint

CONNECTION = "autosam-sim"


class FederationRunError(RuntimeError):
    """The Flower run did not complete (a site/min-sites failure, a server error or a timeout)."""


def _progress_filter(verbose: bool, echo: Callable[[str], None]) -> Callable[[str], None]:
    def f(line: str) -> None:
        if verbose or "[autosam]" in line:
            echo(line)
    return f


def preflight(path: str | Path) -> tuple:
    """All checks that need no Flower process; returns (federation config, its path, sites, run dir).

    Raises:
        ConfigError: bad YAML/data/resources (names file, key and fix); CheckpointMismatchError:
        the resume checkpoint does not fit this model.
    """
    fed, fed_path = load_federation(path)
    check_client_resources(fed, fed_path)
    sites = check_sites(fed, fed_path)
    check_validation(fed, fed_path, sites)
    run_dir = resolve_run_dir(fed, fed_path)
    last = run_dir / "checkpoints" / LAST
    if fed.resume and last.is_file():
        from autosam_core.model_factory import trainable_state_template

        # g's (and h's) keys and shapes, the DP g when the sites use DP; SAM's weights are not loaded
        check_resume_checkpoint(fed, last, trainable_state_template(fed.sam, fed.model, seed=fed.seed))
    return fed, fed_path, sites, run_dir


def run_simulation_from_yaml(path: str | Path, *, echo: Callable[[str], None] = print, verbose: bool = False,
                             timeout: float | None = None, run_dir: str | Path | None = None,
                             extra_env: dict | None = None) -> Path:
    """Run the federation of ``path`` in Flower's simulation runtime; returns the run folder.

    Args:
        path: federation YAML (:class:`autosam_core.config.FederationConfig`).
        echo: receives progress lines (all Flower output with ``verbose``).
        timeout: seconds for the whole run (None: no limit; each round is bounded by round_timeout).
        run_dir: output folder (default ``<output_dir>/<name>``, output_dir relative to the YAML's folder).
        extra_env: extra environment variables for the Flower processes.

    Returns:
        the run folder holding summary.json, metrics.csv, global_dice.png, predictions.png,
        history.json, checkpoints/, server.log and flower.log.

    Raises:
        ConfigError: pre-flight failure (before any Flower process starts).
        FederationRunError: the run failed or timed out (message carries Flower's status detail).
        FlowerProcessError: Flower could not be started.
    """
    t0 = time.time()
    fed, fed_path, sites, default_dir = preflight(path)
    run_dir = Path(run_dir).resolve() if run_dir else default_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    echo(f"[autosam] simulating {fed.name}: {len(sites)} sites "
         f"({', '.join(f'{s.config.site_id}={s.num_train} train/{s.num_val} val' for s in sites)}), "
         f"{fed.rounds} rounds -> {run_dir}")
    flwr_home = Path(tempfile.mkdtemp(prefix="autosam-flwr-"))
    extra = dict(extra_env or {})
    cache = resolve_cache_dir(fed, fed_path)
    if cache is not None:
        extra.setdefault("AUTOSAM_CACHE", str(cache))
    env = flower_env(flwr_home, extra)
    tracker = ProcessTracker()
    flower_log = run_dir / "flower.log"
    status, details, run_id = "unknown", "", None
    try:
        port = free_port()
        start_superlink(tracker, host="127.0.0.1", port=port, env=env, log_path=run_dir / "superlink.log",
                        simulation=True, tls=None, cwd=Path.cwd())
        write_connection(flwr_home, CONNECTION, f"127.0.0.1:{port}", insecure=True)
        run_id = submit_run(
            tracker, connection=CONNECTION, env=env, log_path=flower_log, timeout=timeout,
            run_config={"federation-config": str(fed_path), "run-dir": str(run_dir), "node-sites": "",
                        "local-epochs": 0},
            federation_config={"num-supernodes": len(sites), "client-resources-num-cpus": int(fed.client_cpus),
                               "client-resources-num-gpus": float(fed.client_gpus), "init-args-num-cpus": available_cpus()},
            echo=_progress_filter(verbose, echo))
        status, details = finished_status(CONNECTION, run_id, env, run_dir / "summary.json", t0)
    except FlowerProcessError as err:
        raise FederationRunError(str(err)) from None
    finally:
        killed = tracker.stop()
        if killed:
            echo(f"[autosam] had to kill {len(killed)} Flower/Ray process(es) that ignored SIGTERM: {killed}")
        shutil.rmtree(flwr_home, ignore_errors=True)
    summary_path = run_dir / "summary.json"
    if summary_path.is_file() and summary_path.stat().st_mtime >= t0:  # written by this run
        summary = json.loads(summary_path.read_text())
        summary["launcher"] = {"run_id": run_id, "flower_status": status, "total_wall_seconds": time.time() - t0,
                               "mode": "simulation"}
        from .outputs import write_json

        write_json(summary_path, summary)
    if status != "finished:completed":
        raise FederationRunError(f"federation run {run_id} ended with status {status!r}: {details}\n"
                                 f"see {run_dir / 'server.log'} and {flower_log}")
    echo(f"[autosam] done in {time.time() - t0:.0f} s: {summary_path}")
    return run_dir


def main(argv: list[str] | None = None) -> int:
    """``python -m server.simulation FEDERATION.yaml``: exit 0 on success, 2 on config errors, 1 on run failure."""
    ap = argparse.ArgumentParser(prog="python -m server.simulation", description=__doc__.splitlines()[0])
    ap.add_argument("federation", help="federation YAML")
    ap.add_argument("--verbose", action="store_true", help="echo all Flower output")
    ap.add_argument("--timeout", type=float, default=None, help="seconds for the whole run")
    args = ap.parse_args(argv)
    try:
        run_simulation_from_yaml(args.federation, verbose=args.verbose, timeout=args.timeout)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (FederationRunError, FlowerProcessError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
