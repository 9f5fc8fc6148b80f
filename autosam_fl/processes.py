"""Starting and stopping Flower processes (SuperLink, SuperNode, ``flwr run``) safely.

Flower's process tree is deep: ``flower-superlink`` starts ``flower-superexec`` (in its own
session), which starts ``flwr-simulation`` / ``flwr-serverapp``, which starts Ray (``gcs_server``,
``raylet``, workers). :class:`ProcessTracker` starts the roots, polls ``/proc`` to remember every
descendant by (pid, start time) while they live, and on :meth:`ProcessTracker.stop` terminates
exactly those processes by PID (checking the start time so a recycled PID is never signalled).
Nothing is ever killed by name.

Also here: the Flower environment (private ``FLWR_HOME``, no telemetry, no update check, no
runtime dependency installation), free ports, the SuperLink connection file and run submission.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("autosam.server")


class FlowerProcessError(RuntimeError):
    """A Flower process could not be started or a run did not complete."""


# ----- /proc helpers ----------------------------------------------------------------------------
def _proc_stat(pid: int) -> tuple[int, int, str] | None:
    """(ppid, start time in clock ticks, state) of ``pid`` from /proc, or None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    rest = raw[raw.rfind(")") + 2:].split()
    return int(rest[1]), int(rest[19]), rest[0]


def _all_pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def pid_alive(pid: int, start_time: int | None = None) -> bool:
    """True if ``pid`` runs (not a zombie) and, when given, started at ``start_time``."""
    st = _proc_stat(pid)
    if st is None or st[2] == "Z":
        return False
    return start_time is None or st[1] == start_time


