"""``autosam-client``: join an AutoSAM-FL federation as one site (starts a Flower SuperNode).

Example::

    autosam-client --site sites/polyp/kvasir.yaml --superlink superlink.example.org:9092 \\
        --root-certificates certs/ca.crt --auth-key certs/kvasir

Before anything connects, the site YAML and its data are checked (unknown key, wrong type,
missing dataset folder, missing split, empty training split -> exit 2 with the file, key and fix).
TLS is on by default (``--root-certificates``, default ``certs/ca.crt``); ``--insecure`` only for
tests. With ``--auth-key`` the SuperNode authenticates with the site's private key; the coordinator
must have registered the matching public key, otherwise the SuperLink refuses the site (exit 3).

The SuperNode runs in the foreground; Ctrl-C / SIGTERM stops it and everything it started, by PID.
Its node config carries ``site-config`` (absolute path of the site YAML), which the ClientApp reads.
Only the trainable state (g/h) leaves the site; images, masks and SAM stay here.

``--audit`` checks every reply before it is sent (only g/h arrays of the expected keys and shapes,
allow-listed numeric metrics, the site id and fixed-template status texts; :mod:`client.audit`)
and writes ``audit-<site_id>.md`` (readable) and ``.json`` into ``--audit-dir`` (default: the
site's state folder). A reply that breaks a rule is not sent; the site reports an error instead.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path

from autosam_core.config import ConfigError, SiteConfig, load_yaml_config

from autosam_fl import protocol as P

EXIT_CONFIG, EXIT_REFUSED = 2, 3


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="autosam-client", description="Run one AutoSAM-FL site: a Flower SuperNode "
                                 "that trains AutoSAM's prompt generator on this site's private data.")
    ap.add_argument("--site", required=True, help="site YAML (SiteConfig)")
    ap.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the coordinator's SuperLink")
    ap.add_argument("--root-certificates", default=None, help="CA certificate that signed the SuperLink's "
                    "certificate (default certs/ca.crt)")
    ap.add_argument("--auth-key", default=None, help="this site's private key (OpenSSH ECDSA) for authentication")
    ap.add_argument("--insecure", action="store_true", help="no TLS (tests only)")
    ap.add_argument("--port", type=int, default=0, help="local port of the SuperNode's ClientApp API (0 = free port)")
    ap.add_argument("--max-wait-time", type=float, default=None, help="give up connecting after this many seconds")
    ap.add_argument("--audit", action="store_true", help="check every reply against the allow-list before it is "
                    "sent (a violation blocks it) and record what left the site in audit-<site_id>.md/.json")
    ap.add_argument("--audit-dir", default=None, help="folder of the audit report (default: the site's state "
                    "folder, next to its privacy ledger)")
    return ap.parse_args(argv)


def check_site(path: str | Path) -> tuple[SiteConfig, Path, int, int]:
    """Validate a site YAML and its data; returns (config, absolute path, training samples, held-out samples).

    Raises:
        ConfigError: bad YAML, unknown key, wrong type, missing dataset folder or split, or no
        training sample (names the file and the key).
    """
    from autosam_core.engine import split_validation
    from autosam_fl.preflight import resolve_ref

    p = Path(path).expanduser().resolve()
    site = load_yaml_config(p, SiteConfig)
    pairs = resolve_ref(site.data, p.parent, str(p), "data")
    train, val = split_validation(pairs, site.val_fraction, seed=0)
    if not train:
        raise ConfigError(f"{p}: key 'val_fraction': holding out {site.val_fraction} of {len(pairs)} pairs leaves "
                          "no training sample; lower val_fraction or add data")
    return site, p, len(train), len(val)


def _raise_interrupt(signum, frame) -> None:
    # First SIGTERM: unwind like Ctrl-C; ignore repeats so the cleanup (stopping Flower by PID) finishes.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``autosam-client`` (see module docstring)."""
    import tomli_w

    from autosam_fl.processes import FlowerProcessError, ProcessTracker, flower_bin, flower_env, free_port

    args = _parse_args(argv)
    try:
        site, site_path, n_train, n_val = check_site(args.site)
        cmd_tls: list[str] = []
        if args.insecure:
            cmd_tls = ["--insecure"]
        else:
            ca = Path(args.root_certificates or "certs/ca.crt").expanduser()
            if not ca.is_file():
                raise ConfigError(f"--root-certificates: CA certificate {ca} not found; get ca.crt from the "
                                  "coordinator (or pass --insecure for a test without TLS)")
            cmd_tls = ["--root-certificates", str(ca.resolve())]
        if args.auth_key:
            key = Path(args.auth_key).expanduser()
            if not key.is_file():
                raise ConfigError(f"--auth-key: private key {key} not found")
            if args.insecure:
                raise ConfigError("--auth-key needs TLS; drop --insecure")
            cmd_tls += ["--auth-supernode-private-key", str(key.resolve())]
        audit_dir = None
        if args.audit_dir:
            if not args.audit:
                raise ConfigError("--audit-dir needs --audit")
            audit_dir = Path(args.audit_dir).expanduser().resolve()
            if audit_dir.exists() and not audit_dir.is_dir():
                raise ConfigError(f"--audit-dir: {audit_dir} exists and is not a folder")
            audit_dir.mkdir(parents=True, exist_ok=True)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"[autosam] site {site.site_id}: {n_train} training images, {n_val} held out for validation; "
          f"connecting to {args.superlink} ({'INSECURE' if args.insecure else 'TLS'})", flush=True)
    flwr_home = Path(tempfile.mkdtemp(prefix=f"autosam-site-{site.site_id}-"))
    node_cfg = flwr_home / "node_config.toml"
    node_values: dict = {P.NODE_SITE_CONFIG: str(site_path)}
    if args.audit:
        node_values[P.NODE_AUDIT] = True
        if audit_dir is not None:
            node_values[P.NODE_AUDIT_DIR] = str(audit_dir)
        print(f"[autosam] site {site.site_id}: reply audit on (report audit-{site.site_id}.md in "
              f"{audit_dir or 'the site state folder'})", flush=True)
    node_cfg.write_text(tomli_w.dumps(node_values))
    cmd = [flower_bin("flower-supernode"), "--superlink", args.superlink, *cmd_tls,
           "--node-config", str(node_cfg), "--port", str(args.port or free_port())]
    if args.max_wait_time:
        cmd += ["--max-wait-time", str(args.max_wait_time)]
    tracker = ProcessTracker()
    signal.signal(signal.SIGTERM, _raise_interrupt)
    refused = threading.Event()

    def pump(stream) -> None:
        # Flower's children inherit the pipe, so EOF may come long after the SuperNode exits:
        # read in a thread and wait for the SuperNode process itself.
        try:
            for line in stream:
                print(line, end="", flush=True)
                if "Failed to activate SuperNode" in line or "Exit Code: 305" in line:
                    refused.set()
        except (ValueError, OSError):  # the pipe was closed by tracker.stop()
            pass

    try:
        proc = tracker.popen("flower-supernode", cmd, env=flower_env(flwr_home), pipe=True)
        reader = threading.Thread(target=pump, args=(proc.stdout,), daemon=True)
        reader.start()
        rc = proc.wait()
        reader.join(timeout=2)
    except FlowerProcessError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"[autosam] site {site.site_id}: stopping", flush=True)
        rc = 0
    finally:
        tracker.stop()
        shutil.rmtree(flwr_home, ignore_errors=True)
    if refused.is_set():
        print(f"error: the SuperLink refused site {site.site_id}: its key is not registered (or no key was given). "
              f"Ask the coordinator to run autosam-server ... --site-key {site.site_id}=<{site.site_id}.pub> and "
              "start this site with --auth-key <private key>.", file=sys.stderr)
        return EXIT_REFUSED
    return rc


if __name__ == "__main__":
    sys.exit(main())
