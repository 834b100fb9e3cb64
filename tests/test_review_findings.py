"""What an independent review of the second wave found, each shown refused: a handshake that straddles
a CRL reload, CRL pieces too small to be honest, key records from the future, unreadable CRLs, a relay
whose own certificate is revoked, a relay serving another message than the one asked for."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import socket
import ssl
import struct
import time

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from client.cli import VERIFICATION_ERROR
from client.connection import RelayClient
from client.crlcache import CrlCache, CrlRefused
from client.state import ClientState
from pki.keystore import load_keystore
from pki.tls import client_context
from protocol import hpke
from protocol.crls import piece_request_offsets
from protocol.keyrecord import KeyRecord, KeyRecordError, parse_signed_record
from protocol.messages import CrlInfo, CrlResult, GetResult, RemoteError

from .harness import private_client, private_pki, private_relay, run_client
from .hostile_relay import HostileRelay

NOW = dt.datetime.now(dt.timezone.utc)


def test_a_handshake_under_way_during_a_crl_reload_is_checked_against_the_new_crl(tmp_path):
    """The client holds back its last handshake flight while the CA revokes it and the relay reloads;
    OpenSSL checked the old CRL, the relay checks again with the new one and refuses."""
    ca = private_pki(tmp_path, ("ALICE",))
    relay = private_relay(tmp_path)
    store = load_keystore(tmp_path / "ALICE.p12")
    try:
        sock = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = client_context(store, store.ca_certificates()).wrap_bio(incoming, outgoing, server_side=False)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                incoming.write(sock.recv(65536))
        held_back = outgoing.read()  # our Certificate, CertificateVerify, Finished: not sent yet
        ca.revoke(uid="ALICE", reason="key_compromise")

        async def reload() -> bool:
            assert relay.server is not None
            return relay.server.reload_crl("test")

        assert relay.call(reload())
        body = json.dumps({"v": 1, "id": 1, "op": "queue"}).encode()
        tls.write(struct.pack(">I", len(body)) + body)
        sock.sendall(held_back + outgoing.read())
        answer = b""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (len(answer) >= 4 and
                                                   len(answer) >= 4 + struct.unpack(">I", answer[:4])[0]):
            data = sock.recv(65536)
            if not data:
                break
            incoming.write(data)
            try:
                answer += tls.read(65536)
            except ssl.SSLWantReadError:
                continue
            except ssl.SSLError:
                break
        assert b'"ok":true' not in answer
        assert b"not_authorised" in answer and b"revoked" in answer
        sock.close()
    finally:
        relay.stop()


def test_crl_pieces_smaller_than_a_frame_carries_are_refused():
    info = CrlInfo(b"i" * 32, 1, hashlib.sha256(b"x").digest(), 16 << 20)
    with pytest.raises(ValueError, match="too small"):
        piece_request_offsets(info, CrlResult(info.digest, 0, info.size, b"x"))  # 16 million requests
    whole = CrlInfo(b"i" * 32, 1, hashlib.sha256(b"x").digest(), 1)
    assert piece_request_offsets(whole, CrlResult(whole.digest, 0, 1, b"x")) == []  # a 1-byte CRL is fine


def test_a_key_record_dated_in_the_future_is_refused(tmp_path):
    """Dated ahead, it would win every "newer record" comparison until then: its owner could never
    publish again, and senders would refuse the owner's real records as rollbacks."""
    ca = private_pki(tmp_path, ("BOB",))
    bob = ca.issue("BOB2")
    _, public = hpke.generate("X25519")
    future = KeyRecord("BOB2", "X25519", public, dt.datetime(9000, 1, 1, tzinfo=dt.timezone.utc),
                       dt.datetime(9001, 1, 1, tzinfo=dt.timezone.utc))
    with pytest.raises(KeyRecordError, match="dated in the future"):
        parse_signed_record(future.to_bytes(), future.sign(bob.key), "BOB2", bob.cert.public_key())
    relay = private_relay(tmp_path)
    store = load_keystore(tmp_path / "BOB.p12")
    record = KeyRecord("BOB", "X25519", public, dt.datetime(9000, 1, 1, tzinfo=dt.timezone.utc),
                       dt.datetime(9001, 1, 1, tzinfo=dt.timezone.utc))

    async def publish() -> None:
        async with RelayClient(store, "127.0.0.1", relay.port, store.ca_certificates(), timeout=10) as c:
            await c.publish_key(record.to_bytes(), record.sign(store.key))

    try:
        with pytest.raises(RemoteError, match="dated in the future"):
            asyncio.run(publish())
        assert private_client(relay, tmp_path, "BOB", "askqueue").code == 0  # BOB is not locked out
    finally:
        relay.stop()