class ProcessTracker:
    """Start processes and remember them and all their descendants, to stop exactly those later.

    Args:
        poll_seconds: how often ``/proc`` is scanned for new descendants.
        guard: an :class:`autosam_fl.guard.Guard`; every started process (the leader of its own
            session and group) is registered with it, so it is stopped even if this process is
            killed with SIGKILL.
    """

    def __init__(self, poll_seconds: float = 0.5, guard=None):
        self.guard = guard
        self.roots: list[tuple[str, subprocess.Popen]] = []
        self.seen: dict[int, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(poll_seconds,), daemon=True)
        self._thread.start()

    def popen(self, name: str, cmd: Sequence[str], *, env: dict, cwd: Path | None = None,
              log_path: Path | None = None, pipe: bool = False) -> subprocess.Popen:
        """Start ``cmd`` in a new session; output to ``log_path`` (or a pipe with ``pipe=True``).

        Raises:
            FlowerProcessError: the executable is missing.
        """
        stdout = subprocess.PIPE if pipe else (open(log_path, "ab") if log_path else subprocess.DEVNULL)
        try:
            proc = subprocess.Popen(list(cmd), env=env, cwd=cwd, stdout=stdout, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, text=pipe,
                                    bufsize=1 if pipe else -1)
        except FileNotFoundError as err:
            raise FlowerProcessError(f"cannot start {name}: {cmd[0]} not found ({err}); is flwr installed?") from None
        finally:
            if not pipe and log_path:
                stdout.close()
        if self.guard is not None:
            self.guard.watch_group(proc.pid)
        st = _proc_stat(proc.pid)
        with self._lock:
            self.roots.append((name, proc))
            if st:
                self.seen[proc.pid] = st[1]
        log.debug("started %s (pid %d): %s", name, proc.pid, " ".join(cmd))
        return proc

    def scan(self) -> None:
        """Record every live descendant of the started processes (by pid and start time)."""
        children: dict[int, list[int]] = {}
        stats: dict[int, tuple[int, int, str]] = {}
        for pid in _all_pids():
            st = _proc_stat(pid)
            if st:
                stats[pid] = st
                children.setdefault(st[0], []).append(pid)
        with self._lock:
            frontier = [p for p in self.seen if p in stats and stats[p][1] == self.seen[p]]
            while frontier:
                pid = frontier.pop()
                for child in children.get(pid, []):
                    if child not in self.seen or self.seen[child] != stats[child][1]:
                        self.seen[child] = stats[child][1]
                        frontier.append(child)

    def _poll(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                self.scan()
            except Exception:  # noqa: BLE001 - /proc races must never kill the poller
                pass

    def alive(self) -> list[int]:
        """PIDs started or seen by this tracker that still run."""
        with self._lock:
            return [p for p, t in self.seen.items() if pid_alive(p, t)]

    def stop(self, grace: float = 10.0) -> list[int]:
        """Terminate every tracked process by PID: SIGTERM roots, then descendants, then SIGKILL.

        Returns:
            PIDs that had to be killed with SIGKILL.
        """
        try:
            self.scan()
        except Exception:  # noqa: BLE001
            pass
        self._stop.set()
        for _, proc in reversed(self.roots):
            if proc.poll() is None:
                _signal(proc.pid, signal.SIGTERM)
        _wait_until(lambda: all(p.poll() is not None for _, p in self.roots), grace)
        self.scan_quietly()
        with self._lock:
            tracked = dict(self.seen)
        for pid, t in tracked.items():
            if pid_alive(pid, t):
                _signal(pid, signal.SIGTERM)
        _wait_until(lambda: not any(pid_alive(p, t) for p, t in tracked.items()), min(grace, 5.0))
        killed = []
        for pid, t in tracked.items():
            if pid_alive(pid, t):
                _signal(pid, signal.SIGKILL)
                killed.append(pid)
        for _, proc in self.roots:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            if proc.stdout is not None:
                proc.stdout.close()
        _wait_until(lambda: not any(pid_alive(p, t) for p, t in tracked.items()), 5.0)
        return killed

    def scan_quietly(self) -> None:
        """:meth:`scan`, ignoring /proc races."""
        try:
            self.scan()
        except Exception:  # noqa: BLE001
            pass


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_until(cond: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.2)
    return cond()


# ----- environment ------------------------------------------------------------------------------
def flower_bin(name: str) -> str:
    """Path of a Flower executable next to this Python, else on PATH.

    Raises:
        FlowerProcessError: not found.
    """
    cand = Path(sys.executable).parent / name
    if cand.is_file():
        return str(cand)
    found = shutil.which(name)
    if not found:
        raise FlowerProcessError(
            f"{name} not found next to {sys.executable} or on PATH; install flwr[simulation]==1.42.0")
    return found


def flower_env(flwr_home: Path, extra: dict | None = None) -> dict:
    """Environment for Flower child processes: private FLWR_HOME, no telemetry/update check/uv sync.

    Also pins ``AUTOSAM_DATA`` and ``AUTOSAM_CACHE`` to this process's data root and cache, because
    Flower runs the app from a copy in FLWR_HOME where the repo-relative defaults would differ.
    """
    from autosam_core.data.dataset import data_root, default_cache_dir  # torch-free

    env = dict(os.environ)
    # Flower's processes start each other by name (flower-superlink -> flower-superexec, flwr-serverapp,
    # ...): put this interpreter's bin folder first so a non-activated venv (make demo) finds them.
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, *[p for p in env.get("PATH", "").split(os.pathsep) if p and p != bin_dir]])
    env.update({
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "AUTOSAM_DATA": str(data_root().resolve()),
        "AUTOSAM_CACHE": str(Path(default_cache_dir()).resolve()),
        "PYTHONUNBUFFERED": "1",
        # flower-superexec asks for a new task (a flwr-clientapp per message, on a site) every 1 s by
        # default; 0.1 s takes up to 0.9 s off every message of a deployed round for one tiny gRPC call
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        "RAY_DEDUP_LOGS": "0",
    })
    env.update(extra or {})
    return env


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def write_connection(flwr_home: Path, name: str, address: str, root_certificates: Path | None = None,
                     insecure: bool = False) -> Path:
    """Write ``$FLWR_HOME/config.toml`` with one SuperLink connection ``name`` (the default)."""
    import tomli_w

    conn: dict = {"address": address}
    if insecure:
        conn["insecure"] = True
    elif root_certificates:
        conn["root-certificates"] = str(root_certificates)
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text(tomli_w.dumps({"superlink": {"default": name, name: conn}}))
    return path


