"""ReplyPollingGrid: the same replies as Flower's send_and_receive, pulled every poll_seconds."""

import time

import pytest
from flwr.app import RecordDict

from autosam_fl.reply_polling import ReplyPollingGrid


class _Meta:
    def __init__(self, reply_to: str) -> None:
        self.reply_to_message_id = reply_to


class _Reply:
    def __init__(self, reply_to: str) -> None:
        self.metadata = _Meta(reply_to)


class FakeGrid:
    """Replies to message k become available after ``ready_after[k]`` seconds."""

    def __init__(self, ready_after: dict[str, float]) -> None:
        self.ready_after = ready_after
        self.t0 = None
        self.pulls = 0
        self.delivered: set[str] = set()

    def push_messages(self, messages):
        self.t0 = time.monotonic()
        return list(self.ready_after)

    def pull_messages(self, message_ids):
        self.pulls += 1
        now = time.monotonic() - self.t0
        out = [mid for mid in message_ids if mid not in self.delivered and self.ready_after[mid] <= now]
        self.delivered.update(out)
        return [_Reply(mid) for mid in out]

    def get_node_ids(self):
        return [1, 2]


def test_all_replies_arrive_soon_after_the_last_is_ready():
    inner = FakeGrid({"a": 0.0, "b": 0.3})
    grid = ReplyPollingGrid(inner, poll_seconds=0.05)
    t0 = time.monotonic()
    replies = grid.send_and_receive([object(), object()], timeout=None)
    took = time.monotonic() - t0
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["a", "b"]
    assert 0.3 <= took < 1.0  # Flower's own loop would take 3 s here
    assert inner.pulls >= 3
    assert list(grid.get_node_ids()) == [1, 2]  # delegated


def test_timeout_returns_what_arrived():
    inner = FakeGrid({"a": 0.0, "b": 30.0})
    grid = ReplyPollingGrid(inner, poll_seconds=0.05)
    t0 = time.monotonic()
    replies = grid.send_and_receive([object(), object()], timeout=0.4)
    assert [r.metadata.reply_to_message_id for r in replies] == ["a"]
    assert 0.35 <= time.monotonic() - t0 < 1.5


def test_rejects_non_positive_poll():
    with pytest.raises(ValueError, match="poll_seconds"):
        ReplyPollingGrid(FakeGrid({}), poll_seconds=0)


def test_create_message_is_delegated():
    class G(FakeGrid):
        def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
            return ("made", message_type, dst_node_id, group_id, ttl)

    made = ReplyPollingGrid(G({})).create_message(RecordDict(), "train", 7, "1", ttl=5.0)
    assert made == ("made", "train", 7, "1", 5.0)
