"""Issue 13, connections that cost little: what the relay no longer spends per connection, and what it
still checks on every one.

* TLS reads land in one buffer per thread (server/tls_buffers.py): no byte is lost or mixed up between
  connections, threads never share it, and a loop that reads asynchronously keeps its own.
* The profile check is remembered per certificate (server/peer_cache.py): a reconnect skips it, a
  refused certificate is checked (and refused) every time, and a CRL change forgets everything.
* The audit log writes its lines directly (server/audit.py).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from client.connection import ClientError, RelayClient, ServerRejected
from pki.ca import CertificateAuthority
from pki.errors import ValidationError
from pki.identity import Identity
from pki.keystore import Keystore, load_keystore
from pki.tls import client_context, server_context
from protocol.encoding import parse_time
from server import peer_cache as peer_cache_module
from server import tls_buffers
from server.audit import AuditLog
from server.peer_cache import ProfileCache

from .certfactory import Issuer, leaf
from .harness import private_pki, private_relay

DEADLINE = 30.0


def audit(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / "audit.log").read_text().splitlines()]


# ------------------------------------------------------------------------------ one read buffer per thread
async def echo_many(demo_dir: Path, connections: int, size: int) -> tuple[set[int], set[int]]:
    """``connections`` TLS clients each send ``size`` random bytes at once to an echo server on this loop
    and check every byte that comes back. Returns the ids of the read buffers the server and client
    connections used."""
    server_store = load_keystore(demo_dir / "MSG_SERVER.p12")
    alice = load_keystore(demo_dir / "MSG_CLI1.p12")
    server_buffers: set[int] = set()

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server_buffers.add(id(writer.transport._ssl_protocol._ssl_buffer))  # type: ignore[attr-defined]
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0,
                                        ssl=server_context(server_store, server_store.ca_certificates()))
    port = server.sockets[0].getsockname()[1]
    ctx = client_context(alice, alice.ca_certificates())
    client_buffers: set[int] = set()

    async def one() -> None:
        payload = os.urandom(size)
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
        client_buffers.add(id(writer.transport._ssl_protocol._ssl_buffer))  # type: ignore[attr-defined]

        async def send() -> None:
            for at in range(0, size, 7001):  # odd pieces: records and socket reads never line up
                writer.write(payload[at:at + 7001])
                await writer.drain()

        sending = asyncio.ensure_future(send())
        got = await reader.readexactly(size)
        await sending
        writer.close()
        assert got == payload

    try:
        await asyncio.wait_for(asyncio.gather(*(one() for _ in range(connections))), DEADLINE)
    finally:
        server.close()
        await server.wait_closed()
    return server_buffers, client_buffers


def test_tls_connections_of_one_loop_share_one_read_buffer_and_lose_no_byte(demo_dir):
    """16 connections, both ends in this loop, 256 KiB each way at once: every byte arrives, in order,
    though every socket read of all 32 TLS ends landed in the same 16 KiB."""
    tls_buffers.install()
    server_buffers, client_buffers = asyncio.run(echo_many(demo_dir, 16, 256 * 1024))
    shared = {id(tls_buffers.shared_read_buffer().obj)}
    assert server_buffers == shared and client_buffers == shared


def test_each_thread_lands_its_reads_in_a_buffer_of_its_own(demo_dir):
    """recv_into releases the GIL: two threads' loops must never read into one buffer."""
    tls_buffers.install()
    used: dict[str, set[int]] = {}
    errors: list[BaseException] = []

    def run(name: str) -> None:
        try:
            server_buffers, client_buffers = asyncio.run(echo_many(demo_dir, 8, 128 * 1024))
            used[name] = server_buffers | client_buffers
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which fails the test with it
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(name,)) for name in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE * 2)
    assert not errors, errors
    assert len(used["a"]) == len(used["b"]) == 1 and used["a"] != used["b"]


def test_a_loop_that_reads_asynchronously_keeps_a_read_buffer_of_its_own(demo_dir):
    """A proactor loop (Windows) fills the buffer while other callbacks run: no sharing there."""
    from asyncio import sslproto

    tls_buffers.install()
    store = load_keystore(demo_dir / "MSG_SERVER.p12")
    ctx = server_context(store, store.ca_certificates())
    not_a_selector_loop = asyncio.AbstractEventLoop()
    protocol: Any = sslproto.SSLProtocol(not_a_selector_loop, asyncio.Protocol(), ctx, None, server_side=True)
    assert len(protocol._ssl_buffer) == tls_buffers.READ_BUFFER
    assert protocol._ssl_buffer is not tls_buffers.shared_read_buffer().obj