@dataclass
class TlsFiles:
    """SuperLink TLS material: CA certificate, server certificate and key (PEM paths)."""

    ca_cert: Path
    server_cert: Path
    server_key: Path

    def check(self) -> None:
        """Raises FileNotFoundError naming the first missing file and how to create it."""
        for what, p in (("CA certificate", self.ca_cert), ("server certificate", self.server_cert),
                        ("server key", self.server_key)):
            if not Path(p).is_file():
                raise FileNotFoundError(f"TLS {what} {p} not found; create dev certificates with "
                                        "`python -m server.certs --out certs` or pass --insecure")


def start_superlink(tracker: ProcessTracker, *, host: str, port: int, env: dict, log_path: Path,
                    simulation: bool, tls: TlsFiles | None, supernode_auth: bool = False,
                    cwd: Path | None = None, startup_timeout: float = 60.0) -> subprocess.Popen:
    """Start ``flower-superlink`` and wait for its health endpoint.

    Raises:
        FlowerProcessError: the process exits or is not healthy within ``startup_timeout`` (the
        message quotes the end of its log).
    """
    cmd = [flower_bin("flower-superlink"), "--host", host, "--port", str(port),
           "--disable-runtime-dependency-installation"]
    if simulation:
        cmd.append("--simulation")
    if tls is None:
        cmd.append("--insecure")
    else:
        tls.check()
        cmd += ["--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.server_cert),
                "--ssl-keyfile", str(tls.server_key)]
    if supernode_auth:
        if tls is None:
            raise FlowerProcessError("SuperNode authentication needs TLS; drop --insecure or disable authentication")
        cmd.append("--enable-supernode-auth")
    proc = tracker.popen("flower-superlink", cmd, env=env, cwd=cwd, log_path=log_path)
    probe_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"{'https' if tls else 'http'}://{probe_host}:{port}/health"
    wait_healthy(url, proc, log_path, startup_timeout, verify=str(tls.ca_cert) if tls else False)
    return proc


def wait_healthy(url: str, proc: subprocess.Popen, log_path: Path, timeout: float, verify) -> None:
    """Poll ``url`` until it answers 2xx.

    Raises:
        FlowerProcessError: ``proc`` exits first or ``timeout`` seconds pass.
    """
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FlowerProcessError(f"flower-superlink exited with code {proc.returncode}:\n{tail(log_path)}")
        try:
            if httpx.get(url, timeout=2.0, verify=verify).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise FlowerProcessError(f"flower-superlink not healthy at {url} after {timeout:.0f} s:\n{tail(log_path)}")


def tail(path: Path, lines: int = 25) -> str:
    """Last ``lines`` lines of a text file ('' if missing)."""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


