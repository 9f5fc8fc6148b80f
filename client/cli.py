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

The site keeps SAM, g, its data and the embedding cache loaded for the whole run: Flower starts a
fresh ClientApp process per message, which only forwards the message to this process's site worker
(:mod:`client.worker`). The console shows a progress bar per local epoch and one line per round.
Every process started here (SuperNode, SuperExec, ClientApp) is stopped when autosam-client ends,
also when it is killed with SIGKILL (:mod:`autosam_fl.guard`), and its temporary folder is removed.

Connection problems are named by cause before Flower starts (:mod:`autosam_fl.connect`): nothing
listening (waits up to ``--max-wait-time``, default 300 s), TLS on one side only, a certificate not
signed by ``--root-certificates``; after the handshake: a key the coordinator did not register
(exit 3), or the previous connection of this site still active: when the process that held it has
stopped (SIGKILL, power cut; recorded in the site's state folder), the site signs that node off with its
own key before its SuperNode starts and connects 2 s later (``SIGN_OFF_SETTLE_SECONDS``; after a refused
activation if that sign-off did not take); otherwise it waits up to 75 s and rejoins by itself.
Exit codes: 0 run finished (or stopped by the operator), 1 Flower failed,
2 configuration error (also when the site refused the coordinator's run because its own setup does not
fit it, e.g. SAM weights with another fingerprint: the error reply is sent, then the site stops), 3 key
not registered, 4 cannot connect, or the connection ended before the run finished (the coordinator
stopped or restarted: start the site again).

``--audit`` checks every reply before it is sent (only g/h arrays of the expected keys and shapes,
allow-listed numeric metrics, the site id and fixed-template status texts; :mod:`client.audit`)
and writes ``audit-<site_id>.md`` (readable) and ``.json`` into ``--audit-dir`` (default: the
site's state folder). A reply that breaks a rule is not sent; the site reports an error instead.
"""

from __future__ import annotations

import argparse
import queue
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from autosam_core.config import ConfigError, SiteConfig, load_yaml_config

from autosam_fl import protocol as P
from autosam_fl.supernode_polling import (HEARTBEAT_ENV, HEARTBEAT_PATIENCE, HEARTBEAT_RANGE, HEARTBEAT_SECONDS,
                                          POLL_ENV, POLL_SECONDS)

EXIT_CONFIG, EXIT_REFUSED, EXIT_CONNECT = 2, 3, 4
#: Seconds the SuperNode keeps running after the run's last reply, so that the coordinator fetches it before
#: the node signs off; cut short when the SuperLink stops answering (the coordinator has finished).
FINAL_REPLY_GRACE_SECONDS = 10.0

#: Default of --max-wait-time: how long a site waits for a coordinator that is not listening yet.
DEFAULT_MAX_WAIT = 300.0


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
    ap.add_argument("--max-wait-time", type=float, default=DEFAULT_MAX_WAIT,
                    help=f"give up when the coordinator is not reachable after this many seconds (default "
                    f"{DEFAULT_MAX_WAIT:.0f}); a wrong certificate or TLS setting fails at once")
    ap.add_argument("--serve", action="store_true", help="keep serving the coordinator's next runs; by default "
                    "the site exits 0 once the run it took part in has finished")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for this site's training and "
                    "evaluation (default: torch's, all cores); give each site a share when several sites run on "
                    "one machine (e.g. --threads 1 for two sites on 2 cores: oversubscribed threads made "
                    "training 4-5x slower in the 127.0.0.1 demo)")
    ap.add_argument("--poll-interval", type=float, default=POLL_SECONDS, metavar="SECONDS",
                    help=f"how often an idle site asks the SuperLink for a message (default {POLL_SECONDS:g} s; "
                    "Flower's own is 3 s): each message of a round waits half of it on average; every idle site "
                    "sends one request per interval")
    ap.add_argument("--heartbeat-interval", type=float, default=HEARTBEAT_SECONDS, metavar="SECONDS",
                    help=f"heartbeat interval this site's SuperNode announces (default {HEARTBEAT_SECONDS:g} s, "
                    f"Flower's own 30 s; the SuperLink accepts {HEARTBEAT_RANGE[0]:g}-{HEARTBEAT_RANGE[1]:g}): a site "
                    f"that stops without signing off is declared lost, and its key is free again, "
                    f"{HEARTBEAT_PATIENCE} intervals after its last heartbeat; shorter means one more request to the "
                    "SuperLink per interval")
    ap.add_argument("--verbose", action="store_true", help="echo all of Flower's SuperNode output")
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
    from autosam_core.data.dataset import resolve_ref, split_validation

    p = Path(path).expanduser().resolve()
    site = load_yaml_config(p, SiteConfig)
    pairs = resolve_ref(site.data, p.parent, str(p), "data")
    train, val = split_validation(pairs, site.val_fraction, seed=0)
    if not train:
        raise ConfigError(f"{p}: key 'val_fraction': holding out {site.val_fraction} of {len(pairs)} pairs leaves "
                          "no training sample; lower val_fraction or add data")
    return site, p, len(train), len(val)


class _Stop(Exception):
    """Leave the main loop (the return code is already set)."""


class RoundConsole:
    """The site worker's handler: runs each message through :mod:`client.app` and reports it.

    Prints one line per train round (loss, local Dice, seconds, images) and per validation, and
    notes when the run's last message was answered (``done_runs``), so the CLI can exit.
    """

    def __init__(self, site_id: str):
        self.site_id = site_id
        self.done_runs: set[int] = set()
        self.handled = 0
        #: run id -> why this site cannot take part in it (a ``SiteSetupError``: its own SAM weights, DP setting
        #: or version do not fit the coordinator's instruction; no later round of the run can change that).
        self.refused_runs: dict[int, str] = {}

    def __call__(self, kind: str, msg, context):
        """Handle one ``train``/``evaluate`` message; returns the reply's RecordDict."""
        from client import app as site_app

        config = msg.content[P.CONFIG]
        rnd = P.instruction_round(config)
        final = int(config.get(P.FINAL_ROUND, 0))
        try:
            dropped = site_app.keep_only_model_of(config)
            if dropped:
                print(f"[autosam] site {self.site_id}: new model configuration (run {context.run_id}); released the "
                      "previous one", flush=True)
        except Exception:  # noqa: BLE001 - the handler below reports a bad instruction with the site tag
            pass
        of = f"/{final}" if final else ""
        if kind == "train":
            print(f"[autosam] site {self.site_id}: round {rnd}{of}: training ...", flush=True)
        t0 = time.time()
        try:
            reply = getattr(site_app, kind)(msg, context)
        except Exception as err:
            print(f"[autosam] site {self.site_id}: round {rnd}{of}: {kind} failed: {err}", file=sys.stderr, flush=True)
            cause = err.__cause__ or err.__context__  # the handler re-raises it tagged (``from None`` with the audit)
            if isinstance(cause, site_app.SiteSetupError):
                self.refused_runs[int(context.run_id)] = str(cause)
            raise
        finally:
            self.handled += 1
            if final and rnd >= final and (kind == "evaluate" or not bool(config.get(P.FEDERATED_EVALUATE, True))):
                self.done_runs.add(int(context.run_id))
        m = reply.content.metric_records.get(P.METRICS)
        if m is not None and kind == "train":
            print(f"[autosam] site {self.site_id}: round {rnd}{of}: loss {float(m['train_loss']):.4f}, local Dice "
                  f"{float(m['train_dice']):.4f}, {time.time() - t0:.0f} s, {int(m[P.NUM_EXAMPLES])} images"
                  + (f", epsilon {float(m['epsilon']):.3g}" if "epsilon" in m else ""), flush=True)
        elif m is not None:
            print(f"[autosam] site {self.site_id}: round {rnd}{of}: validation Dice {float(m['val_dice']):.4f} on "
                  f"{int(m[P.NUM_EXAMPLES])} held-out images", flush=True)
        return reply.content


def _connect_problem(args, ca: Path | None) -> "object | None":
    """Probe the SuperLink until it answers or --max-wait-time passes; the last problem, or None."""
    from autosam_fl.connect import probe_superlink

    deadline = time.monotonic() + max(0.0, args.max_wait_time)
    told = False
    while True:
        problem = probe_superlink(args.superlink, ca, args.insecure)
        if problem is None or not problem.retry or time.monotonic() >= deadline:
            return problem
        if not told:
            print(f"[autosam] {problem.message}; waiting up to {args.max_wait_time:.0f} s (--max-wait-time)",
                  flush=True)
            told = True
        time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``autosam-client`` (see module docstring)."""
    import tomli_w

    from autosam_fl.connect import (ACTIVATION_FAILED, CONNECTED, GAVE_UP, RETRYING, SENT, SIGN_OFF_SETTLE_SECONDS,
                                    ConnectionMarker, marker_path, sign_off_node, split_address)
    from autosam_fl.guard import Guard
    from autosam_fl.processes import (FlowerProcessError, ProcessTracker, flower_bin, flower_env, free_port,
                                      unwind_on_sigterm)

    from . import app as site_app
    from .worker import SiteWorker

    args = _parse_args(argv)
    ca = None
    try:
        site, site_path, n_train, n_val = check_site(args.site)
        split_address(args.superlink)
        cmd_tls: list[str] = []
        if args.insecure:
            cmd_tls = ["--insecure"]
        else:
            ca = Path(args.root_certificates or "certs/ca.crt").expanduser()
            if not ca.is_file():
                raise ConfigError(f"--root-certificates: CA certificate {ca} not found; get ca.crt from the "
                                  "coordinator (or pass --insecure for a test without TLS)")
            ca = ca.resolve()
            cmd_tls = ["--root-certificates", str(ca)]
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
        if not args.poll_interval > 0:
            raise ConfigError(f"--poll-interval: expected a number of seconds > 0, found {args.poll_interval}")
        if not HEARTBEAT_RANGE[0] <= args.heartbeat_interval <= HEARTBEAT_RANGE[1]:
            raise ConfigError(f"--heartbeat-interval: expected {HEARTBEAT_RANGE[0]:g}-{HEARTBEAT_RANGE[1]:g} seconds "
                              f"(the SuperLink's range), found {args.heartbeat_interval:g}")
        if args.threads is not None:
            if args.threads < 1:
                raise ConfigError(f"--threads: expected a whole number >= 1, found {args.threads}")
            import torch

            torch.set_num_threads(args.threads)  # the site worker (SAM, g, training) runs in this process
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"[autosam] site {site.site_id}: {n_train} training images, {n_val} held out for validation; "
          f"connecting to {args.superlink} ({'INSECURE' if args.insecure else 'TLS, CA ' + str(ca)})", flush=True)
    problem = _connect_problem(args, ca)
    if problem is not None:
        print(f"error: site {site.site_id}: {problem.message}", file=sys.stderr)
        return EXIT_CONNECT
    if args.audit or site.audit:
        folder = audit_dir or site_app.site_state_dir(site, site_path)
        print(f"[autosam] site {site.site_id}: reply audit on: report {folder / f'audit-{site.site_id}.md'} "
              "(and .json)", flush=True)

    unwind_on_sigterm()
    import faulthandler

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>` prints every thread's stack
    flwr_home = Path(tempfile.mkdtemp(prefix=f"autosam-site-{site.site_id}-"))
    guard = Guard([flwr_home])
    tracker = ProcessTracker(guard=guard)
    console = RoundConsole(site.site_id)
    site_app.PROGRESS = True
    worker = SiteWorker(flwr_home / "worker", console).start()
    # Round 1 would otherwise import the trainer and model code itself; do it while the SuperNode connects.
    threading.Thread(target=site_app.preload, args=(site.privacy is not None,), name="preload", daemon=True).start()
    node_values: dict = {P.NODE_SITE_CONFIG: str(site_path), P.NODE_SITE_WORKER: worker.address,
                         P.NODE_SITE_ID: site.site_id}
    if args.audit:
        node_values[P.NODE_AUDIT] = True
        if audit_dir is not None:
            node_values[P.NODE_AUDIT_DIR] = str(audit_dir)
    node_cfg = flwr_home / "node_config.toml"
    node_cfg.write_text(tomli_w.dumps(node_values))
    # Flower's own flower-supernode script, run with its idle poll cut from 3 s to --poll-interval (supernode_polling.py)
    cmd = [sys.executable, "-m", "autosam_fl.supernode_polling", flower_bin("flower-supernode"),
           "--superlink", args.superlink, *cmd_tls,
           "--node-config", str(node_cfg), "--port", str(args.port or free_port())]
    if args.max_wait_time:
        cmd += ["--max-wait-time", str(args.max_wait_time)]
    state_dir = site_app.site_state_dir(site, site_path)
    marker = ConnectionMarker(marker_path(state_dir, site.site_id, Path(args.auth_key)) if args.auth_key
                              else flwr_home / "connection.json", args.superlink,
                              heartbeat_seconds=args.heartbeat_interval)
    owner = marker.live_owner()
    refused = finished = waited = signed_off = False
    refusal = None  # (run id, why) when this site refused the run (exit 2 after its error reply is sent)
    lost = None  # the SuperNode's exit code when the connection ended before the run finished
    gave_up = False  # the SuperLink stayed unreachable for --max-wait-time during the run
    rc = 0
    run_done = threading.Event()  # set when the run's last reply was sent: the SuperNode's shutdown noise is not echoed
    try:
        if owner is not None:
            print(f"error: site {site.site_id}: another autosam-client (pid {owner}) is connected to {args.superlink} "
                  f"with this key ({marker.path}); stop it first", file=sys.stderr)
            rc = EXIT_CONNECT
            raise _Stop
        stale = marker.stale_node_id() if args.auth_key and marker.release_in() is not None else None
        if stale is not None and sign_off_node(args.superlink, ca, Path(args.auth_key), stale) is None:
            # The marker names a node whose autosam-client stopped without signing off (SIGKILL, power cut) and
            # the SuperLink still held it online (Flower deactivates only an online node): signed off before the
            # first SuperNode starts, so it is not refused once first. If the sign-off fails (another SuperLink
            # since, or the node already released), the SuperNode's activation below tells what to do.
            signed_off = waited = True
            print(f"[autosam] site {site.site_id}: the previous connection of this site is still active on the "
                  f"SuperLink (node {stale}; its process stopped without signing off): signed it off with this "
                  f"site's key; connecting in {SIGN_OFF_SETTLE_SECONDS:.0f} s", flush=True)
            time.sleep(SIGN_OFF_SETTLE_SECONDS)
        while True:
            events: queue.Queue = queue.Queue()
            proc = tracker.popen("flower-supernode", cmd, pipe=True,
                                 env=flower_env(flwr_home, {POLL_ENV: str(args.poll_interval),
                                                           HEARTBEAT_ENV: str(args.heartbeat_interval)}))
            node: dict = {}  # {"id": the node id this SuperNode was activated with}, from its "SuperNode ID:" line
            reader = threading.Thread(target=_pump, args=(proc.stdout, events, args.verbose, run_done, node),
                                      daemon=True)
            reader.start()
            activation_failed = connected = False
            next_beat, stop_at, failures_after_done = 0.0, None, 0
            while proc.poll() is None or not events.empty():
                if connected and time.monotonic() >= next_beat:
                    marker.beat(node.get("id"))
                    next_beat = time.monotonic() + 5.0
                if stop_at is not None and time.monotonic() >= stop_at:
                    tracker.stop()
                    stop_at = None
                try:
                    what = events.get(timeout=0.5)
                except queue.Empty:
                    continue
                if what == CONNECTED:
                    connected = True
                    print(f"[autosam] site {site.site_id}: connected to {args.superlink}; waiting for the "
                          "coordinator's rounds (Ctrl-C stops this site)", flush=True)
                elif what == ACTIVATION_FAILED:
                    activation_failed = True
                elif what == GAVE_UP and connected and not finished and refusal is None and not args.serve:
                    # Flower's SuperNode logs that it gives up, then retries forever: stop it and say why.
                    gave_up = True
                    print(f"[autosam] site {site.site_id}: the SuperLink at {args.superlink} has not answered for "
                          f"{args.max_wait_time:.0f} s (--max-wait-time); stopping", flush=True)
                    tracker.stop()
                elif what == SENT and console.refused_runs and not args.serve and refusal is None and not finished:
                    refusal = next(iter(console.refused_runs.items()))
                    print(f"[autosam] site {site.site_id}: refused run {refusal[0]} (error reply sent); stopping",
                          flush=True)
                    stop_at = time.monotonic() + FINAL_REPLY_GRACE_SECONDS  # let the error reply reach the SuperLink
                elif what == SENT and console.done_runs and not args.serve and not finished and refusal is None:
                    finished = True
                    run_done.set()
                    print(f"[autosam] site {site.site_id}: run {max(console.done_runs)} finished; last reply sent. "
                          "Stopping (use --serve to keep serving the next runs)", flush=True)
                    # The SuperNode logs "sent" when the ClientApp handed it the reply; it still has to
                    # push it to the SuperLink (stopping at once lost site replies: "Node Unavailable").
                    stop_at = time.monotonic() + FINAL_REPLY_GRACE_SECONDS
                elif what == RETRYING and finished and stop_at is not None:
                    # The SuperLink no longer answers after the run's last reply (the coordinator stopped it):
                    # nothing is left to deliver, so the grace need not run out. Two failed attempts, not one
                    # (Flower retries after 0.2-1.5 s), so one dropped request does not cut it short.
                    failures_after_done += 1
                    if failures_after_done == 2:
                        stop_at = time.monotonic()
                        if args.verbose:
                            print(f"[autosam] site {site.site_id}: the SuperLink stopped answering after the run's "
                                  "last reply (the coordinator has finished); stopping now", flush=True)
            rc = 0 if finished else proc.returncode
            if refusal is not None:
                rc = EXIT_CONFIG
                marker.clear()  # stopped by this CLI: the SuperNode signed off
            elif connected and finished:
                marker.clear()  # the SuperNode signed off after the run's last reply (deactivated its node)
            elif connected:
                # The SuperNode stopped before the run's last reply: the connection was lost (Flower's SuperNode
                # exits 0 when a restarted SuperLink no longer knows its node). The marker stays: if the same
                # SuperLink still holds the node, a restart waits for its release.
                lost, rc = proc.returncode, EXIT_CONNECT
            if activation_failed:
                wait = marker.release_in()
                stale = marker.stale_node_id() if wait is not None and args.auth_key and not signed_off else None
                if wait is None:
                    refused = True
                elif stale is not None and (why := sign_off_node(args.superlink, ca, Path(args.auth_key), stale)) is None:
                    # Its process is gone (SIGKILL, power cut): sign its node off with this site's key instead of
                    # waiting for the SuperLink to miss its heartbeats.
                    signed_off = waited = True
                    wait = SIGN_OFF_SETTLE_SECONDS
                    print(f"[autosam] site {site.site_id}: the previous connection of this site is still active on "
                          f"the SuperLink (node {stale}; its process stopped without signing off): signed it off "
                          f"with this site's key; connecting again in {wait:.0f} s", flush=True)
                else:
                    if stale is not None:
                        signed_off = True  # tried once; wait for Flower's release instead
                        print(f"[autosam] site {site.site_id}: could not sign off the previous connection (node "
                              f"{stale}): {why}", flush=True)
                    waited = True
                    print(f"[autosam] site {site.site_id}: the previous connection of this site is still active on "
                          f"the SuperLink (it stopped without signing off; Flower releases it after "
                          f"{HEARTBEAT_PATIENCE} missed heartbeats); retrying in {wait:.0f} s", flush=True)
                if wait is not None:
                    tracker.stop()
                    time.sleep(wait)
                    tracker = ProcessTracker(guard=guard)
                    continue
            break
    except FlowerProcessError as err:
        print(f"error: {err}", file=sys.stderr)
        rc = 1
    except KeyboardInterrupt:
        print(f"[autosam] site {site.site_id}: stopping", flush=True)
        rc = 0
    except _Stop:
        pass
    finally:
        tracker.stop()
        worker.close()
        shutil.rmtree(flwr_home, ignore_errors=True)
        guard.close()
    if refused:
        extra = (" (it was refused again after waiting for the previous connection to be released)" if waited else "")
        print(f"error: the SuperLink at {args.superlink} refused site {site.site_id}: its key is not registered{extra}. "
              f"Ask the coordinator to run autosam-server ... --site-key {site.site_id}=<{site.site_id}.pub> and start "
              "this site with --auth-key <its private key>.", file=sys.stderr)
        return EXIT_REFUSED
    if refusal is not None:
        print(f"error: site {site.site_id} cannot take part in run {refusal[0]}: {refusal[1]}. The coordinator was told "
              "(error reply); the site stopped. Fix its configuration and start it again.", file=sys.stderr)
        return EXIT_CONFIG
    if lost is not None:
        why = (f"no answer for {args.max_wait_time:.0f} s, --max-wait-time" if gave_up
               else f"Flower's SuperNode stopped, exit code {lost}")
        print(f"error: site {site.site_id}: the connection to the SuperLink at {args.superlink} ended before the run "
              f"finished ({why}): the coordinator stopped or was restarted, or "
              "the network failed. Start this site again with the same command once the coordinator runs (a resumed "
              "run continues from its last checkpoint).", file=sys.stderr)
    return rc


def _pump(stream, events: queue.Queue, verbose: bool, done: threading.Event | None = None,
          node: dict | None = None) -> None:
    """Echo the SuperNode's output (all of it with --verbose, else warnings/errors) and classify it.

    Once ``done`` is set (the run's last reply was sent and this CLI is stopping the SuperNode), Flower's
    reconnection warnings and the bare "Traceback" headers of its stopping threads are no longer echoed:
    they describe the shutdown, not a problem. ERROR lines always are.
    """
    from autosam_fl.connect import CONNECTED, classify_supernode_line, node_id_in

    # Flower's children inherit the pipe, so EOF may come long after the SuperNode exits: read in a
    # thread and wait for the SuperNode process itself.
    try:
        for line in stream:
            what = classify_supernode_line(line)
            if what == CONNECTED and node is not None:
                node["id"] = node_id_in(line)
            if what:
                events.put(what)
            quiet = done is not None and done.is_set()
            if verbose or "ERROR" in line or (not quiet and ("WARNING" in line or "Traceback" in line)):
                print(line, end="", flush=True)
    except (ValueError, OSError):  # the pipe was closed by tracker.stop()
        pass


if __name__ == "__main__":
    sys.exit(main())
