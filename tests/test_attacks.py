"""Attacks, one check each (issue 9 §5): a forging sender, a forging relay, a tampered database.

Every test makes one refusing check refuse, asserts the exact refusal (the relay's error code, or
msg-client's fixed line and, with ``--verbose``, the reason), and that nothing was stored, printed as
a message or marked read. Where a construction could fail for a reason other than the one under test,
the honest variant of the same construction is shown to be accepted.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime as dt
import json
import secrets
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from client.cli import VERIFICATION_ERROR
from client.connection import RelayClient
from pki.ca import CertificateAuthority
from pki.identity import cert_fingerprint
from pki.keys import sign
from pki.keystore import Keystore, load_keystore
from protocol import hpke
from protocol.encoding import pack, signing_input, utc_now
from protocol.envelope import InnerMessage, Sealed, _info, ciphertext_digest, seal, sign_submission
from protocol.keyrecord import LABEL, KeyRecord, parse_signed_record, read_record
from protocol.messages import KeyRecordWire, RemoteError, SendRequest, SendResult

from .certfactory import Issuer, leaf, self_signed_ca
from .harness import Result, private_pki, private_relay, run_client
from .hostile_relay import HostileRelay, forge_sealed

UIDS = ("ALICE", "BOB", "CAROL")


def _id(value: object) -> str:
    """Test ids without spaces or quotes (so they can be named on a command line)."""
    text = "-".join(map(str, value)) if isinstance(value, tuple) else str(value)
    return text.replace(" ", "-").replace("'", "")


@dataclass
class World:
    dir: Path
    ca: CertificateAuthority
    stores: dict[str, Keystore]

    def cli(self, relay: object, uid: str, *args: str, stdin: bytes = b"", verbose: bool = False) -> Result:
        address = relay if isinstance(relay, str) else relay.address  # type: ignore[attr-defined]
        return run_client(address, self.dir / f"{uid}.p12", *args, stdin=stdin, state=self.dir / "st" / uid,
                          extra=["-v"] if verbose else [])

    def client(self, port: int, uid: str) -> RelayClient:
        return RelayClient(self.stores[uid], "127.0.0.1", port, [self.ca.root], timeout=10)


@pytest.fixture()
def world(tmp_path: Path) -> World:
    ca = private_pki(tmp_path, UIDS)
    return World(tmp_path, ca, {u: load_keystore(tmp_path / f"{u}.p12") for u in UIDS})


@pytest.fixture()
def relay(world: World):
    server = private_relay(world.dir)
    yield server
    server.stop()


def refused(r: Result, reason: str) -> None:
    """msg-client's one verification line, ``reason`` in the --verbose detail, no message printed."""
    lines = r.err.splitlines()
    assert r.code == 1, r.err
    assert [line for line in lines if line.startswith("MSG RELAY SERVICE")] == [VERIFICATION_ERROR], r.err
    assert any(line.startswith("  reason: ") and reason in line for line in lines), r.err
    assert r.out == "" and "From:" not in r.err


def rows(world: World, sql: str, *args: object) -> list[tuple]:
    """What the relay's database holds (read with a connection of its own, closed at once)."""
    conn = sqlite3.connect(world.dir / "relay.db", isolation_level=None)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def stored_messages(world: World) -> int:
    return rows(world, "SELECT COUNT(*) FROM messages")[0][0]


def unread(world: World, recipient: str) -> list[int]:
    return [n for (n,) in rows(world, "SELECT num FROM messages WHERE recipient=? AND read=0 ORDER BY num", recipient)]


def record_of(world: World, port: int, uid: str) -> KeyRecord:
    """``uid``'s published key record, fetched and verified as a sender would."""
    async def go() -> KeyRecord:
        async with world.client(port, "CAROL") as c:
            entry = await c.directory(uid)
        assert entry.key is not None, f"{uid} has not published a key"
        return parse_signed_record(entry.key.record, entry.key.signature, uid, world.stores[uid].cert.public_key())
    return asyncio.run(go())


def submit(world: World, port: int, uid: str, to: str, msg_id: str, sealed: Sealed, *,
           signed_by: Keystore | None = None, signed_to: str | None = None,
           signed_msg_id: str | None = None) -> SendResult:
    """``uid`` submits ``sealed`` as a client built by hand would: with any submission signature."""
    async def go() -> SendResult:
        async with world.client(port, uid) as c:
            sig = sign_submission((signed_by or world.stores[uid]).key, signed_to or to, signed_msg_id or msg_id,
                                  sealed)
            result = await c.request(SendRequest(c.next_id(), to, msg_id, sealed.version, sealed.header,
                                                 sealed.envelope, sig))
            assert isinstance(result, SendResult)
            return result
    return asyncio.run(go())


def new_id() -> str:
    return secrets.token_hex(16)