_RUN_ID = re.compile(r"Successfully started run (\d+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def submit_run(tracker: ProcessTracker, *, connection: str, env: dict, run_config: dict, log_path: Path,
               federation_config: dict | None = None, echo: Callable[[str], None] | None = None,
               timeout: float | None = None, app_dir: Path | None = None) -> int:
    """``flwr run <app_dir> <connection> --stream`` with the run config written to a TOML file.

    ``app_dir`` None: the bundle's files are staged into a new folder under ``$FLWR_HOME`` first
    (:func:`autosam_fl.app_bundle.stage_app`), so Flower does not walk the clone's ``.venv`` and cache.

    Every output line goes to ``log_path``; ``echo`` receives each line (ANSI colours removed).

    Returns:
        the run id.

    Raises:
        FlowerProcessError: ``flwr run`` failed before starting a run, or ``timeout`` passed
        (the process is then stopped).
    """
    import tomli_w

    flwr_home = Path(env["FLWR_HOME"])
    if app_dir is None:
        from .app_bundle import stage_app
        app_dir = stage_app(Path(tempfile.mkdtemp(prefix="app-", dir=flwr_home)))
    rc_path = flwr_home / "run_config.toml"
    rc_path.write_text(tomli_w.dumps(run_config))
    cmd = [flower_bin("flwr"), "run", str(app_dir), connection, "--stream", "--run-config", str(rc_path)]
    if federation_config:
        cmd += ["--federation-config", " ".join(f"{k}={_toml_value(v)}" for k, v in federation_config.items())]
    proc = tracker.popen("flwr run", cmd, env=env, cwd=app_dir, pipe=True)
    run_id: int | None = None
    timer = None
    timed_out = threading.Event()
    if timeout:
        def _expire() -> None:
            timed_out.set()
            _signal(proc.pid, signal.SIGTERM)
        timer = threading.Timer(timeout, _expire)
        timer.daemon = True
        timer.start()
    try:
        with open(log_path, "a", encoding="utf-8") as f:
            for line in proc.stdout or ():
                f.write(line)
                f.flush()
                clean = _ANSI.sub("", line.rstrip("\n"))
                m = _RUN_ID.search(clean)
                if m and run_id is None:
                    run_id = int(m.group(1))
                if echo:
                    echo(clean)
        proc.wait()
    finally:
        if timer:
            timer.cancel()
    if timed_out.is_set():
        raise FlowerProcessError(f"the run did not finish within {timeout:.0f} s; stopped (log: {log_path})")
    if run_id is None:
        raise FlowerProcessError(f"`flwr run` did not start a run (exit code {proc.returncode}):\n{tail(log_path)}")
    return run_id


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))


def finished_status(connection: str, run_id: int, env: dict, summary_path: Path, since: float) -> tuple[str, str]:
    """(status, details) of a run whose ``flwr run --stream`` has returned.

    When the ServerApp wrote ``summary_path`` after ``since`` (a ``time.time()``) with status ``completed``
    (its last write, after the final round's outputs), the run completed: ``("finished:completed", "")``
    without asking Flower (``flwr ls`` is one more Python process, ~1 s on a 2-core machine). Otherwise
    (no summary, an older one, or another status) Flower's own answer from :func:`run_status`.
    """
    try:
        if summary_path.stat().st_mtime >= since and json.loads(summary_path.read_text()).get("status") == "completed":
            return "finished:completed", ""
    except (OSError, ValueError, AttributeError):
        pass
    return run_status(connection, run_id, env)


def run_status(connection: str, run_id: int, env: dict, timeout: float = 180.0) -> tuple[str, str]:
    """(status, details) of a run from ``flwr ls <connection> --run-id <id> --format json``.

    Status is e.g. ``finished:completed`` or ``finished:failed``; ('unknown', text) if unreadable or when
    ``flwr ls`` does not answer within ``timeout`` seconds.
    """
    cmd = [flower_bin("flwr"), "ls", connection, "--run-id", str(run_id), "--format", "json"]
    try:
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "unknown", f"`{' '.join(cmd[1:])}` did not answer within {timeout:.0f} s"
    try:
        start = res.stdout.index("{")
        data = json.loads(res.stdout[start:])
        run = data["runs"][0]
        return run.get("status", "unknown"), run.get("status-details", "")
    except (ValueError, KeyError, IndexError):
        return "unknown", (res.stdout + res.stderr)[-2000:]


def _raise_interrupt(signum, frame) -> None:
    # First SIGTERM: unwind like Ctrl-C; ignore repeats so the cleanup (stopping Flower by PID) finishes.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def unwind_on_sigterm() -> None:
    """Make SIGTERM behave like Ctrl-C (KeyboardInterrupt) in the main thread, so the ``finally``
    blocks that stop every Flower process this CLI started (:class:`ProcessTracker`) run; a second
    SIGTERM during that cleanup is ignored. Call once at the start of a CLI's main."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