def test_an_unreadable_crl_is_one_line_not_a_traceback(tmp_path):
    """A CRL whose issuer name does not parse (an invalid UTF8String): refused, not a ValueError."""
    ca = private_pki(tmp_path)
    crls = CrlCache(ClientState(tmp_path / "st"), [ca.root], [ca.intermediate])
    der = bytearray(ca.build_crls()[0].public_bytes(Encoding.DER))
    at = bytes(der).find(b"MSG Relay Issuing CA")
    der[at] = 0xFF  # no longer UTF-8
    with pytest.raises(CrlRefused, match="unreadable"):
        crls.offer(bytes(der))


def test_a_relay_whose_own_certificate_is_revoked_serves_no_one_but_still_applies_the_crl(tmp_path):
    ca = private_pki(tmp_path, ("ALICE", "BOB"))
    relay = private_relay(tmp_path, crl_check_interval=0.05)
    try:
        assert private_client(relay, tmp_path, "ALICE", "askqueue").code == 0
        ca.revoke(uid="MSG_SERVER", reason="key_compromise")
        deadline = time.monotonic() + 20
        while "own certificate" not in (tmp_path / "audit.log").read_text():
            assert time.monotonic() < deadline, "the relay never noticed its own revocation"
            time.sleep(0.05)
        r = private_client(relay, tmp_path, "BOB", "askqueue")
        assert r.code == 1 and "own certificate is no longer valid" in r.err, r.err
    finally:
        relay.stop()


def test_a_relay_serving_another_message_than_the_one_asked_for_is_refused(tmp_path):
    """Asked for message 2, the relay serves message 1 (genuine, verifiable): refused, and message 2
    is not marked read on the strength of message 1's checks."""
    private_pki(tmp_path, ("ALICE", "BOB"))
    with HostileRelay(tmp_path) as relay:
        relay.enroll("ALICE", "BOB")

        def cli(uid: str, *args: str, stdin: bytes = b""):
            return run_client(relay.address, tmp_path / f"{uid}.p12", *args, stdin=stdin,
                              state=tmp_path / "st" / uid, extra=["--timeout", "5"])

        assert cli("BOB", "askqueue").code == 0
        for subject in ("one", "two"):
            assert cli("ALICE", "send", "BOB", subject, stdin=b"x").code == 0
        first = relay.messages[("BOB", 1)]
        relay.answers["get"] = lambda obj, uid: GetResult(first)
        r = cli("BOB", "getmsg", "2")
        assert r.code == 1 and r.err.splitlines() == [VERIFICATION_ERROR], r.err
        assert "Subject: one" not in r.out
        assert relay.ops("mark_read") == []


def test_a_record_of_an_earlier_certificate_does_not_block_the_renewed_owner(tmp_path):
    """A thief of ANNA's old keystore publishes a record dated minutes ahead; ANNA's certificate is
    renewed. The relay compares dates only with records of the caller's current certificate."""
    ca = private_pki(tmp_path, ("ANNA",))
    relay = private_relay(tmp_path)
    old = load_keystore(tmp_path / "ANNA.p12")
    _, public = hpke.generate("X25519")
    ahead = dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=5)
    stolen = KeyRecord("ANNA", "X25519", public, ahead, ahead + dt.timedelta(days=30))

    async def publish_as_thief() -> None:
        async with RelayClient(old, "127.0.0.1", relay.port, old.ca_certificates(), timeout=10) as c:
            await c.publish_key(stolen.to_bytes(), stolen.sign(old.key))

    try:
        asyncio.run(publish_as_thief())
        ca.revoke(uid="ANNA", reason="key_compromise")
        from pki.keystore import save_keystore

        save_keystore(tmp_path / "ANNA.p12", ca.issue("ANNA"), None)
        r = private_client(relay, tmp_path, "ANNA", "askqueue")
        assert r.code == 0, r.err  # its own record, dated now, replaces the thief's
    finally:
        relay.stop()
