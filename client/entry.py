"""The AutoSAM-FL ClientApp component (``client.entry:app``): a thin dispatcher.

In a deployment ``autosam-client`` puts ``site-worker`` (a Unix socket) into the SuperNode's node
config; each message (a fresh ``flwr-clientapp`` process per message in Flower 1.42) is then forwarded
to that long-lived site worker (:mod:`client.worker`), which keeps SAM, g, the embedding cache and the
trainer loaded across rounds. This module imports only flwr and the wire protocol, so the per-message
process starts in about a second and stays small.

Without ``site-worker`` (simulation, tests) the message is handled in this process by
:mod:`client.app`, which caches the model per process (a simulation actor keeps it across rounds).
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from autosam_fl import protocol as P

app = ClientApp()


def _dispatch(kind: str, msg: Message, context: Context) -> Message:
    address = str(context.node_config.get(P.NODE_SITE_WORKER, "")).strip()
    if not address:
        from client import app as site_app

        return getattr(site_app, kind)(msg, context)
    from client.worker import WorkerUnavailable, call_worker

    try:
        status, payload = call_worker(address, kind, msg, context)
    except WorkerUnavailable as err:
        site = str(context.node_config.get(P.NODE_SITE_ID, "")) or f"node-{context.node_id}"
        config = msg.content.get(P.CONFIG, {}) if hasattr(msg.content, "get") else {}
        rnd = config.get(P.GLOBAL_ROUND, config.get(P.SERVER_ROUND, 0)) if config else 0
        raise RuntimeError(P.site_error_text(site, rnd, err)) from None
    if status != "ok":
        raise RuntimeError(str(payload)) from None
    return Message(payload, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train instruction: forwarded to the site worker, else handled by :func:`client.app.train`."""
    return _dispatch("train", msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Federated validation: forwarded to the site worker, else :func:`client.app.evaluate`."""
    return _dispatch("evaluate", msg, context)