# ====================================================================== a forging sender (real relay)
@pytest.mark.parametrize("forgery", ["another user's key", "signed for another recipient",
                                     "signed for another msg_id"], ids=_id)
def test_a_submission_not_signed_by_the_connected_sender_is_refused_and_nothing_stored(world, relay, forgery):
    """Carol submits over her own connection a submission whose signature is not hers for this send."""
    assert world.cli(relay, "BOB", "askqueue").code == 0
    bob = record_of(world, relay.port, "BOB")
    msg_id = new_id()
    sealed = seal(InnerMessage("CAROL", "BOB", msg_id, utc_now(), "s", b"b"), world.stores["CAROL"].key, bob)
    kwargs = {"another user's key": {"signed_by": world.stores["ALICE"]},
              "signed for another recipient": {"signed_to": "ALICE"},
              "signed for another msg_id": {"signed_msg_id": new_id()}}[forgery]
    with pytest.raises(RemoteError) as info:
        submit(world, relay.port, "CAROL", "BOB", msg_id, sealed, **kwargs)
    assert info.value.code == "bad_signature"
    assert "does not verify against your certificate" in info.value.message
    assert stored_messages(world) == 0
    receipt = submit(world, relay.port, "CAROL", "BOB", msg_id, sealed).receipt  # the honest one is taken
    assert receipt.queue_number == 1 and stored_messages(world) == 1


@pytest.mark.parametrize("to", ["NOBODY", "MSG_SERVER"], ids=_id)
def test_a_send_to_an_unknown_uid_is_refused_and_nothing_stored(world, relay, to):
    """The relay's own UID is a known certificate, never a user with a queue."""
    msg_id = new_id()
    sealed = seal(InnerMessage("ALICE", to, msg_id, utc_now(), "s", b"b"), world.stores["ALICE"].key)
    with pytest.raises(RemoteError) as info:
        submit(world, relay.port, "ALICE", to, msg_id, sealed)
    assert (info.value.code, info.value.message) == ("unknown_recipient", f"unknown recipient {to}")
    assert stored_messages(world) == 0


def test_another_message_under_a_used_msg_id_is_a_duplicate(world, relay):
    msg_id = new_id()
    first = seal(InnerMessage("ALICE", "BOB", msg_id, utc_now(), "s", b"first"), world.stores["ALICE"].key)
    second = seal(InnerMessage("ALICE", "BOB", msg_id, utc_now(), "s", b"second"), world.stores["ALICE"].key)
    receipt = submit(world, relay.port, "ALICE", "BOB", msg_id, first).receipt
    assert submit(world, relay.port, "ALICE", "BOB", msg_id, first).receipt == receipt  # a retry: same receipt
    with pytest.raises(RemoteError) as info:
        submit(world, relay.port, "ALICE", "BOB", msg_id, second)
    assert info.value.code == "duplicate"
    assert rows(world, "SELECT digest FROM messages") == [(ciphertext_digest(first),)]


def _sealed_by_carol(world: World, bob: KeyRecord, **forge: object) -> tuple[str, Sealed]:
    msg_id = new_id()
    return msg_id, forge_sealed(bob, sender="CAROL", recipient="BOB", msg_id=msg_id,
                                inner_signer=world.stores["CAROL"].key, **forge)  # type: ignore[arg-type]


@pytest.mark.parametrize(("forge", "reason"), [
    ({"inner": {"from": "ALICE"}}, "message claims sender ALICE but was submitted by CAROL"),
    ({"inner": {"to": "ALICE"}}, "message is addressed to ALICE, not to BOB"),
    ({"inner": {"msg_id": "f" * 32}}, "message id inside the envelope does not match the relay's"),
    ({"header_subject": "Invoice"}, "subject shown in the queue differs from the signed subject"),
    ({"body": b"x" * 1001}, "message body longer than 1000 bytes"),
    ({"plain": pack(b"CAROL", b"BOB")}, "inner message malformed"),
    ({"version": 9}, "unsupported envelope version 9"),
    ({"key_id": b""}, "sealed message but no key to open it"),
], ids=["claims-another-sender", "addressed-to-another-user", "another-msg_id-inside", "two-subjects",
        "body-over-1000-bytes", "malformed-inner-message", "unknown-envelope-version", "too-short-to-name-a-key"])
