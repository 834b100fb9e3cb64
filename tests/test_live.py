"""Live delivery (issue 13): ``subscribe``, pushed ``queued`` events, ``msg-client watch``."""

from __future__ import annotations

import asyncio
import re

import pytest

from client.connection import ClientError, RelayClient
from pki.keystore import load_keystore
from protocol.errors import ProtocolError
from protocol.frames import decode_payload
from protocol.messages import (
    GetRequest,
    HelloRequest,
    QueuedEvent,
    SubscribeResult,
    is_event,
    ok_response,
    parse_event,
)

from .harness import RelayProcess, private_client, private_pki, private_relay, run_client
from .watching import WatchProcess

LINE = re.compile(r"^(\d+):([^:]+):\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ:(.*)$")


def nums(lines: list[str]) -> list[int]:
    return [int(m.group(1)) for m in map(LINE.match, lines) if m]


@pytest.fixture()
def world(tmp_path):
    private_pki(tmp_path, ("ANNA", "BEN", "CARL"))
    server = private_relay(tmp_path)
    for uid in ("ANNA", "BEN", "CARL"):
        assert private_client(server, tmp_path, uid, "askqueue").code == 0  # keys published
    yield server
    server.stop()


def send(server, tmp_path, sender: str, to: str, subject: str, body: bytes = b"body") -> None:
    r = private_client(server, tmp_path, sender, "send", to, subject, stdin=body)
    assert r.code == 0, r.err


def test_watch_prints_what_is_unread_then_each_new_message_and_ends_on_ctrl_c(world, tmp_path):
    send(world, tmp_path, "ANNA", "BEN", "before the watch")
    watch = WatchProcess(world.address, tmp_path, "BEN")
    try:
        first = LINE.match(watch.next_line())
        assert first and first.groups() == ("1", "ANNA", "before the watch")
        send(world, tmp_path, "CARL", "BEN", "while watching")
        second = LINE.match(watch.next_line())
        assert second and second.groups() == ("2", "CARL", "while watching")
        send(world, tmp_path, "ANNA", "BEN", "and again")
        assert LINE.match(watch.next_line()).groups() == ("3", "ANNA", "and again")  # type: ignore[union-attr]
        assert watch.interrupt() == 0
        assert not any("Traceback" in e for e in watch.err), watch.err
    finally:
        watch.kill()
    listed = private_client(world, tmp_path, "BEN", "askqueue")
    assert nums(listed.out.splitlines()) == [1, 2, 3]  # watching shows, it does not mark read


def test_watch_open_prints_each_message_and_marks_it_read(world, tmp_path):
    watch = WatchProcess(world.address, tmp_path, "BEN", "--open")
    try:
        send(world, tmp_path, "ANNA", "BEN", "opened live", b"the body itself")
        shown = watch.lines_until(lambda line: line == "the body itself")
        assert "From: ANNA" in shown and "Subject: opened live" in shown
        assert watch.interrupt() == 0
    finally:
        watch.kill()
    assert private_client(world, tmp_path, "BEN", "askqueue").out == ""


def test_a_relay_restart_is_survived_without_missing_or_repeating_a_message(tmp_path):
    private_pki(tmp_path, ("ANNA", "BEN"))
    relay = RelayProcess(tmp_path, tmp_path)
    relay.start()
    at = f"127.0.0.1:{relay.port}"
    watch = None
    try:
        for uid in ("ANNA", "BEN"):
            assert run_client(at, tmp_path / f"{uid}.p12", "askqueue", state=tmp_path / "st" / uid).code == 0

        def send_one(subject: str) -> None:
            r = run_client(at, tmp_path / "ANNA.p12", "send", "BEN", subject, stdin=b"x", state=tmp_path / "st" / "ANNA")
            assert r.code == 0, r.err

        send_one("one")
        watch = WatchProcess(at, tmp_path, "BEN")
        assert nums([watch.next_line()]) == [1]
        relay.kill()
        relay.start()  # same port and database: the watcher comes back by itself
        send_one("two")  # stored while the watcher may still be away
        send_one("three")
        got = watch.lines_until(lambda line: line.endswith(":three"))
        assert nums(got) == [2, 3], got
        assert watch.interrupt() == 0
    finally:
        if watch is not None:
            watch.kill()
        relay.kill()


