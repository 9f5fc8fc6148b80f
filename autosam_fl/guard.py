"""A tiny watchdog that cleans up after a CLI even when the CLI is killed with SIGKILL.

``autosam-client`` and ``autosam-server`` start the guard (``python -m autosam_fl.guard``) with a pipe
as its stdin and tell it, one line each, which process groups they started (``pgid N``) and which
temporary folders they own (``path P``). When the pipe closes, because the CLI exited in whatever
way (normal exit, Ctrl-C, SIGTERM, SIGKILL, the kernel closes the pipe in every case), the guard
sends SIGTERM to every group still alive, SIGKILL after a grace period, and removes the folders.
Flower's own helpers (``flower-superexec``, ``flwr-clientapp``, ``flwr-serverapp``) watch their
parent's PID and exit when it is gone, so stopping the group leaders ends the whole tree.

Only the standard library is used; the guard holds no model and costs about 10 MB.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # killpg(0) also succeeds for a group whose only members are zombies; look for a live member.
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            raw = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        rest = raw[raw.rfind(")") + 2:].split()
        if int(rest[2]) == pgid and rest[0] != "Z":
            return True
    return False


def cleanup(pgids: list[int], paths: list[str], grace: float = 5.0) -> None:
    """SIGTERM every live process group in ``pgids``, SIGKILL what is left after ``grace`` s, remove ``paths``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        live = [g for g in pgids if _group_alive(g)]
        for g in live:
            try:
                os.killpg(g, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + grace
        while live and time.monotonic() < deadline:
            live = [g for g in live if _group_alive(g)]
            time.sleep(0.1)
        if not live:
            break
    for p in paths:
        shutil.rmtree(p, ignore_errors=True)


def main() -> int:
    """Read ``pgid N`` / ``path P`` lines from stdin until EOF, then :func:`cleanup`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pgids: list[int] = []
    paths: list[str] = []
    for line in sys.stdin:
        kind, _, value = line.strip().partition(" ")
        if kind == "pgid" and value.isdigit():
            pgids.append(int(value))
        elif kind == "path" and value:
            paths.append(value)
    cleanup(pgids, paths)
    return 0


class Guard:
    """The CLI's handle on its guard process (see module docstring).

    Args:
        paths: temporary folders to remove when the CLI is gone.
    """

    def __init__(self, paths: list[Path] | None = None):
        self.proc = subprocess.Popen([sys.executable, "-m", "autosam_fl.guard"], stdin=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
                                     start_new_session=True, cwd="/", env=_guard_env())
        for p in paths or ():
            self.watch_path(p)

    def _send(self, line: str) -> None:
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            pass

    def watch_group(self, pgid: int) -> None:
        """Stop process group ``pgid`` when the CLI is gone."""
        self._send(f"pgid {int(pgid)}")

    def watch_path(self, path: Path) -> None:
        """Remove folder ``path`` when the CLI is gone."""
        self._send(f"path {Path(path).resolve()}")

    def close(self, timeout: float = 15.0) -> None:
        """Close the pipe (the guard cleans up what is left) and wait for it to exit."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


def _guard_env() -> dict:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    return env


if __name__ == "__main__":
    sys.exit(main())
