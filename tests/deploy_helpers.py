"""A real deployment on 127.0.0.1 for tests: ``autosam-server`` and ``autosam-client`` processes with TLS
and site keys, each process's output in a log file, every process tracked and stopped by PID."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class Deployment:
    """Certificates, site keys and process handles of one test deployment (use as a context manager)."""

    def __init__(self, tmp: Path, sites: list[str]):
        from autosam_fl.processes import ProcessTracker, flower_env, free_port
        from server.certs import generate_site_key, generate_tls

        self.tmp = Path(tmp)
        self.certs = self.tmp / "certs"
        generate_tls(self.certs)
        for site in sites:
            generate_site_key(self.certs, site)
        self.port = free_port()
        self.env = flower_env(self.tmp / "flwr_test_home")
        self.tracker = ProcessTracker()
        self.procs: dict[str, object] = {}
        self.logs: dict[str, Path] = {}

    def __enter__(self) -> "Deployment":
        return self

    def __exit__(self, *exc) -> None:
        self.tracker.stop()

    def _start(self, name: str, cmd: list[str], env: dict | None = None):
        log = self.tmp / f"{name}.log"
        self.logs[name] = log
        proc = self.tracker.popen(name, [sys.executable, *cmd], env={**self.env, **(env or {})}, cwd=REPO,
                                  log_path=log)
        self.procs[name] = proc
        return proc

    def server(self, fed: Path, sites: list[str], *extra: str, name: str = "server", env: dict | None = None):
        """Start ``autosam-server`` with TLS and one ``--site-key`` per site (``env``: extra variables)."""
        keys = [a for s in sites for a in ("--site-key", f"{s}={self.certs / (s + '.pub')}")]
        return self._start(name, ["-m", "server.cli", str(fed), "--port", str(self.port), "--certs", str(self.certs),
                                  *keys, *extra], env)

    def client(self, site: str, site_yaml: Path, *extra: str, name: str | None = None, key: str | None = None,
               tls: bool = True, env: dict | None = None):
        """Start ``autosam-client`` for ``site`` (its own key unless ``key``; ``env``: extra variables, e.g.
        :func:`tests.fault_injection.simulation_env` for a slow or failing site)."""
        auth = ["--root-certificates", str(self.certs / "ca.crt"), "--auth-key", str(self.certs / (key or site))] \
            if tls else ["--insecure"]
        # One torch thread per site, as the README advises for several sites on one machine: with torch's
        # default (every core) 2-3 sites and the coordinator oversubscribe this 2-core machine.
        threads = [] if "--threads" in extra else ["--threads", "1"]
        return self._start(name or site, ["-m", "client.cli", "--site", str(site_yaml), "--superlink",
                                          f"127.0.0.1:{self.port}", *auth, *threads, *extra], env)

    def text(self, name: str) -> str:
        """Everything process ``name`` wrote so far."""
        try:
            return self.logs[name].read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for(self, name: str, needle: str, timeout: float) -> str:
        """Wait until ``needle`` appears in ``name``'s output; returns the output.

        Raises:
            AssertionError: timeout, or the process exited first (quotes the output).
        """
        deadline = time.time() + timeout
        while time.time() < deadline:
            text = self.text(name)
            if needle in text:
                return text
            if self.procs[name].poll() is not None:
                text = self.text(name)
                if needle in text:
                    return text
                raise AssertionError(f"{name} exited ({self.procs[name].returncode}) before {needle!r}:\n{text[-3000:]}")
            time.sleep(0.3)
        raise AssertionError(f"{needle!r} not in {name}'s output after {timeout:.0f} s:\n{self.text(name)[-3000:]}")

    def all_text(self) -> str:
        """Every log, for assertion messages."""
        return "".join(f"\n--- {n}:\n{self.text(n)[-2500:]}" for n in self.logs)


def descendants(pid: int) -> set[int]:
    """Live descendants of ``pid`` (from /proc)."""
    from autosam_fl.processes import _all_pids, _proc_stat

    children: dict[int, list[int]] = {}
    for p in _all_pids():
        st = _proc_stat(p)
        if st and st[2] != "Z":
            children.setdefault(st[0], []).append(p)
    out, frontier = set(), [pid]
    while frontier:
        for c in children.get(frontier.pop(), []):
            if c not in out:
                out.add(c)
                frontier.append(c)
    return out


def kill(pid: int, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to ``pid`` if it still runs."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