def test_a_forging_sender_cannot_make_a_reader_accept_what_its_envelope_misstates(world, relay, forge, reason):
    """Carol signs everything with her own key, and the relay takes it (it cannot look inside); the
    reader refuses what the envelope misstates, and the message stays unread."""
    assert world.cli(relay, "BOB", "askqueue").code == 0
    bob = record_of(world, relay.port, "BOB")
    if forge.get("key_id") == b"":
        msg_id, sealed = new_id(), Sealed(3, b"12345678", b"12345678")
    else:
        msg_id, sealed = _sealed_by_carol(world, bob, **forge)
    submit(world, relay.port, "CAROL", "BOB", msg_id, sealed)
    refused(world.cli(relay, "BOB", "getmsg", "1", verbose=True), reason)
    assert unread(world, "BOB") == [1]
    honest_id, honest = _sealed_by_carol(world, bob, body=b"an honest one")
    submit(world, relay.port, "CAROL", "BOB", honest_id, honest)
    ok = world.cli(relay, "BOB", "getmsg", "2")
    assert ok.code == 0 and ok.out_bytes.endswith(b"\n\nan honest one\n"), ok.err


@pytest.mark.parametrize(("header", "reason"), [
    ({"header_subject": "clear\x1b[2J\x1b]0;owned\x07"}, "header malformed: subject contains control characters"),
    ({"header_subject": "s" * 201}, "header malformed: subject longer than 200 characters"),
    ({"header_subject": "two\u2028lines"}, "header malformed: subject contains control characters"),
], ids=["escape-sequences", "over-200-characters", "line-separator"])
def test_a_signed_subject_that_could_rewrite_the_terminal_is_never_shown(world, relay, header, reason):
    """askqueue prints subjects as they are: only check_subject stands between Carol's signed subject
    and Bob's terminal."""
    assert world.cli(relay, "BOB", "askqueue").code == 0
    msg_id, sealed = _sealed_by_carol(world, record_of(world, relay.port, "BOB"), **header)
    submit(world, relay.port, "CAROL", "BOB", msg_id, sealed)
    q = world.cli(relay, "BOB", "askqueue")
    assert q.code == 0 and q.out.startswith("1:CAROL:") and q.out.rstrip().endswith(":(unverifiable)"), q.out
    assert "\x1b" not in q.out and "\u2028" not in q.out and "s" * 201 not in q.out
    refused(world.cli(relay, "BOB", "getmsg", "1", verbose=True), reason)


def test_a_sealed_subject_that_is_not_subject_and_signature_is_refused(world, relay):
    assert world.cli(relay, "BOB", "askqueue").code == 0
    bob = record_of(world, relay.port, "BOB")
    msg_id, sealed = _sealed_by_carol(world, bob)

    bare = bytes.fromhex(bob.key_id) + hpke.seal(bob.kem, bob.public_key, b"just a subject",
                                                 _info("header", "CAROL", "BOB", msg_id))
    submit(world, relay.port, "CAROL", "BOB", msg_id, Sealed(sealed.version, bare, sealed.envelope))
    assert world.cli(relay, "BOB", "askqueue").out.rstrip().endswith(":(unverifiable)")
    refused(world.cli(relay, "BOB", "getmsg", "1", verbose=True), "header malformed: truncated field")


@pytest.mark.parametrize("as_from", ["another msg_id", "another sender"], ids=_id)
def test_a_relay_re_attributing_a_genuine_envelope_cannot_even_open_it(world, hostile, as_from):
    """Alice's genuine sealed message, served under another msg_id or as Carol's (with a receipt
    the relay signs to match): the HPKE context binds sender, recipient and msg_id, so it does not open."""
    assert world.cli(hostile, "ALICE", "send", "BOB", "s", stdin=b"b").code == 0
    msg = hostile.messages[("BOB", 1)]
    sender, msg_id = ("ALICE", new_id()) if as_from == "another msg_id" else ("CAROL", msg.msg_id)
    sealed = Sealed(msg.envelope_version, msg.header, msg.envelope)
    hostile.store("BOB", sender, msg_id, sealed, num=1,
                  sender_cert=cert_fingerprint(world.stores[sender].cert))
    refused(world.cli(hostile, "BOB", "getmsg", "1", verbose=True),
            "cannot open: wrong key, wrong context or tampered ciphertext")
    assert hostile.ops("mark_read") == []


def test_a_message_sealed_to_a_key_the_reader_lacks_says_so(world, relay):
    """Not a forgery but a missing key (another device's, or a lost state directory): its own line."""
    assert world.cli(relay, "BOB", "askqueue").code == 0
    _, stranger = hpke.generate("X25519")
    now = utc_now()
    other = KeyRecord("BOB", "X25519", stranger, now, now.replace(year=now.year + 1))
    msg_id, sealed = _sealed_by_carol(world, other)
    submit(world, relay.port, "CAROL", "BOB", msg_id, sealed)
    r = world.cli(relay, "BOB", "getmsg", "1")
    assert r.code == 1 and r.err.startswith(f"msg-client: cannot open this message: sealed to encryption key "
                                            f"{other.key_id}"), r.err
    assert r.out == "" and unread(world, "BOB") == [1]