def test_install_is_idempotent():
    tls_buffers.install()
    from asyncio import sslproto

    patched = sslproto.SSLProtocol.__init__
    tls_buffers.install()
    assert sslproto.SSLProtocol.__init__ is patched and tls_buffers.installed()


# ------------------------------------------------------------------------------ the profile check, remembered
class CountedProfileChecks:
    """Counts the relay's calls of check_profile for client certificates (the relay runs in this process,
    in a thread; server/peer_cache.py makes them)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str | None] = []
        original = peer_cache_module.check_profile

        def counted(cert: Any, role: Any, org_unit: Any = None) -> Identity:
            from pki.identity import uid_of

            self.calls.append(uid_of(cert))
            return original(cert, role, org_unit)

        monkeypatch.setattr(peer_cache_module, "check_profile", counted)


async def ask(store: Keystore, port: int, ca: CertificateAuthority) -> str:
    """One connection and one request: "ok", or how the relay refused us."""
    c = RelayClient(store, "127.0.0.1", port, [ca.root], timeout=DEADLINE)
    try:
        await c.connect()
        await c.crl_list()
        return "ok"
    except ServerRejected as exc:
        return str(exc)
    except ClientError as exc:
        return f"client error: {exc}"
    finally:
        await c.close()


def test_a_reconnect_with_the_same_certificate_skips_the_profile_check(tmp_path, monkeypatch):
    ca = private_pki(tmp_path, ("ALICE", "BOB"))
    checks = CountedProfileChecks(monkeypatch)
    server = private_relay(tmp_path, enroll=False)
    alice, bob = (load_keystore(tmp_path / f"{u}.p12") for u in ("ALICE", "BOB"))
    try:
        for store in (alice, alice, bob, alice, bob):
            assert asyncio.run(ask(store, server.port, ca)) == "ok"
        assert checks.calls == ["ALICE", "BOB"]
        accepted = [e["uid"] for e in audit(tmp_path) if e["event"] == "connection_accepted"]
        assert accepted == ["ALICE", "ALICE", "BOB", "ALICE", "BOB"]
    finally:
        server.stop()


def test_a_certificate_outside_the_profile_is_checked_and_refused_every_time(tmp_path, monkeypatch):
    """Only a certificate that passed is remembered: one that failed is checked again on every attempt."""
    ca = private_pki(tmp_path)
    outsider = leaf(Issuer(ca.intermediate, ca.intermediate_key), "OUTSIDER", ou="ANOTHER UNIT")
    outsider.chain = ca.chain
    checks = CountedProfileChecks(monkeypatch)
    server = private_relay(tmp_path, enroll=False)
    try:
        for _ in range(3):
            assert asyncio.run(ask(outsider, server.port, ca)) == (
                "the relay refused our certificate: certificate rejected: certificate of OUTSIDER is not from "
                "organisational unit 'SSI MSG RELAY SERVICE'")
        assert checks.calls == ["OUTSIDER"] * 3
        assert server.call(_cached(server)) == 0
    finally:
        server.stop()


async def _cached(server: Any) -> int:
    return len(server.server.profiles)


def test_a_crl_change_forgets_every_checked_certificate_and_a_revoked_one_is_refused(tmp_path, monkeypatch):
    """ALICE and BOB were checked (and remembered). The CA revokes ALICE and the relay takes the new CRL:
    ALICE is refused although her certificate is remembered from before, and BOB, still valid, is checked
    again: nothing checked under the old CRL is reused under the new one."""
    ca = private_pki(tmp_path, ("ALICE", "BOB"))
    checks = CountedProfileChecks(monkeypatch)
    server = private_relay(tmp_path, enroll=False)
    alice, bob = (load_keystore(tmp_path / f"{u}.p12") for u in ("ALICE", "BOB"))

    async def reload() -> bool:
        return server.server.reload_crl("test")  # type: ignore[union-attr]

    try:
        assert [asyncio.run(ask(s, server.port, ca)) for s in (alice, bob)] == ["ok", "ok"]
        assert server.call(_cached(server)) == 2
        ca.revoke(uid="ALICE")
        assert server.call(reload())
        assert asyncio.run(ask(alice, server.port, ca)) == "the relay refused our certificate: revoked"
        assert asyncio.run(ask(bob, server.port, ca)) == "ok"
        assert checks.calls == ["ALICE", "BOB", "BOB"]
        assert server.call(_cached(server)) == 1
    finally:
        server.stop()


def test_the_profile_cache_is_bounded_and_belongs_to_one_context():
    cache = ProfileCache(limit=2)
    old, new = object(), object()
    who = {u: Identity(uid=u, cn=u) for u in "ABC"}
    cert: Any = object()  # the cache never looks inside
    for u in "AB":
        cache.put(u.encode(), old, who[u], cert)
    assert cache.get(b"A", old) is not None  # A is now the most recently used
    cache.put(b"C", old, who["C"], cert)
    assert (cache.get(b"B", old), len(cache)) == (None, 2)  # B, least recently used, made room
    assert cache.get(b"A", old).identity.uid == "A"  # type: ignore[union-attr]
    assert cache.get(b"A", new) is None and len(cache) == 0  # another context: everything forgotten
    with pytest.raises(ValueError):
        ProfileCache(limit=0)


def test_the_relay_keeps_no_decoded_peer_certificate_per_connection(tmp_path):
    """asyncio's ``peercert`` dict (~2 KiB) is dropped after the handshake; the DER stays available."""
    ca = private_pki(tmp_path, ("ALICE",))
    server = private_relay(tmp_path)
    alice = load_keystore(tmp_path / "ALICE.p12")

    async def inspect() -> list[tuple[Any, bool]]:
        sessions = server.server._sessions.values()  # type: ignore[union-attr]
        return [(s.writer.get_extra_info("peercert"), bool(s.writer.get_extra_info("ssl_object")
                                                           .getpeercert(binary_form=True))) for s in sessions]

    async def scenario() -> list[tuple[Any, bool]]:
        async with RelayClient(alice, "127.0.0.1", server.port, [ca.root], timeout=DEADLINE) as c:
            await c.crl_list()
            return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(inspect(), server.loop))

    try:
        assert asyncio.run(scenario()) == [(None, True)]
    finally:
        server.stop()


