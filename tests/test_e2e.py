"""End-to-end confidentiality and integrity against a curious or malicious relay.

The relay's database is edited directly to play the attacker: whatever it does to stored
envelopes, the recipient must answer with the one verification error line.
"""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
from datetime import timedelta
from pathlib import Path

import pytest

from client.cli import VERIFICATION_ERROR
from client.connection import RelayClient
from pki.keystore import load_keystore, save_keystore
from protocol import hpke
from protocol.encoding import utc_now
from protocol.envelope import InnerMessage, VerificationError, open_envelope, seal
from protocol.keyrecord import KeyRecord, KeyRecordError, parse_signed_record
from protocol.messages import RemoteError

from .certfactory import course_pki
from .harness import (
    ServerThread,
    private_client,
    private_pki,
    private_relay,
    run_client,
    server_config,
)

# A revocation dated this long after a message's server time, rather than waiting for the clock to pass
# the one-second resolution of CRL dates.
LATER = timedelta(seconds=10)


def db(tmp_path: Path) -> sqlite3.Connection:
    return sqlite3.connect(tmp_path / "relay.db", isolation_level=None)


def cli(relay, user, uid, *args, stdin=b"", extra=()):
    p12, state = user(uid)
    return run_client(relay, p12, *args, stdin=stdin, state=state, extra=extra)


def exchange(relay, user, subject="subj", body=b"body", to="MSG_CLI2", sender="MSG_CLI1"):
    assert cli(relay, user, to, "askqueue").code == 0  # publishes the recipient's key
    r = cli(relay, user, sender, "send", to, subject, stdin=body)
    assert r.code == 0, r.err


def test_database_and_logs_hold_no_plaintext(relay, user, tmp_path):
    subject, body = f"S-{secrets.token_hex(8)}", f"B-{secrets.token_hex(8)}".encode()
    exchange(relay, user, subject, body)
    r = cli(relay, user, "MSG_CLI2", "getmsg", "1")
    assert subject in r.out and body.decode() in r.out
    relay.stop()  # flush the WAL into the database file too
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("relay.db*")) + (tmp_path / "audit.log").read_bytes()
    assert subject.encode() not in raw and body not in raw
    assert b"MSG_CLI1" in raw  # the relay does know who wrote to whom