def test_an_unsigned_subject_is_never_shown_as_the_senders(world, relay):
    """Version 1 envelopes carry no signature over the queue subject: askqueue does not show it."""
    assert world.cli(relay, "BOB", "askqueue").code == 0
    msg_id = new_id()
    submit(world, relay.port, "CAROL", "BOB", msg_id,
           seal(InnerMessage("CAROL", "BOB", msg_id, utc_now(), "old style", b"v1"), world.stores["CAROL"].key))
    r = world.cli(relay, "BOB", "askqueue")
    assert r.code == 0 and r.out.startswith("1:CAROL:") and r.out.rstrip().endswith(":(unverifiable)"), r.out
    assert "old style" not in r.out


@pytest.mark.parametrize("attack", ["signed by another key", "for another UID", "expired", "unsupported KEM",
                                    "low-order key", "older than the published one", "dated in the future", "not JSON"],
                         ids=_id)
def test_a_key_record_the_relay_must_not_publish(world, relay, attack):
    """publish_key: the relay stores only a record the connected user signed for itself, usable and
    not older than the one it holds."""
    bob = world.stores["BOB"]
    now = utc_now()
    _, public = hpke.generate("X25519")
    good = KeyRecord("BOB", "X25519", public, now, now.replace(year=now.year + 1))

    async def publish(record: bytes, signature: bytes) -> None:
        async with world.client(relay.port, "BOB") as c:
            await c.publish_key(record, signature)

    asyncio.run(publish(good.to_bytes(), good.sign(bob.key)))
    before = rows(world, "SELECT record, signature FROM keys")
    earlier = now.replace(year=now.year - 1)
    record = {
        "signed by another key": good,
        "for another UID": KeyRecord("ALICE", "X25519", public, now, good.expires),
        "expired": KeyRecord("BOB", "X25519", public, earlier, now - dt.timedelta(days=1)),
        "unsupported KEM": KeyRecord("BOB", "RSA-OAEP", public, now, good.expires),
        "low-order key": KeyRecord("BOB", "X25519", bytes(32), now, good.expires),
        "older than the published one": KeyRecord("BOB", "X25519", public, earlier, good.expires),
        "dated in the future": KeyRecord("BOB", "X25519", public, now + dt.timedelta(days=1), good.expires),
        "not JSON": None,
    }[attack]
    raw = b"not json" if record is None else record.to_bytes()
    signer = world.stores["ALICE"].key if attack == "signed by another key" else bob.key

    with pytest.raises(RemoteError) as info:
        asyncio.run(publish(raw, sign(signer, signing_input(LABEL, raw))))
    expected = {"signed by another key": ("bad_signature", "signature does not verify"),
                "for another UID": ("bad_signature", "key record is for ALICE, not BOB"),
                "expired": ("bad_signature", "key record has expired"),
                "unsupported KEM": ("bad_signature", "unsupported KEM RSA-OAEP"),
                "low-order key": ("bad_signature", "unusable X25519 point"),
                "older than the published one": ("bad_request", "older than the one published"),
                "dated in the future": ("bad_signature", "key record is dated in the future"),
                "not JSON": ("bad_signature", "malformed key record")}[attack]
    assert info.value.code == expected[0] and expected[1] in info.value.message, info.value
    assert rows(world, "SELECT record, signature FROM keys") == before


def test_no_user_reads_marks_or_lists_another_users_messages(world, relay):
    assert world.cli(relay, "BOB", "askqueue").code == 0
    assert world.cli(relay, "ALICE", "send", "BOB", "for bob only", stdin=b"secret").code == 0

    async def as_carol() -> list:
        async with world.client(relay.port, "CAROL") as c:
            outcomes: list = [await c.queue()]
            for op in (c.get, c.mark_read):
                try:
                    await op(1)
                    outcomes.append("answered")
                except RemoteError as exc:
                    outcomes.append(exc.code)
            return outcomes

    assert asyncio.run(as_carol()) == [[], "unknown_message", "unknown_message"]
    assert unread(world, "BOB") == [1]


def test_reading_ones_own_message_marks_no_one_elses(world, relay):
    """Bob and Carol each have a message number 1: Bob reading his leaves Carol's unread."""
    for uid in ("BOB", "CAROL"):
        assert world.cli(relay, uid, "askqueue").code == 0
        assert world.cli(relay, "ALICE", "send", uid, f"for {uid}", stdin=b"b").code == 0
    assert world.cli(relay, "BOB", "getmsg", "1").code == 0
    assert (unread(world, "BOB"), unread(world, "CAROL")) == ([], [1])


