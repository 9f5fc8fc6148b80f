"""The long-lived site worker: SAM, g, the embedding cache and the trainer stay loaded across rounds.

Flower 1.42 starts a fresh ``flwr-clientapp`` process for every message a SuperNode receives (in both
isolation modes the process serves exactly one message and exits), so a ClientApp that built AutoSam
itself would reload SAM, g and the site's data every round. ``autosam-client`` therefore hosts a
:class:`SiteWorker` in its own process: a local Unix socket in the site's private temporary folder
(mode 0700), authenticated with a random key (``worker.key`` next to it, mode 0600). The ClientApp
(:mod:`client.entry`) only imports flwr, forwards the message and its Context to the worker
(:func:`call_worker`) and turns the answer into the reply; nothing else changes on the wire.

The worker's answer is ``("ok", RecordDict)`` (the reply's content) or ``("error", text)``, where text
is the site's one-line ``[site <id>] round <r>: ...`` error (:func:`autosam_fl.protocol.site_error_text`)
that the ClientApp raises so Flower turns it into an error reply.

Only the standard library is imported at module level: the ClientApp process stays small.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
from collections.abc import Callable
from multiprocessing.connection import Client, Listener
from pathlib import Path

log = logging.getLogger("autosam.client")

SOCKET_NAME = "worker.sock"
KEY_NAME = "worker.key"


class WorkerUnavailable(RuntimeError):
    """The ClientApp could not reach the site worker of ``autosam-client``."""


class SiteWorker:
    """Serve ClientApp messages in this process, one at a time, on ``<folder>/worker.sock``.

    Args:
        folder: a private folder (created with mode 0700) for the socket and its key.
        handler: ``handler(kind, message, context) -> RecordDict`` (``kind`` is ``train`` or
            ``evaluate``); an exception becomes ``("error", str(exception))``.
    """

    def __init__(self, folder: Path, handler: Callable):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        os.chmod(self.folder, 0o700)
        self.address = str(self.folder / SOCKET_NAME)
        self.key = secrets.token_bytes(32)
        key_path = self.folder / KEY_NAME
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self.key)
        self.handler = handler
        self._listener = Listener(self.address, family="AF_UNIX", authkey=self.key)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="autosam-site-worker", daemon=True)
        self.served = 0

    def start(self) -> "SiteWorker":
        """Start serving in a background thread; returns self."""
        self._thread.start()
        return self

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                conn = self._listener.accept()
            except Exception as err:  # noqa: BLE001 - closed listener or a client that failed to authenticate
                if self._closed.is_set():
                    return
                log.warning("site worker: refused a connection: %s", err)
                continue
            with conn:
                try:
                    kind, message, context = conn.recv()
                except (EOFError, OSError, ValueError) as err:
                    log.warning("site worker: unreadable request: %s", err)
                    continue
                try:
                    answer = ("ok", self.handler(kind, message, context))
                except Exception as err:  # noqa: BLE001 - every failure travels back as the reply's error
                    answer = ("error", str(err))
                self.served += 1
                try:
                    conn.send(answer)
                except (OSError, ValueError) as err:
                    log.error("site worker: the ClientApp went away before the %s reply was handed over: %s",
                              kind, err)

    def close(self) -> None:
        """Stop accepting requests and remove the socket and key files."""
        self._closed.set()
        try:
            self._listener.close()
        except OSError:
            pass
        for name in (SOCKET_NAME, KEY_NAME):
            try:
                (self.folder / name).unlink()
            except FileNotFoundError:
                pass


def call_worker(address: str, kind: str, message, context):
    """Send one message to the site worker at ``address`` and wait for its answer.

    Returns:
        ``("ok", RecordDict)`` or ``("error", text)``.

    Raises:
        WorkerUnavailable: no worker listens there or its key file is missing (names both and the fix).
    """
    key_path = Path(address).parent / KEY_NAME
    try:
        key = key_path.read_bytes()
        with Client(address, family="AF_UNIX", authkey=key) as conn:
            conn.send((kind, message, context))
            return conn.recv()
    except (FileNotFoundError, ConnectionRefusedError, EOFError, OSError) as err:
        raise WorkerUnavailable(
            f"the site worker of autosam-client at {address} is not reachable ({type(err).__name__}: {err}); "
            "is autosam-client still running? Restart it with the same --site and --auth-key") from None
