"""No single user can exhaust the relay (issue 11 §5): send rates, queue limits, fair connection limits."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets

import pytest

from client.connection import ClientError, RelayClient
from pki.keystore import load_keystore
from protocol.envelope import Sealed
from protocol.errors import ProtocolError
from protocol.messages import RemoteError
from server.cli import main as server_main
from server.quota import QuotaConfig, Quotas

from .harness import private_client, private_pki, private_relay


def sealed(size: int = 100) -> Sealed:
    return Sealed(3, secrets.token_bytes(64), secrets.token_bytes(size))


async def send_many(store, port: int, to: str, count: int, size: int = 100) -> list[RemoteError | None]:
    """``count`` pipelined sends; the error of each refused one (None for a stored one)."""
    async with RelayClient(store, "127.0.0.1", port, store.ca_certificates(), timeout=20) as c:
        reqs = [c.send_request(to, secrets.token_hex(16), sealed(size)) for _ in range(count)]
        return [r if isinstance(r, RemoteError) else None for r in await c.pipeline(reqs)]


def test_a_sender_over_its_rate_is_refused_with_quota(tmp_path):
    private_pki(tmp_path, ("ANNA", "BEN"))
    server = private_relay(tmp_path, quota=QuotaConfig(sends_per_minute=20))
    try:
        out = asyncio.run(send_many(load_keystore(tmp_path / "ANNA.p12"), server.port, "BEN", 30))
        assert out[:20] == [None] * 20
        assert {e.code for e in out[20:] if e is not None} == {"quota"} and None not in out[20:]
        assert "at most 20 messages a minute" in str(out[-1])
        # Another sender is not slowed by ANNA.
        assert asyncio.run(send_many(load_keystore(tmp_path / "BEN.p12"), server.port, "ANNA", 5)) == [None] * 5
    finally:
        server.stop()


def test_a_full_queue_refuses_until_its_reader_reads(tmp_path):
    private_pki(tmp_path, ("ANNA", "BEN"))
    server = private_relay(tmp_path, quota=QuotaConfig(max_unread=3))
    anna = load_keystore(tmp_path / "ANNA.p12")
    try:
        assert private_client(server, tmp_path, "BEN", "askqueue").code == 0
        for i in range(3):
            assert private_client(server, tmp_path, "ANNA", "send", "BEN", f"s{i}", stdin=b"x").code == 0
        full = private_client(server, tmp_path, "ANNA", "send", "BEN", "one too many", stdin=b"x")
        assert full.code == 1 and "queue of BEN is full" in full.err
        assert private_client(server, tmp_path, "BEN", "getmsg", "1").code == 0  # BEN reads one
        assert private_client(server, tmp_path, "ANNA", "send", "BEN", "room again", stdin=b"x").code == 0
        out = asyncio.run(send_many(anna, server.port, "BEN", 1))
        assert out[0] is not None and out[0].code == "quota"
    finally:
        server.stop()


def test_a_retry_of_a_stored_message_does_not_count_twice(tmp_path):
    private_pki(tmp_path, ("ANNA", "BEN"))
    server = private_relay(tmp_path, quota=QuotaConfig(max_unread=3))
    anna = load_keystore(tmp_path / "ANNA.p12")

    async def scenario() -> None:
        async with RelayClient(anna, "127.0.0.1", server.port, anna.ca_certificates(), timeout=20) as c:
            first = c.send_request("BEN", secrets.token_hex(16), sealed())
            second = c.send_request("BEN", secrets.token_hex(16), sealed())
            await c.pipeline([first, second])
            again = await c.pipeline([dataclasses.replace(second, id=c.next_id()) for _ in range(3)])
            assert not any(isinstance(r, Exception) for r in again)  # the first receipt, three times
            third = await c.pipeline([c.send_request("BEN", secrets.token_hex(16), sealed())])
            assert not isinstance(third[0], Exception)  # room for one more: the retries took none

    try:
        asyncio.run(scenario())
    finally:
        server.stop()


def test_a_queue_is_limited_in_bytes_too(tmp_path):
    private_pki(tmp_path, ("ANNA", "BEN"))
    server = private_relay(tmp_path, quota=QuotaConfig(max_unread_bytes=2000))
    try:
        out = asyncio.run(send_many(load_keystore(tmp_path / "ANNA.p12"), server.port, "BEN", 4, size=700))  # 764 bytes each
        assert out[:2] == [None, None] and all(e is not None and e.code == "quota" for e in out[2:])
    finally:
        server.stop()


def test_users_with_many_connections_cannot_lock_others_out(tmp_path):
    """A full relay closes the oldest idle connection of the user holding the most, not the newcomer."""
    private_pki(tmp_path, ("HOG", "QUIET"))
    server = private_relay(tmp_path, max_connections=4, max_per_user=8)
    hog, quiet = load_keystore(tmp_path / "HOG.p12"), load_keystore(tmp_path / "QUIET.p12")

    async def scenario() -> None:
        hogs = [RelayClient(hog, "127.0.0.1", server.port, hog.ca_certificates(), timeout=10) for _ in range(4)]
        for c in hogs:
            await c.connect()
            await c.queue()
        async with RelayClient(quiet, "127.0.0.1", server.port, quiet.ca_certificates(), timeout=10) as q:
            assert await q.queue() == []  # let in
        alive = 0
        for c in hogs:
            try:
                await c.queue()
                alive += 1
            except ClientError:
                pass
            await c.close()
        assert alive == 3  # exactly one of HOG's connections made room

    try:
        asyncio.run(scenario())
        events = [json.loads(x) for x in (tmp_path / "audit.log").read_text().splitlines()]
        assert any(e["event"] == "connection_closed" and e.get("uid") == "HOG" and "relay full" in e["reason"]
                   for e in events)
    finally:
        server.stop()


def test_the_per_user_default_leaves_room_for_others():
    from server.config import ServerConfig

    cfg = ServerConfig()
    assert cfg.max_per_user * 16 < cfg.max_connections  # 16 greedy users no longer fill the relay


@pytest.mark.parametrize("flag", ["--max-sends-per-minute", "--max-unread", "--max-unread-bytes"])
def test_quota_options_are_checked(flag, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert server_main([flag, "0", "--no-crl"]) == 2
    assert "must be at least 1" in capsys.readouterr().err


def test_admissions_waiting_for_a_queue_count_read_it_once():
    """Many sends to a queue not yet counted: one read of the store, and every admission counted."""
    reads = 0

    async def usage(uid: str) -> tuple[int, int]:
        nonlocal reads
        reads += 1
        await asyncio.sleep(0.01)  # the store is slow: admissions pile up behind the first read
        return (0, 0)

    quotas = Quotas(QuotaConfig(max_unread=5), usage)

    async def admit(i: int) -> bool:
        try:
            await quotas.check_room("BEN", 10, i)
        except ProtocolError:
            return False
        quotas.stored("BEN", 10)
        return True

    async def scenario() -> list[bool]:
        return list(await asyncio.gather(*(admit(i) for i in range(8))))

    admitted = asyncio.run(scenario())
    assert reads == 1
    assert admitted.count(True) == 5  # the limit holds although all eight arrived before the count