def test_a_fingerprint_of_another_users_certificate_finds_nothing(world, relay):
    """directory(uid, fingerprint) answers only a certificate of that UID."""
    alice_fp = cert_fingerprint(world.stores["ALICE"].cert)

    async def lookups() -> tuple:
        async with world.client(relay.port, "CAROL") as c:
            own = await c.directory("ALICE", alice_fp)
            try:
                await c.directory("BOB", alice_fp)
            except RemoteError as exc:
                return own.uid, exc.code
            return own.uid, "answered"

    assert asyncio.run(lookups()) == ("ALICE", "unknown_user")


# ====================================================================== a forging relay (hostile relay)
@pytest.fixture()
def hostile(world: World):
    with HostileRelay(world.dir) as relay:
        relay.enroll(*UIDS)
        assert world.cli(relay, "BOB", "askqueue").code == 0  # Bob publishes his key to it
        yield relay


def bob_key(relay: HostileRelay) -> KeyRecord:
    return read_record(relay.keys["BOB"].record)


def test_a_relay_forging_a_message_from_alice_is_stopped_by_the_inner_signature_alone(world, hostile):
    """The relay keeps Alice's genuine sealed header (her signed subject, right key, right ids), seals
    a body of its own under her name and re-signs the receipt: only the inner signature is wrong."""
    for subject in ("genuine one", "genuine two"):
        assert world.cli(hostile, "ALICE", "send", "BOB", subject, stdin=b"from alice").code == 0
    genuine = hostile.messages[("BOB", 1)]
    forged = forge_sealed(bob_key(hostile), sender="ALICE", recipient="BOB", msg_id=genuine.msg_id,
                          subject="genuine one", body=b"pay the relay", inner_signer=hostile.keystore.key)
    sealed = Sealed(forged.version, genuine.header, forged.envelope)
    hostile.replace("BOB", 1, envelope=sealed.envelope,
                    receipt=hostile.receipt("ALICE", "BOB", genuine.msg_id, sealed, 1))
    r = world.cli(hostile, "BOB", "getmsg", "1", verbose=True)
    refused(r, "inner signature does not verify against the sender's certificate")
    assert b"pay the relay" not in r.out_bytes + r.err.encode()
    assert hostile.ops("mark_read") == []
    ok = world.cli(hostile, "BOB", "getmsg", "2")  # the same relay, honest this time
    assert ok.code == 0 and ok.out_bytes.endswith(b"\n\nfrom alice\n") and "Subject: genuine two" in ok.out


def test_a_subject_the_relay_sealed_is_not_shown_as_the_senders(world, hostile):
    """askqueue shows a subject only with the sender's signature over it: the relay can seal any
    subject to Bob's public key, but cannot sign it as Alice."""
    assert world.cli(hostile, "ALICE", "send", "BOB", "lunch?", stdin=b"at noon").code == 0
    genuine = hostile.messages[("BOB", 1)]
    forged = forge_sealed(bob_key(hostile), sender="ALICE", recipient="BOB", msg_id=genuine.msg_id,
                          subject="lunch?", header_subject="URGENT: wire money", inner_signer=world.stores["ALICE"].key,
                          subject_signer=hostile.keystore.key)
    sealed = Sealed(genuine.envelope_version, forged.header, genuine.envelope)
    hostile.replace("BOB", 1, header=sealed.header, receipt=hostile.receipt("ALICE", "BOB", genuine.msg_id, sealed, 1))
    q = world.cli(hostile, "BOB", "askqueue")
    assert q.code == 0 and q.out.startswith("1:ALICE:") and q.out.rstrip().endswith(":(unverifiable)"), q.out
    assert "wire money" not in q.out
    refused(world.cli(hostile, "BOB", "getmsg", "1", verbose=True),
            "subject signature does not verify against the sender's certificate")
    assert hostile.ops("mark_read") == []


@pytest.mark.parametrize("lie", ["recipient", "queue number", "digest", "sender", "msg_id"], ids=_id)
def test_a_receipt_that_is_not_the_stored_messages_is_refused(world, hostile, lie):
    """Each field of the relay's receipt must be the served message's; every variant below is signed
    by the relay's own key, so only the comparison with the message refuses it."""
    alice = world.stores["ALICE"]
    assert world.cli(hostile, "CAROL", "askqueue").code == 0
    assert world.cli(hostile, "ALICE", "send", "BOB", "for bob", stdin=b"one").code == 0
    assert world.cli(hostile, "ALICE", "send", "CAROL", "for carol", stdin=b"carol's").code == 0
    msg = hostile.messages[("BOB", 1)]
    if lie == "recipient":  # Carol's genuine message, with its genuine receipt, served to Bob
        carols = hostile.messages[("CAROL", 1)]
        hostile.messages[("BOB", 1)] = dataclasses.replace(carols, recipient="BOB")
    elif lie == "queue number":  # Bob's message 1 served again as number 2
        hostile.store("BOB", "ALICE", msg.msg_id, Sealed(msg.envelope_version, msg.header, msg.envelope), num=2,
                      receipt=msg.receipt)
        del hostile.messages[("BOB", 1)]
    elif lie == "digest":  # other bytes signed by Alice's (stolen) key under the receipt of message 1
        other = forge_sealed(bob_key(hostile), sender="ALICE", recipient="BOB", msg_id=msg.msg_id,
                             subject="for bob", body=b"swapped", inner_signer=alice.key)
        hostile.replace("BOB", 1, header=other.header, envelope=other.envelope)
    elif lie == "sender":
        hostile.replace("BOB", 1, sender="CAROL")
    else:
        hostile.replace("BOB", 1, msg_id="e" * 32)
    num = "2" if lie == "queue number" else "1"
    r = world.cli(hostile, "BOB", "getmsg", num, verbose=True)
    refused(r, "receipt does not match the stored message")
    assert hostile.ops("mark_read") == []