@pytest.mark.parametrize("column", ["envelope", "header"])
def test_any_flipped_byte_is_a_verification_error(relay, user, tmp_path, column):
    exchange(relay, user)
    conn = db(tmp_path)
    (blob,) = conn.execute(f"SELECT {column} FROM messages WHERE num=1").fetchone()
    positions = sorted({0, 7, 8, 9, len(blob) // 2, len(blob) - 17, len(blob) - 1} |
                       {secrets.randbelow(len(blob)) for _ in range(3)})
    for pos in positions:
        bad = bytearray(blob)
        bad[pos] ^= 0x01
        conn.execute(f"UPDATE messages SET {column}=?, read=0 WHERE num=1", (bytes(bad),))
        r = cli(relay, user, "MSG_CLI2", "getmsg", "1")
        assert r.code == 1 and r.err.splitlines() == [VERIFICATION_ERROR], (pos, r.err)
    conn.execute(f"UPDATE messages SET {column}=? WHERE num=1", (blob,))
    assert cli(relay, user, "MSG_CLI2", "getmsg", "1").code == 0


def test_envelope_moved_to_another_recipient(relay, user, tmp_path):
    exchange(relay, user)
    assert cli(relay, user, "MSG_CLI3", "askqueue").code == 0
    conn = db(tmp_path)
    conn.execute("UPDATE messages SET recipient='MSG_CLI3' WHERE num=1")
    r = cli(relay, user, "MSG_CLI3", "getmsg", "1", extra=["-v"])
    assert r.code == 1 and r.err.splitlines()[0] == VERIFICATION_ERROR and "reason:" in r.err


def test_replayed_message_refused(relay, user, tmp_path):
    exchange(relay, user)
    assert cli(relay, user, "MSG_CLI2", "getmsg", "1").code == 0
    conn = db(tmp_path)
    conn.execute("UPDATE messages SET num=2, read=0 WHERE num=1")  # the same message offered again
    r = cli(relay, user, "MSG_CLI2", "getmsg", "2", extra=["-v"])
    assert r.code == 1 and r.err.splitlines()[0] == VERIFICATION_ERROR


def test_message_claiming_another_sender(relay, user, tmp_path):
    exchange(relay, user)
    conn = db(tmp_path)
    conn.execute("UPDATE messages SET sender='MSG_CLI3' WHERE num=1")
    r = cli(relay, user, "MSG_CLI2", "getmsg", "1")
    assert r.code == 1 and r.err.splitlines() == [VERIFICATION_ERROR]


def test_inner_sender_mismatch_refused(demo_dir):
    """A sender that seals a message claiming to be someone else is caught even with a valid receipt."""
    alice, carol = (load_keystore(demo_dir / f"{u}.p12") for u in ("MSG_CLI1", "MSG_CLI3"))
    priv, pub = hpke.generate("X25519")
    now = utc_now()
    rec = KeyRecord("MSG_CLI2", "X25519", pub, now, now.replace(year=now.year + 1))

    class Ring:
        def private_key(self, key_id):
            return ("X25519", priv) if key_id == rec.key_id else None

    forged = seal(InnerMessage("MSG_CLI1", "MSG_CLI2", "a" * 32, now, "s", b"b"), carol.key, rec)
    with pytest.raises(VerificationError):
        open_envelope(forged, reader="MSG_CLI2", sender="MSG_CLI3", msg_id="a" * 32,
                      sender_key=carol.cert.public_key(), keyring=Ring())
    honest = seal(InnerMessage("MSG_CLI1", "MSG_CLI2", "a" * 32, now, "s", b"b"), alice.key, rec)
    with pytest.raises(VerificationError, match="info|context|open"):
        # attributed to another msg_id or sender by the relay: HPKE's info binding refuses to open it
        open_envelope(honest, reader="MSG_CLI2", sender="MSG_CLI1", msg_id="b" * 32,
                      sender_key=alice.cert.public_key(), keyring=Ring())
    assert open_envelope(honest, reader="MSG_CLI2", sender="MSG_CLI1", msg_id="a" * 32,
                         sender_key=alice.cert.public_key(), keyring=Ring()).inner.body == b"b"


@pytest.mark.parametrize("kem", ["X25519", "MLKEM768_X25519"])
def test_both_kems_round_trip(relay, user, kem):
    assert cli(relay, user, "MSG_CLI2", "askqueue", extra=["--kem", kem]).code == 0
    r = cli(relay, user, "MSG_CLI1", "send", "MSG_CLI2", f"via {kem}", stdin=b"pq?")
    assert r.code == 0
    r = cli(relay, user, "MSG_CLI2", "getmsg", "1")
    assert r.code == 0 and f"Subject: via {kem}" in r.out


def test_rotate_key_keeps_unread_mail_readable(relay, user):
    exchange(relay, user, "before rotation")
    assert cli(relay, user, "MSG_CLI2", "rotate-key").code == 0
    assert cli(relay, user, "MSG_CLI1", "send", "MSG_CLI2", "after rotation", stdin=b"x").code == 0
    lines = cli(relay, user, "MSG_CLI2", "askqueue").out.splitlines()
    assert [line.rsplit(":", 1)[1] for line in lines] == ["before rotation", "after rotation"]
    assert cli(relay, user, "MSG_CLI2", "getmsg", "1").code == 0
    assert cli(relay, user, "MSG_CLI2", "getmsg", "2").code == 0


def test_key_record_signed_by_wrong_key(relay, demo_dir, tmp_path, user):
    alice, bob = (load_keystore(demo_dir / f"{u}.p12") for u in ("MSG_CLI1", "MSG_CLI2"))
    _, pub = hpke.generate("X25519")
    now = utc_now()
    rec = KeyRecord("MSG_CLI2", "X25519", pub, now, now.replace(year=now.year + 1))
    with pytest.raises(KeyRecordError):
        parse_signed_record(rec.to_bytes(), rec.sign(alice.key), "MSG_CLI2", bob.cert.public_key())
    assert parse_signed_record(rec.to_bytes(), rec.sign(bob.key), "MSG_CLI2", bob.cert.public_key()) == rec

    async def publish_as_bob_for_alice():
        async with RelayClient(bob, "127.0.0.1", relay.port, bob.ca_certificates()) as c:
            alice_rec = KeyRecord("MSG_CLI1", "X25519", pub, now, now.replace(year=now.year + 1))
            await c.publish_key(alice_rec.to_bytes(), alice_rec.sign(bob.key))

    with pytest.raises(RemoteError) as info:
        asyncio.run(publish_as_bob_for_alice())
    assert info.value.code == "bad_signature"
    # A relay that swaps in its own key record: the sender refuses to seal to it.
    assert cli(relay, user, "MSG_CLI2", "askqueue").code == 0
    db(tmp_path).execute("UPDATE keys SET signature=? WHERE uid='MSG_CLI2'", (rec.sign(alice.key),))
    r = cli(relay, user, "MSG_CLI1", "send", "MSG_CLI2", "s", stdin=b"b")
    assert r.code == 1 and r.err.splitlines() == [VERIFICATION_ERROR]
    assert db(tmp_path).execute("SELECT COUNT(*) FROM messages").fetchone() == (0,)


def test_revocation_before_and_after_the_receipt_time(tmp_path, user):
    ca = private_pki(tmp_path, ("EARLY", "LATE", "READER"))
    # The relay runs without the CRL, so a revoked sender can still submit (as with a stale CRL).
    server = private_relay(tmp_path, crl=False)

    def run(uid, *args, stdin=b""):
        return private_client(server, tmp_path, uid, *args, stdin=stdin, with_crl=True)

    try:
        assert run("READER", "askqueue").code == 0
        assert run("LATE", "send", "READER", "sent before revocation", stdin=b"ok").code == 0
        sent = utc_now()  # after the message's server time
        # CRL dates have one-second resolution: date LATE's revocation clearly after its message instead
        # of waiting for the clock. EARLY's is dated now, before the message it sends below.
        ca.revoke(uid="LATE", when=sent + LATER)
        ca.revoke(uid="EARLY", when=sent)
        assert run_client(server, tmp_path / "EARLY.p12", "send", "READER", "sent after revocation", stdin=b"no",
                          state=tmp_path / "st" / "EARLY", extra=["--no-crl"]).code == 0
        ok = run("READER", "getmsg", "1")
        assert ok.code == 0 and "sent before revocation" in ok.out
        bad = run("READER", "getmsg", "2")
        assert bad.code == 1 and bad.err.splitlines() == [VERIFICATION_ERROR]
    finally:
        server.stop()


@pytest.mark.parametrize("key_type", ["ecdsa-p256", "ed25519"])
def test_sender_key_types(tmp_path, key_type):
    private_pki(tmp_path, ("A", "B"), key_type)
    server = private_relay(tmp_path)
    try:
        _round_trip(server, tmp_path, tmp_path / "A.p12", tmp_path / "B.p12")
    finally:
        server.stop()


def test_course_style_rsa_keystores(tmp_path):
    paths = course_pki(tmp_path)
    cfg = server_config(tmp_path, tmp_path, p12=str(paths["MSG_SERVER"]), crl=None, no_crl=True,
                        users_dir=str(tmp_path))
    server = ServerThread(cfg).start()
    try:
        _round_trip(server, tmp_path, paths["ALICE"], paths["BOB"], "--no-crl")  # a relay with no CRL to serve
    finally:
        server.stop()


def _round_trip(server, tmp_path, a: Path, b: Path, *extra: str):
    sa, sb = tmp_path / "state-a", tmp_path / "state-b"
    assert run_client(server, b, "askqueue", state=sb, extra=extra).code == 0
    r = run_client(server, a, "send", load_keystore(b).uid, "typed", stdin=b"works", state=sa, extra=extra)
    assert r.code == 0, r.err
    r = run_client(server, b, "getmsg", "1", state=sb, extra=extra)
    assert r.code == 0 and r.out_bytes.endswith(b"\n\nworks\n"), r.err


def test_receipts_are_kept_and_listed(relay, user):
    exchange(relay, user)
    r = cli(relay, user, "MSG_CLI1", "receipts")
    assert r.code == 0 and "to MSG_CLI2" in r.out and "queue number 1" in r.out


def test_messages_survive_the_senders_certificate_renewal(tmp_path):
    """A message is checked against the certificate it was sent with, not the sender's newest one."""
    ca = private_pki(tmp_path, ("ANNA", "BEN"))
    server = private_relay(tmp_path, crl=False)

    def run(uid, *args, stdin=b""):
        return private_client(server, tmp_path, uid, *args, stdin=stdin, with_crl=True)

    try:
        assert run("BEN", "askqueue").code == 0
        assert run("ANNA", "send", "BEN", "old certificate", stdin=b"1").code == 0
        ca.revoke(uid="ANNA", reason="superseded", when=utc_now() + LATER)  # after the message's server time
        save_keystore(tmp_path / "ANNA.p12", ca.issue("ANNA"), None)  # renewed: new key, new certificate
        assert run("ANNA", "send", "BEN", "new certificate", stdin=b"2").code == 0
        first, second = run("BEN", "getmsg", "1"), run("BEN", "getmsg", "2")
        assert first.code == 0 and "old certificate" in first.out, first.err
        assert second.code == 0 and "new certificate" in second.out, second.err
    finally:
        server.stop()


def test_receipts_survive_the_relays_certificate_renewal(tmp_path):
    ca = private_pki(tmp_path, ("ANNA", "BEN"))
    def run(server, uid, *args, stdin=b""):
        return private_client(server, tmp_path, uid, *args, stdin=stdin)

    server = private_relay(tmp_path)
    assert run(server, "BEN", "askqueue").code == 0
    assert run(server, "ANNA", "send", "BEN", "before renewal", stdin=b"1").code == 0
    server.stop()
    ca.revoke(uid="MSG_SERVER", reason="superseded", when=utc_now() + LATER)  # after the receipt's time
    save_keystore(tmp_path / "MSG_SERVER.p12", ca.issue("MSG_SERVER", server=True), None)
    server = private_relay(tmp_path)
    try:
        r = run(server, "BEN", "getmsg", "1")
        assert r.code == 0 and "before renewal" in r.out, r.err
    finally:
        server.stop()