def test_events_and_pipelined_answers_share_one_connection(world, tmp_path):
    """Requests pipelined while events arrive: every answer reaches the request that asked for it."""

    async def scenario() -> int:
        store = load_keystore(tmp_path / "BEN.p12")
        async with RelayClient(store, "127.0.0.1", world.port, store.ca_certificates()) as ben:
            await ben.subscribe()
            asker = asyncio.ensure_future(ben.pipeline([HelloRequest(ben.next_id()) for _ in range(200)]))
            await asyncio.to_thread(send, world, tmp_path, "ANNA", "BEN", "during the pipeline")
            answers = await asker
            assert all(not isinstance(a, Exception) for a in answers)
            assert await ben.wait_queued(0, 30)
            missing = await ben.pipeline([GetRequest(ben.next_id(), 99)])
            assert "no message number 99" in str(missing[0])
            return ben.queued_num

    assert asyncio.run(scenario()) == 1


def test_events_are_told_from_responses():
    assert is_event({"v": 1, "event": "queued", "num": 3})
    assert not is_event({"v": 1, "id": 3, "ok": True})
    assert not is_event({"v": 1, "id": 3, "event": "queued", "num": 3})  # an answer, whatever else it says
    assert parse_event({"v": 1, "event": "queued", "num": 3}) == QueuedEvent(3)
    assert parse_event({"v": 1, "event": "from-the-future"}) is None  # newer relays may push more
    for bad in ({"event": "queued", "num": 0}, {"event": "queued", "num": "3"}, {"event": "queued"}):
        with pytest.raises(ProtocolError):
            parse_event(bad)


def test_a_relay_that_pushes_a_malformed_event_is_one_line(tmp_path):
    from .hostile_relay import HostileRelay

    private_pki(tmp_path, ("BEN",))
    with HostileRelay(tmp_path) as relay:
        relay.enroll("BEN")
        relay.answers["subscribe"] = lambda obj, uid: [ok_response(obj["id"], SubscribeResult()),
                                                       {"v": 1, "event": "queued", "num": -5}]
        r = run_client(relay.address, tmp_path / "BEN.p12", "watch", state=tmp_path / "st" / "BEN")
    assert r.code == 1
    assert r.err.startswith("msg-client: bad event from the relay: field 'num' out of range") and r.err.count("\n") == 1, r.err


def test_a_flood_of_events_is_held_as_one_number():
    """However many events a relay pushes, a client keeps one number (and no list of them)."""
    client = RelayClient.__new__(RelayClient)
    client.queued_num = 0
    client._queued = asyncio.Event()
    for n in range(1, 10_001):
        client._on_event({"v": 1, "event": "queued", "num": n})
    client._on_event({"v": 1, "event": "queued", "num": 5})  # going back changes nothing
    assert client.queued_num == 10_000
    with pytest.raises(ClientError):
        client._on_event({"v": 1, "event": "queued", "num": True})