def test_a_relay_delivering_a_message_again_is_refused_as_a_replay(world, hostile):
    """The relay puts Alice's message into Bob's queue a second time, with a receipt it signs for the
    new number: every signature is right, only Bob's memory of what he read refuses it."""
    assert world.cli(hostile, "ALICE", "send", "BOB", "once", stdin=b"pay 10").code == 0
    assert world.cli(hostile, "BOB", "getmsg", "1").code == 0
    first = hostile.messages[("BOB", 1)]
    hostile.store("BOB", "ALICE", first.msg_id, Sealed(first.envelope_version, first.header, first.envelope), num=2,
                  sender_cert=first.sender_cert)
    refused(world.cli(hostile, "BOB", "getmsg", "2", verbose=True),
            f"replayed message: {first.msg_id} from ALICE was seen before")
    again = world.cli(hostile, "BOB", "getmsg", "1")  # reading the same message again is no replay
    assert again.code == 0 and again.out_bytes.endswith(b"\n\npay 10\n")
    assert [r["num"] for r in hostile.ops("mark_read")] == [1]


def test_a_receipt_not_signed_by_the_relays_key_is_refused(world, hostile):
    assert world.cli(hostile, "ALICE", "send", "BOB", "s", stdin=b"b").code == 0
    msg = hostile.messages[("BOB", 1)]
    sealed = Sealed(msg.envelope_version, msg.header, msg.envelope)
    fake = hostile.receipt("ALICE", "BOB", msg.msg_id, sealed, 1, key=world.stores["CAROL"].key)
    assert fake.signer == hostile.signer  # it names the relay's certificate, but Carol's key signed it
    hostile.replace("BOB", 1, receipt=fake)
    refused(world.cli(hostile, "BOB", "getmsg", "1", verbose=True), "receipt is not signed by the relay (MSG_SERVER)")
    q = world.cli(hostile, "BOB", "askqueue")
    assert q.code == 0 and q.out.rstrip().endswith(":(unverifiable)"), q.out
    assert hostile.ops("mark_read") == []


def test_a_receipt_signed_by_a_client_certificate_is_refused(world, hostile):
    """A receipt that names Carol's certificate as its signer: the client asks for that certificate of
    MSG_SERVER, the relay serves Carol's, and it is not a server certificate."""
    assert world.cli(hostile, "ALICE", "send", "BOB", "s", stdin=b"b").code == 0
    msg = hostile.messages[("BOB", 1)]
    carol = world.stores["CAROL"]
    fp = hostile.add_certificate("MSG_SERVER", [carol.cert, *carol.intermediates()], current=False)
    sealed = Sealed(msg.envelope_version, msg.header, msg.envelope)
    hostile.replace("BOB", 1, receipt=hostile.receipt("ALICE", "BOB", msg.msg_id, sealed, 1, key=carol.key, signer=fp))
    refused(world.cli(hostile, "BOB", "getmsg", "1", verbose=True),
            "certificate of MSG_SERVER rejected: certificate of CAROL is not a server certificate")
    assert hostile.ops("mark_read") == []


def test_the_senders_certificate_must_be_the_one_the_message_names(world, hostile):
    """Asked for the certificate Alice sent with, the relay serves another certificate of Alice's
    (same key, another serial): refused, though it would verify the signature."""

    assert world.cli(hostile, "ALICE", "send", "BOB", "s", stdin=b"b").code == 0
    alice = world.stores["ALICE"]
    twin = leaf(Issuer(world.ca.intermediate, world.ca.intermediate_key), "ALICE", key=alice.key, ou=world.ca.org_unit)
    sent_with = hostile.messages[("BOB", 1)].sender_cert
    hostile.by_fingerprint[sent_with] = ("ALICE", [twin.cert.public_bytes(Encoding.DER), *hostile.chains["ALICE"][1:]])
    refused(world.cli(hostile, "BOB", "getmsg", "1", verbose=True),
            "directory returned another certificate than the one asked for")


