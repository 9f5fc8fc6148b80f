"""Test-only fault injection: a site's train handler fails on purpose in chosen rounds.

The product has no fault hook (no environment variable of the ClientApp makes it fail). Tests that
need a failing site get one from here, in one of two ways:

- handlers called in this process (``client.app.train(msg, ctx)``): :func:`inject` monkeypatches
  :mod:`client.app` for the duration of the test;
- a federation in Flower's simulation runtime, whose ClientApps run in other processes (Ray actors
  started by ``flwr-simulation``): pass :func:`simulation_env` as ``extra_env`` (or merge it into a
  subprocess's environment). It puts ``tests/fault_hook`` on ``PYTHONPATH``; that folder's
  ``sitecustomize.py`` runs at start-up in every Python process of the run and, as soon as a process
  imports :mod:`client.app`, applies the same patch there. Flower hands ``PYTHONPATH`` on to its Ray
  workers (``RayBackend.init_ray``), so the ClientApp actors are patched too; ``tests/`` is not part
  of the Flower App Bundle, which is why the hook travels by ``PYTHONPATH`` and not by the bundle.

The fault is raised inside the real ``train`` (right after the site runtime is built, before the
global state is loaded), so it takes the product's own error path: the server sees
``[site <id>] round <r>: InjectedFault: injected fault ...``, and with the reply audit on only the
type leaves the site.

Spec: ``"SITE@ROUND[:ACTION][,SITE@ROUND[:ACTION]...]"``; SITE may be ``*`` (every site). ROUND is the
global round (the one a resumed federation keeps counting). ACTION (default: fail):

- ``sleep=SECONDS``: the site is slow: it sleeps that long, then trains normally (a round long enough
  for a test to kill the site or the coordinator in it);
- ``wait=PATH``: the site waits until the file PATH exists (at most 600 s), then trains normally (a
  round that lasts until the test says so, e.g. until a restarted site has rejoined).

Slow actions also work in a deployment: put :func:`simulation_env` into the environment of an
``autosam-client`` process, whose site worker runs :mod:`client.app` in that process.

This module is loaded into every process of a faulty simulation (also the SuperLink's): it imports
only the standard library at import time.
"""

from __future__ import annotations

import contextvars
import importlib.abc
import importlib.util
import os
import sys
from pathlib import Path

#: Environment variable read by ``tests/fault_hook/sitecustomize.py`` (never by the product).
SPEC_ENV = "AUTOSAM_TEST_FAULT"
HOOK_DIR = Path(__file__).resolve().with_name("fault_hook")
TARGET = "client.app"

_TRAIN_ROUND: contextvars.ContextVar[int | None] = contextvars.ContextVar("autosam_test_train_round", default=None)


class InjectedFault(RuntimeError):
    """Raised on purpose by a test's fault spec."""


def actions(spec: str, site_id: str, server_round: int) -> list[tuple[str, str]]:
    """The actions of ``spec`` for ``site_id`` in ``server_round``, in spec order: ``("fail", "")``,
    ``("sleep", seconds)`` or ``("wait", path)``."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        site, _, rest = item.partition("@")
        rnd, _, action = rest.partition(":")
        if site.strip() in ("*", site_id) and rnd.strip().isdigit() and int(rnd) == server_round:
            kind, _, arg = action.strip().partition("=")
            out.append((kind.strip() or "fail", arg.strip()))
    return out


def should_fail(spec: str, site_id: str, server_round: int) -> bool:
    """Whether ``spec`` (``SITE@ROUND,...``) makes ``site_id`` fail in ``server_round``."""
    return any(kind == "fail" for kind, _ in actions(spec, site_id, server_round))


def _slow_down(kind: str, arg: str) -> None:
    import time

    if kind == "sleep":
        time.sleep(float(arg))
    elif kind == "wait":
        deadline = time.monotonic() + 600
        while not Path(arg).exists() and time.monotonic() < deadline:
            time.sleep(0.2)
    elif kind != "fail":
        raise ValueError(f"{SPEC_ENV}: unknown action {kind!r} (fail, sleep=SECONDS, wait=PATH)")


def patched(app_module, spec: str) -> dict:
    """Replacements for ``train`` and ``get_site_runtime`` of ``app_module`` (:mod:`client.app`).

    ``train`` notes the instruction's round; ``get_site_runtime``, called by the real ``train``
    inside its error handling, raises :class:`InjectedFault` (or sleeps/waits, for a slow site) when
    the site and round match (never during ``evaluate``).
    """
    from autosam_fl import protocol as P

    real_train, real_runtime = app_module.train, app_module.get_site_runtime

    def train(msg, context):
        try:
            rnd = P.instruction_round(msg.content[P.CONFIG])
        except Exception:  # noqa: BLE001 - a malformed instruction is the real handler's business
            rnd = None
        token = _TRAIN_ROUND.set(rnd)
        try:
            return real_train(msg, context)
        finally:
            _TRAIN_ROUND.reset(token)

    def get_site_runtime(context, config):
        rt = real_runtime(context, config)
        rnd = _TRAIN_ROUND.get()
        for kind, arg in actions(spec, rt.site.site_id, rnd) if rnd is not None else ():
            _slow_down(kind, arg)
            if kind == "fail":
                raise InjectedFault(f"injected fault ({SPEC_ENV}={spec}) at site {rt.site.site_id} in round {rnd}")
        return rt

    return {"train": train, "get_site_runtime": get_site_runtime}


def inject(monkeypatch, spec: str) -> None:
    """In this process: make :mod:`client.app`'s ``train`` fail per ``spec`` until the test ends."""
    from client import app as client_app

    for name, fn in patched(client_app, spec).items():
        monkeypatch.setattr(client_app, name, fn)


def simulation_env(spec: str, base: dict | None = None) -> dict[str, str]:
    """Environment for the processes of a simulated federation whose sites fail per ``spec``.

    Args:
        base: the environment whose ``PYTHONPATH`` to extend (default: this process's).

    Returns:
        ``{SPEC_ENV: spec, "PYTHONPATH": <tests/fault_hook>:<the current PYTHONPATH>}``.
    """
    current = (base if base is not None else os.environ).get("PYTHONPATH", "")
    return {SPEC_ENV: spec, "PYTHONPATH": os.pathsep.join(p for p in (str(HOOK_DIR), current) if p)}


# ----- the start-up hook (tests/fault_hook/sitecustomize.py) ---------------------------------------------
class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds :mod:`client.app` with the other finders and patches it right after it is executed."""

    def __init__(self, spec: str):
        self.spec = spec

    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        found = None
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                found = finder.find_spec(fullname, path, target)
                if found is not None:
                    break
        if found is None or found.loader is None:
            return found
        inner, fault = found.loader, self.spec

        class _Loader(importlib.abc.Loader):
            def create_module(self, module_spec):
                return inner.create_module(module_spec)

            def exec_module(self, module):
                inner.exec_module(module)
                for name, fn in patched(module, fault).items():
                    setattr(module, name, fn)

        found.loader = _Loader()
        return found


def install_on_import() -> None:
    """Called at start-up by ``sitecustomize``: patch :mod:`client.app` when this process imports it."""
    spec = os.environ.get(SPEC_ENV, "").strip()
    if spec and not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport(spec))
