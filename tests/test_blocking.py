"""The one-shot connection (client/blocking.py): the refusals of the asyncio one, and its own rules.

``msg-client`` runs every command but ``watch`` on a blocking socket; the CLI tests elsewhere go through
it. Here: what only it does (never waiting on an event loop, reading answers before writing further
ahead than a relay can buffer), and the refusals that differ by connection, on both connections. The
relay is :class:`tests.hostile_relay.HostileRelay`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from client import blocking
from client.blocking import BlockingRelayClient, run_blocking
from client.connection import RelayClient
from client.errors import ClientError, ConnectionLost
from client.operations import RelayOperations
from pki.keystore import load_keystore
from protocol.frames import encode_frame
from protocol.messages import MarkReadRequest, MarkReadResult, QueueResult, SendRequest

from .harness import private_pki
from .hostile_relay import DEAF, HostileRelay, Later

T = TypeVar("T")
CONNECTIONS = {"asyncio": RelayClient, "blocking": BlockingRelayClient}


@pytest.fixture()
def relay(tmp_path: Path):
    private_pki(tmp_path, ("ALICE", "BOB"))
    with HostileRelay(tmp_path) as hostile:
        hostile.enroll("ALICE", "BOB")
        yield hostile


def _client(relay: HostileRelay, kind: type[RelayOperations], timeout: float = 5) -> RelayOperations:
    store = load_keystore(relay.directory / "ALICE.p12")
    return kind(store, "127.0.0.1", relay.port, store.ca_certificates(), timeout=timeout)


def _run(kind: type[RelayOperations], make: Callable[[], Awaitable[T]]) -> T:
    """Run a conversation the way each connection is used: on an event loop, or driven in one step."""
    async def go() -> T:
        return await make()

    return asyncio.run(go()) if kind is RelayClient else run_blocking(go())


def test_a_coroutine_that_waits_on_an_event_loop_is_refused():
    with pytest.raises(RuntimeError, match="awaited an event loop"):
        run_blocking(asyncio.sleep(0))


def test_run_blocking_returns_what_the_conversation_returns():
    async def answer() -> int:
        return 42

    assert run_blocking(answer()) == 42


@pytest.mark.parametrize("kind", CONNECTIONS.values(), ids=CONNECTIONS.keys())
def test_a_relay_that_never_answers_is_given_up_on(relay, kind):
    """The answer comes after 20 s; the client gives up after its 1 s (a client without the limit would
    get the answer and pass no exception)."""
    relay.answers["queue"] = lambda obj, uid: Later(20, QueueResult([], False))

    async def ask() -> None:
        async with _client(relay, kind, timeout=1) as c:
            await c.queue()

    start = time.monotonic()
    with pytest.raises(ConnectionLost, match="^the relay did not answer in time$"):
        _run(kind, ask)
    assert time.monotonic() - start < 15


@pytest.mark.parametrize(("kind", "line"), [
    (RelayClient, "the relay did not take our requests in time"),  # its write waits on the full buffers
    (BlockingRelayClient, "the relay did not answer in time"),  # it writes no further ahead than answers
], ids=CONNECTIONS.keys())
def test_a_relay_that_stops_reading_is_given_up_on(relay, kind, line):
    """Megabytes of pipelined requests to a relay that reads nothing after the first: the buffers between
    the two fill (the relay's kept small), and the client gives up after its time limit instead of waiting
    for ever."""
    relay.answers["hello"] = lambda obj, uid: DEAF

    async def flood() -> list[object]:
        async with _client(relay, kind, timeout=1) as c:
            big = [SendRequest(c.next_id(), "BOB", f"{n:032x}", 3, b"h", bytes(7000), b"s") for n in range(1500)]
            return await asyncio.wait_for(c.pipeline(big), 30) if kind is RelayClient else await c.pipeline(big)

    start = time.monotonic()
    results = _run(kind, flood)
    assert {str(r) for r in results} == {line} and all(isinstance(r, ConnectionLost) for r in results)
    assert time.monotonic() - start < 20


def test_after_an_answer_out_of_order_later_requests_fail_at_once_and_are_not_written(relay):
    relay.answers["directory"] = lambda obj, uid: {"v": 1, "id": obj["id"] + 1000, "ok": True}

    async def go() -> None:
        async with _client(relay, BlockingRelayClient) as c:
            with pytest.raises(ClientError, match="^the relay answered out of order$"):
                await c.directory("BOB")
            relay.answers.pop("directory")
            with pytest.raises(ClientError, match="^the relay answered out of order$"):
                await c.queue()  # the reason of the broken connection, not a new request

    run_blocking(go())
    assert relay.ops("queue") == []


@pytest.mark.parametrize("kind", CONNECTIONS.values(), ids=CONNECTIONS.keys())
def test_a_closed_client_stays_closed(relay, kind):
    """After close(), a request fails at once: it is neither written nor a reason to connect again."""
    connected = []

    async def go() -> None:
        c = _client(relay, kind)
        await c.connect()
        await c.close()
        c._connect_one = lambda: connected.append(1)  # type: ignore[method-assign,assignment,return-value]
        with pytest.raises(ClientError, match="^connection closed$"):
            await c.queue()

    _run(kind, go)
    assert relay.ops("queue") == [] and connected == []


class _Relay:
    """A socket stand-in that answers each request only when read, one answer per read, and records
    how many request bytes were written and not yet answered at most."""

    def __init__(self) -> None:
        self.unanswered: list[tuple[int, int]] = []  # (request id, frame size), oldest first
        self.most_unanswered = 0

    def settimeout(self, value: float) -> None:
        pass

    def sendall(self, data: bytes) -> None:
        while data:
            size = int.from_bytes(data[:4], "big") + 4
            self.unanswered.append((json.loads(data[4:size])["id"], size))
            data = data[size:]
        self.most_unanswered = max(self.most_unanswered, sum(size for _, size in self.unanswered))

    def recv(self, limit: int) -> bytes:
        rid, _ = self.unanswered.pop(0)
        return encode_frame({"v": 1, "id": rid, "ok": True})

    def close(self) -> None:
        pass


def test_requests_are_written_no_further_ahead_than_a_relay_can_buffer(relay, monkeypatch):
    """A relay may stop reading while its answers wait for us: written and unanswered request bytes stay
    bounded (twice the window, plus a frame), so neither side can block the other for good."""
    monkeypatch.setattr(blocking, "UNANSWERED_BYTES", 200)
    c = _client(relay, BlockingRelayClient)
    fake = _Relay()
    c._sock = fake  # type: ignore[assignment]
    requests = [MarkReadRequest(c.next_id(), n) for n in range(1, 41)]
    frame = len(encode_frame({"v": 1, "id": 40, "op": "mark_read", "num": 40}))
    results = run_blocking(c.pipeline(requests))
    assert results == [MarkReadResult()] * 40
    assert sum(frame for _ in requests) > 4 * 200  # the requests alone would overflow the window
    assert 0 < fake.most_unanswered <= 2 * 200 + frame


class _Dribbling(_Relay):
    """A relay that never answers but always has something to say: an event, every read."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def recv(self, limit: int) -> bytes:
        self.reads += 1
        assert self.reads < 100, "the client kept reading past its time limit"
        return encode_frame({"v": 1, "event": "queued", "num": self.reads})


class _Clock:
    """A second passes at every look."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1
        return self.now


@pytest.mark.parametrize("window", [False, True], ids=["waiting-for-an-answer", "waiting-to-write-more"])
def test_bytes_that_are_no_answer_do_not_stretch_the_time_limit(relay, monkeypatch, window):
    """Events (or a frame dribbled a byte at a time) keep arriving, answers never: the time limit still
    ends the wait, whether for an answer or for room to write more requests."""
    if window:
        monkeypatch.setattr(blocking, "UNANSWERED_BYTES", 100)
    c = _client(relay, BlockingRelayClient, timeout=5)
    assert isinstance(c, BlockingRelayClient)
    fake = _Dribbling()
    c._sock = fake  # type: ignore[assignment]
    c.clock = _Clock()
    results = run_blocking(c.pipeline([MarkReadRequest(c.next_id(), n) for n in range(1, 11)]))
    assert all(isinstance(r, ConnectionLost) and str(r) == "the relay did not answer in time" for r in results)
    assert fake.reads <= 6 and c.queued_num == fake.reads  # the events were taken, and did not buy time