def test_a_look_alike_ca_cannot_vouch_for_a_sender(world, hostile):
    """The relay invents an ALICE: a certificate from a CA with our CA's exact names but its own key,
    a message signed by that certificate's key, an honest receipt. Only path validation stops it."""

    fake_root = self_signed_ca(world.ca.root.subject)
    fake_inter = self_signed_ca(world.ca.intermediate.subject)
    fake = leaf(fake_inter, "ALICE", ou=world.ca.org_unit)
    fp = hostile.add_certificate("ALICE", [fake.cert, fake_inter.cert, fake_root.cert], current=False)
    msg_id = new_id()
    sealed = forge_sealed(bob_key(hostile), sender="ALICE", recipient="BOB", msg_id=msg_id, body=b"trust me",
                          inner_signer=fake.key)
    hostile.store("BOB", "ALICE", msg_id, sealed, sender_cert=fp)
    refused(world.cli(hostile, "BOB", "getmsg", "1", verbose=True), "certificate of ALICE rejected")
    assert hostile.ops("mark_read") == []


# ---------------------------------------------------------------------- the relay lies to a sender
@pytest.mark.parametrize("lie", ["another user's certificate", "a look-alike CA's certificate",
                                 "an unreadable certificate", "no certificate at all", "an expired key record",
                                 "no key record"], ids=_id)
def test_a_sender_seals_nothing_to_a_key_the_directory_cannot_vouch_for(world, hostile, lie):
    """Alice asks for Bob's certificate and key; the relay serves something else. Nothing is sent."""

    now = utc_now()
    _, public = hpke.generate("X25519")

    def record_signed_by(key, uid: str = "BOB", expires=None) -> KeyRecordWire:
        rec = KeyRecord(uid, "X25519", public, now, expires or now.replace(year=now.year + 1))
        return KeyRecordWire(rec.to_bytes(), sign(key, signing_input(LABEL, rec.to_bytes())))

    carol = world.stores["CAROL"]
    if lie == "another user's certificate":  # Carol colludes: her certificate, a record saying BOB
        hostile.chains["BOB"] = hostile.chains["CAROL"]
        hostile.keys["BOB"] = record_signed_by(carol.key)
        reason = "directory certificate is for CAROL, not BOB"
    elif lie == "a look-alike CA's certificate":
        fake_inter = self_signed_ca(world.ca.intermediate.subject)
        fake = leaf(fake_inter, "BOB", ou=world.ca.org_unit)
        hostile.chains["BOB"] = [fake.cert.public_bytes(Encoding.DER), fake_inter.cert.public_bytes(Encoding.DER)]
        hostile.keys["BOB"] = record_signed_by(fake.key)
        reason = "certificate of BOB rejected"
    elif lie == "an unreadable certificate":
        hostile.chains["BOB"] = [b"\x30\x03junk"]
        reason = "directory returned an unreadable certificate"
    elif lie == "no certificate at all":
        hostile.chains["BOB"] = []
        reason = "directory has no certificate for BOB"
    elif lie == "an expired key record":
        hostile.keys["BOB"] = record_signed_by(world.stores["BOB"].key, expires=now.replace(year=now.year - 1))
        reason = "encryption key of BOB refused: key record has expired"
    else:
        del hostile.keys["BOB"]
        r = world.cli(hostile, "ALICE", "send", "BOB", "s", stdin=b"b")
        assert r.code == 1 and r.err.startswith("msg-client: BOB has not published an encryption key yet"), r.err
        assert hostile.ops("send") == []
        return
    refused(world.cli(hostile, "ALICE", "send", "BOB", "s", stdin=b"secret", verbose=True), reason)
    assert hostile.ops("send") == []


def test_a_relay_rolling_back_a_recipients_key_is_refused(world, hostile):
    """Alice has seen Bob's new key; the relay serves the old record again (signed by Bob, not expired)."""
    assert world.cli(hostile, "ALICE", "send", "BOB", "first", stdin=b"1").code == 0
    old = hostile.keys["BOB"]
    assert world.cli(hostile, "BOB", "rotate-key").code == 0
    assert world.cli(hostile, "ALICE", "send", "BOB", "second", stdin=b"2").code == 0
    hostile.keys["BOB"] = old
    refused(world.cli(hostile, "ALICE", "send", "BOB", "third", stdin=b"3", verbose=True),
            "the relay served an older encryption key of BOB")
    assert len(hostile.ops("send")) == 2


@pytest.mark.parametrize("lie", ["another message's digest", "another recipient", "another msg_id",
                                 "signed by another key"], ids=_id)