# ------------------------------------------------------------------------------ the audit log, written directly
def test_audit_lines_are_one_json_object_each_with_an_rfc3339_time(tmp_path):
    log = AuditLog(str(tmp_path / "audit.log"))
    log.event("connection_accepted", peer="127.0.0.1:1", uid="ALICE", reason=None, size=3, when=Path("x"))
    log.event("connection_closed", peer="127.0.0.1:1", uid="ALICE", reason="peer closed")
    log.close()
    log.event("late", reason="after close")  # dropped, no error
    lines = (tmp_path / "audit.log").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["event"] for r in records] == ["connection_accepted", "connection_closed"]
    assert "reason" not in records[0] and records[0]["when"] == "x" and records[0]["size"] == 3
    assert lines[0].startswith('{"ts":"') and ", " not in lines[0]
    first, second = (parse_time(r["ts"]) for r in records)
    assert first <= second and records[0]["ts"].endswith("Z") and len(records[0]["ts"]) == 27


def test_an_audit_log_that_cannot_be_written_is_reported_once_and_the_relay_goes_on(tmp_path, caplog):
    class Full(io.StringIO):
        def write(self, s: str) -> int:
            raise OSError(28, "No space left on device")

    log = AuditLog(str(tmp_path / "audit.log"))
    log._stream = Full()  # type: ignore[assignment]
    with caplog.at_level(logging.ERROR, logger="msg_relay.server"):
        log.event("one")
        log.event("two")
    assert [r.getMessage() for r in caplog.records] == [
        "cannot write the audit log ([Errno 28] No space left on device): events are being lost"]
    log.close()


def test_an_audit_log_on_stderr_writes_there(capsys):
    log = AuditLog()
    log.event("server_started", port=1)
    log.close()
    err = capsys.readouterr().err
    assert json.loads(err)["event"] == "server_started"


def test_a_client_certificate_cryptography_cannot_read_is_refused_and_not_kept():
    cache = ProfileCache()
    with pytest.raises(ValidationError, match="cannot be read"):
        cache.check(b"not a certificate", object(), None)
    assert len(cache) == 0
