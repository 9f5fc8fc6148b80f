"""Run Flower's ``flower-supernode`` with a short idle poll instead of a fixed 3 s sleep (issue 12).

Flower 1.42's SuperNode loop (``flwr.supernode.start_client_internal.start_client_internal``) asks
the SuperLink for a message and, when none is waiting, sleeps a hard-coded 3 s before asking again;
no flag or environment variable changes it. A deployed round sends each site two messages (train,
then evaluate), so each waits 1.5 s on average, up to 3 s, before the site even sees it; the
simulation hands messages over in memory. While a reply is being computed the same loop checks its
local state for it every 0.5 s.

``python -m autosam_fl.supernode_polling /path/to/flower-supernode ARGS...`` runs that installed
``flower-supernode`` script unchanged (same arguments, same process tree: it still starts
``flower-superexec`` and one ``flwr-clientapp`` per message) after giving the module
``start_client_internal`` a ``time`` whose ``sleep`` waits at most ``$AUTOSAM_SUPERNODE_POLL_SECONDS``
(``autosam-client --poll-interval``, default :data:`POLL_SECONDS`); every other attribute is the real
:mod:`time`. Cost: one pull request to the SuperLink per idle site every ``POLL_SECONDS`` instead of
every 3 s (a TLS request the SuperLink answers on one core: keep it >= 1 s for many sites). When
Flower's module no longer looks as expected (another version), nothing is patched and a warning says
so: the SuperNode then runs with Flower's own 3 s.

The same launcher shortens the SuperNode's **heartbeat interval** from Flower's 30 s
(``flwr.common.constant.HEARTBEAT_DEFAULT_INTERVAL``, read by ``flwr.supernode.fleet_http_connection``,
which announces it to the SuperLink, and by ``flwr.supercore.heartbeat``, which paces the heartbeats) to
:data:`HEARTBEAT_SECONDS` (``$AUTOSAM_SUPERNODE_HEARTBEAT_SECONDS``, ``autosam-client --heartbeat-interval``). The SuperLink keeps a node online for ``HEARTBEAT_PATIENCE`` (2) intervals
after its last heartbeat, so a site killed without signing off is noticed by the coordinator, and its
key is free for a restarted site, after at most 2 x 15 = 30 s instead of 60 s. Cost: one heartbeat
request per site every ~8 s ((interval - 5 s call timeout) x 0.7-0.9) instead of every ~20 s. The
SuperLink accepts 10-1800 s (``HEARTBEAT_MIN_INTERVAL``/``MAX``). Unknown layouts keep 30 s, with a
warning.
"""

from __future__ import annotations

import os
import runpy
import sys
import time
import warnings

#: Default longest idle sleep of the SuperNode loop, in seconds (Flower's own: 3 s idle, 0.5 s per reply check).
POLL_SECONDS = 1.0
#: Environment variable that sets the cap for :func:`main` (seconds, > 0).
POLL_ENV = "AUTOSAM_SUPERNODE_POLL_SECONDS"
#: Heartbeat interval the SuperNode announces and keeps, in seconds (Flower's own: 30; SuperLink range 10-1800).
HEARTBEAT_SECONDS = 15.0
#: Environment variable that sets the heartbeat interval for :func:`main` (seconds, 10-1800).
HEARTBEAT_ENV = "AUTOSAM_SUPERNODE_HEARTBEAT_SECONDS"
#: Heartbeat intervals the SuperLink accepts (``flwr.common.constant.HEARTBEAT_MIN_INTERVAL``/``MAX``), seconds.
HEARTBEAT_RANGE = (10.0, 1800.0)
#: Missed intervals after which the SuperLink marks a node offline (``flwr.common.constant.HEARTBEAT_PATIENCE``).
HEARTBEAT_PATIENCE = 2


class CappedSleepTime:
    """A stand-in for the :mod:`time` module whose ``sleep(s)`` sleeps ``min(s, cap)`` seconds.

    Args:
        cap: > 0, the longest sleep in seconds.

    Raises:
        ValueError: ``cap`` is not a positive number.
    """

    def __init__(self, cap: float = POLL_SECONDS) -> None:
        if not cap > 0:
            raise ValueError(f"cap must be > 0 seconds, found {cap!r}")
        self.cap = float(cap)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(float(seconds), self.cap))

    def __getattr__(self, name: str):
        return getattr(time, name)


