"""``autosam-server``: coordinate a real AutoSAM-FL deployment.

Starts a SuperLink (TLS by default, SuperNode authentication when site keys are given), registers
the sites' public keys, submits the run of a federation YAML with ``flwr run``, streams progress,
and writes the same outputs as a simulation (summary.json, metrics.csv, plots, checkpoints) into
the run folder. Every process it started is stopped by PID when the run ends.

Example (coordinator)::

    python -m server.certs --out certs --san superlink.example.org --sites kvasir clinicdb
    autosam-server sites/polyp/federation.yaml --host 0.0.0.0 --port 9092 --certs certs \\
        --site-key kvasir=certs/kvasir.pub --site-key clinicdb=certs/clinicdb.pub

Each site then runs ``autosam-client --site sites/polyp/kvasir.yaml --superlink HOST:9092
--root-certificates ca.crt --auth-key kvasir``.

With ``--superlink HOST:PORT`` an already running SuperLink is used (e.g. the docker-compose
service); keys are registered there and the run submitted, nothing is started.

Exit codes: 0 run completed, 1 run failed, 2 configuration error.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from autosam_core.config import ConfigError

from autosam_fl.preflight import check_validation, load_federation
from autosam_fl.processes import (FlowerProcessError, ProcessTracker, TlsFiles, flower_bin, flower_env, finished_status,
                        start_superlink, submit_run, unwind_on_sigterm, write_connection)
from .outputs import LAST, resolve_cache_dir, resolve_run_dir

CONNECTION = "autosam"


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="autosam-server", description="Start a SuperLink and run an AutoSAM-FL "
                                 "federation on real sites (TLS and site authentication by default).")
    ap.add_argument("federation", help="federation YAML")
    ap.add_argument("--host", default="127.0.0.1", help="address the SuperLink listens on (default 127.0.0.1; 0.0.0.0 for all)")
    ap.add_argument("--port", type=int, default=9092, help="SuperLink port, one port for sites and control (default 9092)")
    ap.add_argument("--superlink", default=None, metavar="HOST:PORT",
                    help="use this running SuperLink instead of starting one")
    ap.add_argument("--certs", default=None, help="folder with ca.crt, server.pem, server.key (server.certs layout)")
    ap.add_argument("--ssl-ca-certfile", default=None, help="CA certificate (PEM)")
    ap.add_argument("--ssl-certfile", default=None, help="SuperLink certificate (PEM)")
    ap.add_argument("--ssl-keyfile", default=None, help="SuperLink private key (PEM)")
    ap.add_argument("--insecure", action="store_true", help="no TLS and no site authentication (tests only)")
    ap.add_argument("--site-key", action="append", default=[], metavar="SITE=PUBKEY",
                    help="register a site's public key (repeatable); sites without a registered key are refused")
    ap.add_argument("--no-auth", action="store_true", help="TLS without SuperNode authentication")
    ap.add_argument("--run-dir", default=None, help="output folder (default <output_dir>/<name>)")
    ap.add_argument("--local-epochs", type=int, default=0, help="override every site's local_epochs (0 = site YAMLs)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds for the whole run")
    ap.add_argument("--verbose", action="store_true", help="echo all Flower output")
    return ap.parse_args(argv)


def _tls(args: argparse.Namespace) -> TlsFiles | None:
    """TLS files from the options (None with --insecure); with --superlink only the CA is needed.

    Raises:
        FileNotFoundError: a needed file is missing (names it and how to create it).
    """
    if args.insecure:
        return None
    base = Path(args.certs) if args.certs else Path("certs")
    tls = TlsFiles(Path(args.ssl_ca_certfile or base / "ca.crt"), Path(args.ssl_certfile or base / "server.pem"),
                   Path(args.ssl_keyfile or base / "server.key"))
    if args.superlink:
        if not tls.ca_cert.is_file():
            raise FileNotFoundError(f"TLS CA certificate {tls.ca_cert} not found (needed to talk to "
                                    f"{args.superlink}); pass --ssl-ca-certfile or --insecure")
    else:
        tls.check()
    return tls


def _site_keys(items: list[str]) -> dict[str, Path]:
    out = {}
    for item in items:
        site, sep, path = item.partition("=")
        if not sep or not site or not path:
            raise ConfigError(f"--site-key {item!r}: expected SITE=PATH_TO_PUBLIC_KEY")
        p = Path(path).expanduser()
        if not p.is_file():
            raise ConfigError(f"--site-key {site}: public key {p} not found (make one with "
                              f"`python -m server.certs --sites {site}` or ssh-keygen -t ecdsa -b 384)")
        out[site] = p.resolve()
    return out


def register_sites(keys: dict[str, Path], env: dict, timeout: float = 180.0) -> dict[int, str]:
    """Register each site's public key with the SuperLink; returns node id -> site id (in ``keys`` order).

    One ``flwr supernode register`` process per site, all started at once (each spends ~1 s starting
    Python and Flower; in sequence that was ~1 s per site before the run could be submitted).

    Raises:
        FlowerProcessError: registration refused (message quotes Flower's answer), or no answer within
        ``timeout`` seconds; the other registration processes are stopped first.
    """
    procs = {site: (pub, subprocess.Popen([flower_bin("flwr"), "supernode", "register", str(pub), CONNECTION,
                                           "--format", "json"], env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
             for site, pub in keys.items()}
    deadline = time.monotonic() + timeout
    nodes = {}
    try:
        for site, (pub, proc) in procs.items():
            try:
                stdout, stderr = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise FlowerProcessError(f"registering site {site} ({pub}) failed: `flwr supernode register` did "
                                         f"not answer within {timeout:.0f} s") from None
            try:
                data = json.loads(stdout[stdout.index("{"):])
                if not data.get("success"):
                    raise ValueError(data)
                nodes[int(data["node-id"])] = site
            except (ValueError, KeyError) as err:
                raise FlowerProcessError(
                    f"registering site {site} ({pub}) failed: {stdout}{stderr} {err}") from None
    finally:
        for _, proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return nodes


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``autosam-server`` (see module docstring)."""
    args = _parse_args(argv)
    t0 = time.time()
    echo = lambda s: print(s, flush=True)  # noqa: E731
    try:
        fed, fed_path = load_federation(args.federation)
        check_validation(fed, fed_path)
        tls = _tls(args)
        keys = _site_keys(args.site_key)
        if tls is None and keys:
            raise ConfigError("--site-key needs TLS (SuperNode authentication runs over TLS); drop --insecure")
        auth = tls is not None and not args.no_auth
        if auth and not keys and not args.superlink:
            raise ConfigError("site authentication is on but no --site-key was given: every site would be refused; "
                              "pass --site-key SITE=PUBKEY for each site, or --no-auth")
        run_dir = Path(args.run_dir).resolve() if args.run_dir else resolve_run_dir(fed, fed_path)
        last = run_dir / "checkpoints" / LAST
        if fed.resume and last.is_file():
            from autosam_core.model_factory import trainable_state_template  # torch: only to check a resume checkpoint

            from .runner import check_resume_checkpoint

            # g's (and h's) keys and shapes, the DP g when the sites use DP; SAM's weights are not loaded
            check_resume_checkpoint(fed, last, trainable_state_template(fed.sam, fed.model, seed=fed.seed))
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    run_dir.mkdir(parents=True, exist_ok=True)
    echo(f"[autosam] run folder {run_dir} (summary.json, server.log, flower.log, superlink.log)")
    reads = [f"{r.name or r.dataset} ({r.dataset}{', split ' + r.split if r.split else ''}"
             f"{', first ' + str(r.limit) if r.limit else ''})" for r in [*fed.evaluate, *fed.validation]]
    echo(f"[autosam] the coordinator reads these datasets for central evaluation: {', '.join(reads) or 'none'}; "
         "the sites: list of the YAML is not used in a deployment (each site brings its own YAML)")
    flwr_home = Path(tempfile.mkdtemp(prefix="autosam-server-flwr-"))
    extra = {}
    cache = resolve_cache_dir(fed, fed_path)
    if cache is not None:
        extra["AUTOSAM_CACHE"] = str(cache)
    env = flower_env(flwr_home, extra)
    from autosam_fl.guard import Guard

    guard = Guard([flwr_home])  # stops the SuperLink tree and removes flwr_home even after a SIGKILL of this CLI
    tracker = ProcessTracker(guard=guard)
    unwind_on_sigterm()
    status, details, run_id = "unknown", "", None
    try:
        if args.superlink:
            address = args.superlink
        else:
            start_superlink(tracker, host=args.host, port=args.port, env=env, log_path=run_dir / "superlink.log",
                            simulation=False, tls=tls, supernode_auth=auth, cwd=Path.cwd())
            address = f"{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
        write_connection(flwr_home, CONNECTION, address, root_certificates=tls.ca_cert if tls else None,
                         insecure=tls is None)
        node_sites = register_sites(keys, env) if keys else {}
        echo(f"[autosam] SuperLink ready at {address} ({'TLS' if tls else 'INSECURE'}, "
             f"site authentication {'on' if auth else 'off'}); registered sites: "
             f"{', '.join(f'{s} (node {n})' for n, s in node_sites.items()) or 'none'}")
        echo(f"[autosam] waiting for {fed.min_sites} site(s): autosam-client --site SITE.yaml --superlink {address}"
             + (" --root-certificates ca.crt --auth-key SITE_KEY" if tls else " --insecure"))
        run_id = submit_run(
            tracker, connection=CONNECTION, env=env, log_path=run_dir / "flower.log", timeout=args.timeout,
            run_config={"federation-config": str(fed_path), "run-dir": str(run_dir),
                        "node-sites": ",".join(f"{n}:{s}" for n, s in node_sites.items()),
                        "local-epochs": args.local_epochs},
            echo=lambda line: echo(line) if (args.verbose or "[autosam]" in line) else None)
        status, details = finished_status(CONNECTION, run_id, env, run_dir / "summary.json", t0)
    except FlowerProcessError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; stopping the SuperLink", file=sys.stderr)
        return 130
    finally:
        tracker.stop()
        shutil.rmtree(flwr_home, ignore_errors=True)
        guard.close()
    summary = run_dir / "summary.json"
    if summary.is_file() and summary.stat().st_mtime >= t0:  # written by this run
        data = json.loads(summary.read_text())
        data["launcher"] = {"run_id": run_id, "flower_status": status, "total_wall_seconds": time.time() - t0,
                            "mode": "deployment", "tls": tls is not None, "site_authentication": auth}
        from .outputs import write_json

        write_json(summary, data)
    if status != "finished:completed":
        print(f"error: run {run_id} ended with status {status!r}: {details}\nsee {run_dir / 'server.log'}",
              file=sys.stderr)
        return 1
    echo(f"[autosam] done in {time.time() - t0:.0f} s: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
