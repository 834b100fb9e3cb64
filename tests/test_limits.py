"""What grows must never outgrow a frame, and no client may make the relay hold more than a batch.

Issue 9 §1 and §2: CRLs with 10 000 revocations, answers larger than a frame, poison messages, relays
with larger frames, and clients that pipeline without reading.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import secrets
import socket
import sqlite3
import time
from pathlib import Path

import pytest
from cryptography import x509

from client.connection import RelayClient
from pki.ca import CertificateAuthority
from pki.keys import certificate_hash
from pki.keystore import load_keystore
from pki.tls import client_context
from protocol.envelope import Sealed
from protocol.frames import MAX_FRAME, FrameDecoder, decode_payload, encode_frame
from protocol.messages import GetRequest, GetResult, RemoteError, request_to_wire

from .harness import private_client, private_pki, private_relay

DEADLINE = 20.0


def audit(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / "audit.log").read_text().splitlines()]


def ops(directory: Path, uid: str, op: str) -> int:
    return sum(1 for e in audit(directory) if e.get("uid") == uid and e.get("op") == op)


def write_crl_with(ca: CertificateAuthority, path: Path, revoked: int) -> x509.CertificateRevocationList:
    """The CA's CRLs, the intermediate's carrying ``revoked`` more entries (as after years of renewals)."""
    leaf_crl, root_crl = ca.build_crls()
    builder = (x509.CertificateRevocationListBuilder().issuer_name(leaf_crl.issuer)
               .last_update(leaf_crl.last_update_utc).next_update(leaf_crl.next_update_utc)
               .add_extension(x509.CRLNumber(leaf_crl.extensions.get_extension_for_class(x509.CRLNumber)
                                             .value.crl_number + 1), critical=False))
    when = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=1)
    for serial in range(1, revoked + 1):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial << 64).revocation_date(when).build())
    big = builder.sign(ca.intermediate_key, certificate_hash(ca.intermediate_key))
    path.write_bytes(b"".join(c.public_bytes(serialization_pem()) for c in (big, root_crl)))
    return big


def serialization_pem():
    from cryptography.hazmat.primitives.serialization import Encoding

    return Encoding.PEM


def garbage(size: int) -> bytes:
    return secrets.token_bytes(size)


# ------------------------------------------------------------------------------ 10 000 revoked
def test_ten_thousand_revocations_travel_in_pieces_and_are_fetched_once(tmp_path):
    ca = private_pki(tmp_path, ("ANNA", "BEN"))
    big = write_crl_with(ca, tmp_path / "ca" / "crl.pem", 10_000)
    server = private_relay(tmp_path)
    try:
        assert private_client(server, tmp_path, "BEN", "askqueue").code == 0
        sent = private_client(server, tmp_path, "ANNA", "send", "BEN", "hello", stdin=b"body")
        assert sent.code == 0, sent.err
        pieces = ops(tmp_path, "ANNA", "crl")
        assert pieces >= 40  # ~400 KB in frame-sized pieces
        assert private_client(server, tmp_path, "ANNA", "send", "BEN", "again", stdin=b"2").code == 0
        assert ops(tmp_path, "ANNA", "crl") == pieces  # the verified CRL is kept: only the list is asked again
        r = private_client(server, tmp_path, "BEN", "getmsg", "1")
        assert r.code == 0 and "body" in r.out, r.err
        queue = private_client(server, tmp_path, "BEN", "askqueue")
        assert queue.code == 0 and queue.out.count("\n") == 1
        cached = json.loads((tmp_path / "st" / "BEN" / "crls.json").read_text())
        assert len(cached) == 2
        assert not any(e["event"] == "response_too_large" for e in audit(tmp_path))
        assert len(big) == 10_000
    finally:
        server.stop()


# ------------------------------------------------------------------------------ answers too large
def test_an_answer_that_outgrows_the_frame_is_an_error_and_the_session_goes_on(tmp_path):
    private_pki(tmp_path, ("ANNA", "BEN"))
    server = private_relay(tmp_path)
    anna = load_keystore(tmp_path / "ANNA.p12")
    try:
        assert private_client(server, tmp_path, "BEN", "askqueue").code == 0
        db = sqlite3.connect(tmp_path / "relay.db")
        with db:
            db.execute("UPDATE keys SET record=? WHERE uid='BEN'", (garbage(7500),))  # a tampered database
        db.close()

        async def scenario() -> None:
            async with RelayClient(anna, "127.0.0.1", server.port, anna.ca_certificates(), timeout=10) as c:
                with pytest.raises(RemoteError) as info:
                    await c.directory("BEN")
                assert info.value.code == "too_large"
                assert (await c.directory("ANNA")).uid == "ANNA"  # the same connection goes on
                assert await c.queue() == []

        asyncio.run(scenario())
        assert any(e["event"] == "response_too_large" and e["uid"] == "ANNA" for e in audit(tmp_path))
    finally:
        server.stop()


# ------------------------------------------------------------------------------ poison messages
def test_the_largest_accepted_submission_can_be_served_back(tmp_path):
    """A send whose ``get`` answer could not fit is refused; the largest accepted one is retrievable
    (with the widest request id a client may use) and a failed read leaves it unread."""
    private_pki(tmp_path, ("ANNA", "BEN"))
    server = private_relay(tmp_path)
    anna, ben = load_keystore(tmp_path / "ANNA.p12"), load_keystore(tmp_path / "BEN.p12")
    header = garbage(200)

    async def scenario() -> None:
        async with RelayClient(anna, "127.0.0.1", server.port, anna.ca_certificates(), timeout=10) as c:
            async def accepted(size: int) -> int | None:
                msg_id = secrets.token_hex(16)
                try:
                    receipt = await c.send("BEN", msg_id, Sealed(2, header, garbage(size)))
                except RemoteError as exc:
                    assert exc.code == "too_large", exc
                    return None
                return receipt.queue_number

            def fits_a_request(size: int) -> bool:
                req = c.send_request("BEN", "0" * 32, Sealed(2, header, bytes(size)))
                return len(encode_frame(request_to_wire(req), 10**6)) <= MAX_FRAME

            # The poison range: the request fits a frame, the answer that serves it back would not.
            high = max(n for n in range(6000, 8192) if fits_a_request(n))
            low = 1000
            assert await accepted(low) is not None and await accepted(high) is None
            while high - low > 1:
                mid = (low + high) // 2
                if await accepted(mid) is not None:
                    low = mid
                else:
                    high = mid
            assert await accepted(low + 1) is None

        async with RelayClient(ben, "127.0.0.1", server.port, ben.ca_certificates(), timeout=10) as c:
            queue = await c.queue()
            largest = max(queue, key=lambda e: e.num)
            result = await c.request(GetRequest("x" * 64, largest.num))
            assert isinstance(result, GetResult) and len(result.message.envelope) == low
            stored = sqlite3.connect(tmp_path / "relay.db").execute(
                "SELECT COUNT(*) FROM messages WHERE length(envelope) > ?", (low,)).fetchone()
            assert stored == (0,)  # nothing bigger was stored

    try:
        assert private_client(server, tmp_path, "BEN", "askqueue").code == 0
        asyncio.run(scenario())
        unread = private_client(server, tmp_path, "BEN", "askqueue").out.count("\n")
        bad = private_client(server, tmp_path, "BEN", "getmsg", "1")  # garbage: fails verification
        assert bad.code == 1
        assert private_client(server, tmp_path, "BEN", "askqueue").out.count("\n") == unread  # still unread
    finally:
        server.stop()


# ------------------------------------------------------------------------------ larger frames
def test_a_relay_with_larger_frames_says_so_and_the_client_adapts(tmp_path):
    private_pki(tmp_path, ("ANNA", "BEN"))
    server = private_relay(tmp_path, max_frame=65536)
    anna, ben = load_keystore(tmp_path / "ANNA.p12"), load_keystore(tmp_path / "BEN.p12")

    async def scenario() -> None:
        async with RelayClient(anna, "127.0.0.1", server.port, anna.ca_certificates(), timeout=10) as c:
            for _ in range(20):
                await c.send("BEN", secrets.token_hex(16), Sealed(2, garbage(1500), garbage(500)))
        async with RelayClient(ben, "127.0.0.1", server.port, ben.ca_certificates(), timeout=10) as c:
            entries = await c.queue()  # one page of ~40 KB: larger than the default frame
            assert len(entries) == 20
            assert c.max_frame == 65536

    try:
        asyncio.run(scenario())
        assert ops(tmp_path, "BEN", "queue") == 1
    finally:
        server.stop()


# ------------------------------------------------------------------------------ non-reading clients
def test_a_client_that_pipelines_and_never_reads_costs_one_batch(tmp_path):
    """3000 pipelined ``get``s of a 9 KB answer, never read: the relay stops reading from the
    connection instead of building answers; once the client reads, every answer arrives in order."""
    private_pki(tmp_path, ("ANNA",))
    server = private_relay(tmp_path)
    anna = load_keystore(tmp_path / "ANNA.p12")

    async def store_one() -> None:
        async with RelayClient(anna, "127.0.0.1", server.port, anna.ca_certificates(), timeout=10) as c:
            await c.send("ANNA", secrets.token_hex(16), Sealed(2, garbage(200), garbage(6500)))

    total = 3000
    try:
        asyncio.run(store_one())
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        raw.settimeout(DEADLINE)
        raw.connect(("127.0.0.1", server.port))
        tls = client_context(anna, anna.ca_certificates()).wrap_socket(raw, server_hostname="127.0.0.1")
        tls.sendall(b"".join(encode_frame(request_to_wire(GetRequest(i, 1))) for i in range(1, total + 1)))

        def buffered() -> int:
            async def measure() -> int:
                assert server.server is not None
                return max((s.writer.transport.get_write_buffer_size()
                            for s in server.server._sessions.values() if s.peer is not None), default=0)
            return server.call(measure())

        # Wait until the relay stops making progress (a busy machine only makes this wait longer).
        seen, still_since, deadline = -1, time.monotonic(), time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            done = ops(tmp_path, "ANNA", "get")
            if done != seen:
                seen, still_since = done, time.monotonic()
            elif time.monotonic() - still_since > 0.5:
                break
            time.sleep(0.05)
        assert seen < total
        assert buffered() <= 256 * 1024

        decoder, answers = FrameDecoder(), []
        while len(answers) < total:
            data = tls.recv(65536)
            assert data, "connection closed before every answer arrived"
            answers += [decode_payload(p) for p in decoder.feed(data)]
        assert [a["id"] for a in answers] == list(range(1, total + 1))
        assert all(a["ok"] for a in answers)
        tls.close()
    finally:
        server.stop()


def test_requests_before_a_broken_frame_are_answered(tmp_path):
    """Two good requests and an oversized frame header in one write: both are answered, then the
    relay says ``too_large`` and closes (the good ones are not dropped for the bad one behind them)."""
    private_pki(tmp_path, ("ANNA",))
    server = private_relay(tmp_path)
    anna = load_keystore(tmp_path / "ANNA.p12")
    try:
        raw = socket.create_connection(("127.0.0.1", server.port), timeout=DEADLINE)
        tls = client_context(anna, anna.ca_certificates()).wrap_socket(raw, server_hostname="127.0.0.1")
        good = b"".join(encode_frame(request_to_wire(GetRequest(i, 99))) for i in (1, 2))
        tls.sendall(good + (MAX_FRAME + 1).to_bytes(4, "big"))
        decoder, answers = FrameDecoder(), []
        while data := tls.recv(65536):
            answers += [decode_payload(p) for p in decoder.feed(data)]
        assert [a["id"] for a in answers] == [1, 2, None]
        assert [a["error"]["code"] for a in answers] == ["unknown_message", "unknown_message", "too_large"]
        tls.close()
    finally:
        server.stop()