def test_a_sender_keeps_no_receipt_that_is_not_for_its_message(world, hostile, lie):
    def answer(obj: dict, uid: str) -> SendResult:
        sealed = Sealed(obj["envelope_version"], base64.b64decode(obj["header"]), base64.b64decode(obj["envelope"]))
        to, msg_id, key = obj["to"], obj["msg_id"], None
        if lie == "another message's digest":
            sealed = Sealed(sealed.version, sealed.header, sealed.envelope + b"!")
        elif lie == "another recipient":
            to = "CAROL"
        elif lie == "another msg_id":
            msg_id = new_id()
        else:
            key = world.stores["CAROL"].key
        return SendResult(hostile.receipt(uid, to, msg_id, sealed, 1, key=key))

    hostile.answers["send"] = answer
    reason = ("receipt is not signed by the relay (MSG_SERVER)" if lie == "signed by another key"
              else "receipt does not match the message sent")
    r = world.cli(hostile, "ALICE", "send", "BOB", "s", stdin=b"b", verbose=True)
    refused(r, reason)
    assert world.cli(hostile, "ALICE", "receipts").out == ""


# ====================================================================== a tampered database (real relay)
def _tamper(world: World, sql: str, *args: object) -> None:
    """Edit one row of the relay's database, as a thief with write access to the file would."""
    conn = sqlite3.connect(world.dir / "relay.db", isolation_level=None)
    try:
        assert conn.execute(sql, args).rowcount == 1
    finally:
        conn.close()


def test_a_database_thief_cannot_backdate_a_message(world, relay):
    """The receipt's server time decides at what time the sender's certificate must be valid; without
    the relay's key, a changed time breaks the receipt's signature."""
    assert world.cli(relay, "BOB", "askqueue").code == 0
    assert world.cli(relay, "ALICE", "send", "BOB", "s", stdin=b"b").code == 0
    [(text,)] = rows(world, "SELECT receipt FROM messages WHERE num=1")
    receipt = json.loads(text)
    receipt["server_time"] = "2020-01-01T00:00:00.000000Z"
    _tamper(world, "UPDATE messages SET receipt=? WHERE num=1", json.dumps(receipt))
    refused(world.cli(relay, "BOB", "getmsg", "1", verbose=True), "receipt is not signed by the relay (MSG_SERVER)")
    assert unread(world, "BOB") == [1]


def test_a_database_thief_with_a_stolen_sender_key_cannot_slip_in_another_message(world, relay):
    """Alice's key is stolen: the thief seals other words under her real msg_id and puts them in place
    of her message, leaving the relay's receipt (which it cannot re-sign)."""
    assert world.cli(relay, "BOB", "askqueue").code == 0
    assert world.cli(relay, "ALICE", "send", "BOB", "contract", stdin=b"I agree").code == 0
    [(msg_id,)] = rows(world, "SELECT msg_id FROM messages WHERE num=1")
    other = forge_sealed(record_of(world, relay.port, "BOB"), sender="ALICE", recipient="BOB", msg_id=msg_id,
                         subject="contract", body=b"I refuse", inner_signer=world.stores["ALICE"].key)
    _tamper(world, "UPDATE messages SET header=?, envelope=? WHERE num=1", other.header, other.envelope)
    r = world.cli(relay, "BOB", "getmsg", "1", verbose=True)
    refused(r, "receipt does not match the stored message")
    assert unread(world, "BOB") == [1]


@pytest.mark.parametrize(("column", "value"), [("num", 2), ("msg_id", "d" * 32)], ids=_id)
def test_a_database_edit_of_the_routing_data_breaks_the_receipt(world, relay, column, value):
    assert world.cli(relay, "BOB", "askqueue").code == 0
    assert world.cli(relay, "ALICE", "send", "BOB", "s", stdin=b"b").code == 0
    _tamper(world, f"UPDATE messages SET {column}=? WHERE num=1", value)
    num = "2" if column == "num" else "1"
    refused(world.cli(relay, "BOB", "getmsg", num, verbose=True), "receipt does not match the stored message")
    assert unread(world, "BOB") == [int(num)]


def test_a_database_edit_of_the_senders_certificate_finds_no_certificate(world, relay):
    """The message names Carol's certificate as the one Alice sent with: the relay finds no such
    certificate of Alice, and the client would refuse Carol's anyway."""
    assert world.cli(relay, "BOB", "askqueue").code == 0
    assert world.cli(relay, "CAROL", "askqueue").code == 0
    assert world.cli(relay, "ALICE", "send", "BOB", "s", stdin=b"b").code == 0
    _tamper(world, "UPDATE messages SET sender_cert=? WHERE num=1", cert_fingerprint(world.stores["CAROL"].cert))
    r = world.cli(relay, "BOB", "getmsg", "1")
    assert r.code == 1 and r.err.strip() == "msg-client: the relay refused: unknown user ALICE", r.err
    assert r.out == "" and unread(world, "BOB") == [1]

