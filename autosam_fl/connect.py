"""Why can a site not connect? One probe, one message per cause (before any Flower process starts).

A SuperNode that cannot connect retries silently (or, with site authentication, exits with a single
generic code), so ``autosam-client`` first opens one TCP connection and, for TLS, one handshake to
the SuperLink itself and names the cause:

- nothing listens at HOST:PORT (:data:`REFUSED`, worth waiting for: the coordinator may start later),
- the host name does not resolve or the port cannot be reached (:data:`UNREACHABLE`),
- the coordinator speaks TLS but the site was started with ``--insecure`` (:data:`SPEAKS_TLS`),
- the coordinator speaks plain text but the site expects TLS (:data:`NO_TLS`),
- the SuperLink's certificate is not signed by the given CA file, or is not valid for HOST
  (:data:`CERT_FAILED`), or the CA file is not a PEM certificate (:data:`BAD_CA`).

After the handshake the SuperLink may refuse to activate the node; Flower 1.42 gives the same answer
(``[code: 2004] Failed to activate SuperNode``) for a key it does not know and for a key whose
previous connection is still marked online (a SuperNode killed without signing off stays online
until it misses 2 heartbeats: up to 30 s with the 15 s interval ``autosam-client`` sets,
:mod:`autosam_fl.supernode_polling`). :class:`ConnectionMarker` tells the two apart: a
connected site records its node and a timestamp every few seconds in its state folder and clears it
when it signs off; a refusal within that time of a recorded heartbeat is the stale connection (wait and
retry), any other refusal is an unregistered key.

A restarted site need not wait for that release: the marker also records the node id, and when the
process that held it is no longer running, :func:`sign_off_node` deactivates that node on the
SuperLink with the site's own key (Flower's Fleet ``DeactivateNode``, the call a SuperNode makes when
it stops cleanly; the SuperLink accepts it only when signed by the key registered for that node). The
coordinator then sees the lost site's open message fail at once ("Node Unavailable"), and the site
connects after :data:`SIGN_OFF_SETTLE_SECONDS`. ``autosam-client`` does this before its first SuperNode
starts when the marker names a node of a process that is gone and still within its release time, and
again after a refused activation otherwise.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from autosam_core.files import atomic_write_json, file_sha256
from autosam_fl.supernode_polling import HEARTBEAT_PATIENCE, HEARTBEAT_SECONDS

REFUSED, UNREACHABLE, SPEAKS_TLS, NO_TLS, CERT_FAILED, BAD_CA = (
    "refused", "unreachable", "speaks-tls", "no-tls", "cert-failed", "bad-ca")

#: Flower frees a node that stopped without saying goodbye after HEARTBEAT_PATIENCE (2) missed
#: heartbeats of the interval the SuperNode announced (15 s, set by autosam_fl.supernode_polling; Flower's
#: own default is 30 s), i.e. up to 30 s after its last heartbeat.


def release_seconds(heartbeat_seconds: float | None = None) -> float:
    """Seconds after its last heartbeat that the SuperLink keeps a node online that stopped without signing
    off: ``HEARTBEAT_PATIENCE`` x the interval the node announced (default :data:`HEARTBEAT_SECONDS`)."""
    return HEARTBEAT_PATIENCE * float(heartbeat_seconds or HEARTBEAT_SECONDS)


NODE_RELEASE_SECONDS = int(release_seconds())

#: Seconds a restarted site waits between signing off its stale node and connecting again, so the coordinator's
#: next pull of replies sees that node offline first (the ServerApp here pulls every 0.1 s, Flower's own grid every
#: 3 s); a node reactivated before that pull would leave the lost site's open message without a reply. The new
#: SuperNode then needs about 1 s more to start (measured on the 2-core test machine), so the node is offline for
#: ~3 s: about 30 of the ServerApp's pulls.
SIGN_OFF_SETTLE_SECONDS = 2.0

ACTIVATION_FAILED, CONNECTED, SENT = "activation-failed", "connected", "sent"
#: The SuperNode's retries to reach its SuperLink ran past --max-wait-time (it then keeps retrying forever).
GAVE_UP = "gave-up"
#: A request of the SuperNode to its SuperLink failed and Flower retries it ("Connection attempt failed").
RETRYING = "retrying"


@dataclass
class Problem:
    """A connection problem: its cause (one of the constants above) and the operator's message."""

    cause: str
    message: str

    @property
    def retry(self) -> bool:
        """True for causes worth waiting for (the coordinator has not started yet)."""
        return self.cause == REFUSED


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) -> (host, port).

    Raises:
        ValueError: no port, or the port is not a number (the message names the address).
    """
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"--superlink {address!r}: expected HOST:PORT, e.g. 127.0.0.1:9092")
    return host.strip("[]"), int(port)


def probe_superlink(address: str, ca_file: Path | None, insecure: bool, timeout: float = 5.0) -> Problem | None:
    """Connect once to the SuperLink at ``address`` and check the transport; None when all is well.

    Args:
        address: ``HOST:PORT`` of the SuperLink (as given to the SuperNode).
        ca_file: CA certificate the site trusts (ignored with ``insecure``).
        insecure: the site will connect without TLS.
    """
    host, port = split_address(address)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except ConnectionRefusedError:
        return Problem(REFUSED, f"nothing listens at {host}:{port} (connection refused): the coordinator's "
                                "autosam-server is not running yet, or the host/port is wrong")
    except socket.gaierror as err:
        return Problem(UNREACHABLE, f"cannot resolve the SuperLink host {host!r} ({err}); check --superlink")
    except OSError as err:
        return Problem(UNREACHABLE, f"cannot reach {host}:{port} ({type(err).__name__}: {err}); check --superlink, "
                                    "the network and the coordinator's firewall")
    with sock:
        if insecure:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            try:
                with ctx.wrap_socket(sock, server_hostname=host):
                    pass
            except (ssl.SSLError, OSError):
                return None  # not TLS: plain text, as --insecure expects
            return Problem(SPEAKS_TLS, f"the coordinator at {host}:{port} speaks TLS but this site was started with "
                                       "--insecure; drop --insecure and pass --root-certificates <the coordinator's "
                                       "ca.crt>")
        try:
            ctx = ssl.create_default_context(cafile=str(ca_file))
        except (ssl.SSLError, OSError, ValueError) as err:
            return Problem(BAD_CA, f"--root-certificates {ca_file}: not a readable PEM CA certificate ({err}); "
                                   "use the ca.crt the coordinator created with `python -m server.certs`")
        try:
            with ctx.wrap_socket(sock, server_hostname=host):
                return None
        except ssl.SSLCertVerificationError as err:
            why = getattr(err, "verify_message", "") or str(err)
            if "hostname" in why.lower() or "ip address mismatch" in why.lower():
                return Problem(CERT_FAILED, f"certificate verification failed: the SuperLink's certificate at "
                                            f"{host}:{port} is not valid for {host!r} ({why}); connect with the name "
                                            "the certificate was made for, or ask the coordinator to add it "
                                            "(`python -m server.certs --san <host>`)")
            return Problem(CERT_FAILED, f"certificate verification failed: the SuperLink's certificate at {host}:{port} "
                                        f"is not signed by the CA in {ca_file} ({why}); get the coordinator's ca.crt "
                                        "and pass it with --root-certificates")
        except (ssl.SSLError, ConnectionResetError, OSError) as err:
            return Problem(NO_TLS, f"the coordinator at {host}:{port} does not speak TLS (handshake failed: {err}); "
                                   "it was probably started with --insecure: ask the coordinator to start "
                                   "autosam-server with --certs, or (tests only) start this site with --insecure")


def node_id_in(line: str) -> int | None:
    """The node id in the SuperNode's ``SuperNode ID: <id>`` line (logged once connected), else None."""
    _, sep, rest = line.partition("SuperNode ID:")
    token = rest.strip().split(" ")[0] if sep else ""
    return int(token) if token.isdigit() else None