def test_a_watcher_pings_an_idle_relay_and_reconnects_to_one_that_stops_answering(tmp_path):
    """A watch with nothing to show pings the relay (an idle connection is not closed by the relay's idle
    timeout, and a dead relay is noticed); when the ping is not answered, it connects and subscribes again."""
    from client.mailbox import Mailbox
    from client.state import ClientState
    from pki.validation import TrustPolicy

    from .hostile_relay import HostileRelay, Later

    private_pki(tmp_path, ("BEN",))
    with HostileRelay(tmp_path) as relay:
        relay.enroll("BEN")
        relay.answers["subscribe"] = lambda obj, uid: ok_response(obj["id"], SubscribeResult())
        hellos = 0

        def hello(obj, uid):  # type: ignore[no-untyped-def]
            nonlocal hellos
            hellos += 1  # the connection's own hello, then pings: the third is never answered in time
            return relay.honest(obj, uid) if hellos != 3 else Later(60, relay.honest(obj, uid))

        relay.answers["hello"] = hello

        async def scenario() -> None:
            store = load_keystore(tmp_path / "BEN.p12")
            client = RelayClient(store, "127.0.0.1", relay.port, store.ca_certificates(), timeout=1.0)
            mailbox = Mailbox(client, ClientState(tmp_path / "st"), TrustPolicy(store.ca_certificates(), []),
                              require_crl=False)
            watching = asyncio.ensure_future(mailbox.watch(print, print, keepalive=0.05, retry=(0.01, 0.05)))
            try:
                deadline = asyncio.get_running_loop().time() + 30
                while len(relay.ops("subscribe")) < 2:
                    assert not watching.done(), watching.exception()
                    assert asyncio.get_running_loop().time() < deadline, "the watcher did not subscribe again"
                    await asyncio.sleep(0.01)
            finally:
                watching.cancel()
                await client.close()

        asyncio.run(scenario())
        assert hellos >= 3


def test_a_closed_subscriber_is_forgotten(world, tmp_path):
    async def scenario() -> None:
        store = load_keystore(tmp_path / "BEN.p12")
        async with RelayClient(store, "127.0.0.1", world.port, store.ca_certificates()) as ben:
            await ben.subscribe()
            await ben.subscribe()  # twice is once
            await world.until(lambda relay: len(relay.watchers) == 1 and relay.watchers.uids() == ["BEN"],
                              "BEN subscribed once")
        await world.until(lambda relay: len(relay.watchers) == 0, "BEN forgotten after closing")

    asyncio.run(scenario())


def test_a_subscriber_that_does_not_read_gets_the_newest_number_once_it_reads():
    """Events for a peer that does not read are not queued up: one number waits, the newest."""
    from server.session import EVENT_BACKLOG, Session

    class Transport:
        def __init__(self) -> None:
            self.buffered = EVENT_BACKLOG  # the peer is not reading
            self.written: list[bytes] = []

        def is_closing(self) -> bool:
            return False

        def get_write_buffer_size(self) -> int:
            return self.buffered

    class Writer:
        def __init__(self) -> None:
            self.transport = Transport()
            self.reading = asyncio.Event()

        def write(self, data: bytes) -> None:
            self.transport.written.append(data)

        async def drain(self) -> None:
            await self.reading.wait()

    async def scenario() -> list[bytes]:
        session = Session.__new__(Session)
        session.writer = Writer()  # type: ignore[assignment]
        session.app = type("App", (), {"config": type("Config", (), {"max_frame": 9999})()})()  # type: ignore[assignment]
        session._event_num, session._event_task = 0, None
        for n in range(1, 1001):
            session.queued(n)
        session.queued(7)  # an older number changes nothing
        await asyncio.sleep(0)
        assert session.writer.transport.written == []  # type: ignore[attr-defined]
        session.writer.reading.set()  # type: ignore[attr-defined]
        while session._event_task is not None:
            await asyncio.sleep(0)
        return session.writer.transport.written  # type: ignore[attr-defined, no-any-return]

    written = asyncio.run(scenario())
    assert [decode_payload(w[4:]) for w in written] == [{"v": 1, "event": "queued", "num": 1000}]


def test_a_relay_without_live_delivery_is_one_line(tmp_path):
    """A relay from before ``subscribe`` answers it ``bad_request``: watch says so and stops."""
    from .hostile_relay import HostileRelay

    private_pki(tmp_path, ("BEN",))
    with HostileRelay(tmp_path) as relay:  # its honest answers know no "subscribe"
        relay.enroll("BEN")
        r = run_client(relay.address, tmp_path / "BEN.p12", "watch", state=tmp_path / "st" / "BEN")
    assert r.code == 1 and r.err == "msg-client: the relay refused: unknown operation 'subscribe'\n", r.err