def install(cap: float = POLL_SECONDS) -> bool:
    """Cap the sleeps of Flower's SuperNode loop at ``cap`` seconds in this process.

    Returns:
        True when patched (or already patched); False when ``flwr.supernode.start_client_internal``
        has no module-level ``time`` (a Flower version other than the one this was written for),
        in which case nothing is changed.
    """
    import flwr.supernode.start_client_internal as loop

    current = getattr(loop, "time", None)
    if isinstance(current, CappedSleepTime):
        current.cap = float(cap)
        return True
    if current is not time:
        return False
    loop.time = CappedSleepTime(cap)
    return True


def install_heartbeat(seconds: float = HEARTBEAT_SECONDS) -> bool:
    """Make the SuperNode of this process announce and keep a ``seconds`` heartbeat interval.

    Returns:
        True when both Flower modules were patched; False when either lacks a numeric module-level
        ``HEARTBEAT_DEFAULT_INTERVAL`` (another Flower version): then nothing is changed.
    """
    import flwr.supercore.heartbeat as pace
    import flwr.supernode.fleet_http_connection as conn

    modules = (conn, pace)
    if not all(isinstance(getattr(m, "HEARTBEAT_DEFAULT_INTERVAL", None), (int, float)) for m in modules):
        return False
    for m in modules:
        m.HEARTBEAT_DEFAULT_INTERVAL = float(seconds)
    return True


def _seconds_from_env(name: str, default: float, ok, expected: str) -> float:
    """``$name`` as seconds (``default`` when unset or blank).

    Raises:
        SystemExit: code 2, naming the variable, what was expected and what was found, when the value is
        not a number or ``ok(value)`` is false.
    """
    raw = os.environ.get(name, "")
    try:
        value = float(raw) if raw.strip() else default
        if not ok(value):
            raise ValueError
    except ValueError:
        print(f"error: {name} must be a number of seconds {expected}, found {raw!r}", file=sys.stderr)
        raise SystemExit(2) from None
    return value


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``argv[0]`` is the ``flower-supernode`` script to run, the rest its arguments.

    The cap is ``$AUTOSAM_SUPERNODE_POLL_SECONDS`` when set, else :data:`POLL_SECONDS`; the heartbeat
    interval ``$AUTOSAM_SUPERNODE_HEARTBEAT_SECONDS`` when set, else :data:`HEARTBEAT_SECONDS`.

    Raises:
        SystemExit: with usage (code 2) when no script is given, the poll variable is not a positive
        number or the heartbeat variable is not a number in :data:`HEARTBEAT_RANGE`; otherwise the
        SuperNode's own exit.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print("usage: python -m autosam_fl.supernode_polling /path/to/flower-supernode [ARGS...]", file=sys.stderr)
        raise SystemExit(2)
    cap = _seconds_from_env(POLL_ENV, POLL_SECONDS, lambda v: v > 0, "> 0")
    lo, hi = HEARTBEAT_RANGE
    heartbeat = _seconds_from_env(HEARTBEAT_ENV, HEARTBEAT_SECONDS, lambda v: lo <= v <= hi,
                                  f"in {lo:g}-{hi:g} (the SuperLink's range)")
    if not install(cap):
        warnings.warn("flwr.supernode.start_client_internal has no module-level `time` (not Flower 1.42?): "
                      "the SuperNode keeps Flower's 3 s idle poll", RuntimeWarning, stacklevel=1)
    if not install_heartbeat(heartbeat):
        warnings.warn("Flower's SuperNode has no module-level HEARTBEAT_DEFAULT_INTERVAL (not Flower 1.42?): it keeps "
                      "Flower's 30 s heartbeat, so a killed site's key is released after up to 60 s",
                      RuntimeWarning, stacklevel=1)
    sys.argv = argv
    runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