def sign_off_node(superlink: str, root_certificates: Path, key_file: Path, node_id: int) -> str | None:
    """Deactivate ``node_id`` on the SuperLink at ``superlink`` (``HOST:PORT``, TLS) with the site's private key.

    For a site whose previous process stopped without signing off (SIGKILL, power cut): the same request its
    SuperNode sends when it stops cleanly, so the SuperLink frees the node now instead of after 2 missed
    heartbeats. The SuperLink checks the signature against the public key registered for ``node_id``: a key
    can sign off only its own node.

    Args:
        root_certificates: the CA certificate (PEM) that signed the SuperLink's certificate.
        key_file: the site's private key (OpenSSH format, as ``autosam-client --auth-key``).

    Returns:
        None when the node was deactivated, else why not (one line: the SuperLink's answer or the error).
    """
    import httpx
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.proto.fleet_pb2 import DeactivateNodeRequest  # pylint: disable=no-name-in-module
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor
    from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor

    try:
        key = load_ssh_private_key(Path(key_file).read_bytes(), None)
    except (OSError, ValueError) as err:
        return f"cannot read the private key {key_file}: {err}"
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return f"{key_file} is not an elliptic-curve private key"
    try:
        ca = Path(root_certificates).read_bytes()
    except OSError as err:
        return f"cannot read the CA certificate {root_certificates}: {err}"
    try:
        with FleetHttpClient.from_server_address(
                superlink, False, ca,
                interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperNode"),
                              NodeAuthHttpInterceptor(key, key.public_key())]) as client:
            client.DeactivateNode(DeactivateNodeRequest(node_id=int(node_id)))
    except httpx.HTTPStatusError as err:
        return f"the SuperLink answered {err.response.status_code}: {err.response.text[:200]}"
    except (httpx.HTTPError, OSError, RuntimeError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def classify_supernode_line(line: str) -> str | None:
    """What a line of ``flower-supernode`` output means for the operator (None: nothing special)."""
    if "Failed to activate SuperNode" in line or "No SuperNode found with the given public key" in line \
            or "could not be activated" in line:
        return ACTIVATION_FAILED
    if "SuperNode ID:" in line:
        return CONNECTED
    if "Sent successfully" in line:
        return SENT
    if "Giving up reconnection after" in line:
        return GAVE_UP
    if "Connection attempt failed" in line:
        return RETRYING
    return None


class ConnectionMarker:
    """``<state dir>/connection-<site>.json``: this site's live connection (see module docstring).

    One marker per site and key (:func:`marker_path`), so a different key never waits for it.

    Args:
        path: the marker file.
        superlink: ``HOST:PORT`` the site connects to (a marker of another SuperLink is ignored).
        heartbeat_seconds: the heartbeat interval this site's SuperNode announces (``--heartbeat-interval``);
            written into the marker, so a restarted site waits for the interval its killed predecessor used.
    """

    def __init__(self, path: Path, superlink: str, heartbeat_seconds: float = HEARTBEAT_SECONDS):
        self.path, self.superlink, self.heartbeat_seconds = Path(path), superlink, float(heartbeat_seconds)

    def beat(self, node_id: int | None = None) -> None:
        """Record that the connection is alive now (atomic write)."""
        import os
        import time

        atomic_write_json(self.path, {"superlink": self.superlink, "node_id": node_id, "alive_at": time.time(),
                                      "pid": os.getpid(), "heartbeat_seconds": self.heartbeat_seconds}, mode=0o644)

    def clear(self) -> None:
        """The site signed off (its SuperNode deactivated the node): forget the connection."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def _record(self) -> dict | None:
        """The marker's contents when it exists, parses and names this SuperLink; else None."""
        import json

        try:
            data = json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return None
        return data if isinstance(data, dict) and data.get("superlink") == self.superlink else None

    def live_owner(self) -> int | None:
        """PID of another running process that holds this connection now (a second autosam-client), else None."""
        import os

        data = self._record()
        pid = int(data.get("pid", 0)) if data else 0
        if pid in (0, os.getpid()):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return pid
        return pid

    def stale_node_id(self) -> int | None:
        """The node id of the recorded connection when no other running process holds it (the
        ``autosam-client`` that recorded it stopped without signing off, or it was this process, whose
        SuperNode is gone), so this site may sign that node off (:func:`sign_off_node`); else None (no
        marker, another SuperLink, no node id recorded, or another ``autosam-client`` still runs)."""
        data = self._record()
        node_id = data.get("node_id") if data else None
        return node_id if isinstance(node_id, int) and self.live_owner() is None else None

    def release_in(self) -> float | None:
        """Seconds until the SuperLink releases the previous connection (its last beat + 2 of the heartbeat
        intervals it announced + 5 s); None if there is none to wait for."""
        import time

        data = self._record()
        if data is None:
            return None
        left = float(data.get("alive_at", 0)) + release_seconds(data.get("heartbeat_seconds")) + 5 - time.time()
        return left if left > 0 else None


def marker_path(state_dir: Path, site_id: str, key_file: Path) -> Path:
    """``<state dir>/connection-<site>-<first 12 hex of the key file's SHA-256>.json``."""
    digest = file_sha256(key_file)[:12]
    return Path(state_dir) / f"connection-{site_id}-{digest}.json"
