"""Pull a round's replies from the SuperLink every fraction of a second instead of every 3 s (issue 12).

Flower 1.42's deployment grid (``flwr.superlink.grid.http_grid.HttpGrid.send_and_receive``) sleeps a
fixed 3 s between two pulls of the replies it waits for, so every train and every evaluate message
of a deployed round waits 1.5 s on average, up to 3 s, after the last site has answered; the
simulation's in-memory grid pulls every 0.1 s. :class:`ReplyPollingGrid` wraps the grid the
ServerApp receives and implements ``send_and_receive`` with the grid's own ``push_messages`` and
``pull_messages`` (the public :class:`flwr.serverapp.Grid` API), polling every
:data:`POLL_SECONDS` (as often as the simulation's grid); everything else is delegated unchanged.
Same replies, same timeout semantics (``None``: wait until every reply is in; else return what arrived within ``timeout`` seconds).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

#: Seconds between two pulls of outstanding replies (one small gRPC call each).
POLL_SECONDS = 0.1


class ReplyPollingGrid(Grid):
    """A :class:`flwr.serverapp.Grid` that forwards to ``inner`` and polls replies every ``poll_seconds``.

    Args:
        inner: the Grid Flower gave the ServerApp (deployment or simulation).
        poll_seconds: > 0, seconds between two ``pull_messages`` calls while replies are missing.

    Raises:
        ValueError: ``poll_seconds`` is not a positive number.
    """

    def __init__(self, inner: Grid, poll_seconds: float = POLL_SECONDS) -> None:
        if not poll_seconds > 0:
            raise ValueError(f"poll_seconds must be > 0, found {poll_seconds!r}")
        self.inner = inner
        self.poll_seconds = float(poll_seconds)

    # the Grid API, delegated
    def set_run(self, run) -> None:
        self.inner.set_run(run)

    @property
    def run(self):
        return self.inner.run

    def create_message(self, *args, **kwargs) -> Message:
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def get_nodes(self):
        return self.inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages``, then pull their replies every ``poll_seconds`` until all are in or
        ``timeout`` seconds (``None``: no limit) have passed. Returns the replies received."""
        pending = {mid for mid in self.push_messages(messages) if mid}
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            pulled = list(self.pull_messages(pending))
            replies.extend(pulled)
            pending.difference_update(m.metadata.reply_to_message_id for m in pulled)
            if not pending:
                break
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                time.sleep(min(self.poll_seconds, left))
            else:
                time.sleep(self.poll_seconds)
        return replies
