"""The per-line checks of ``askqueue`` cost less since issue 14, and refuse what they refused before.

Within one command a sender's certificate, once validated, is kept with the span of times its verdict
covers (pki.verdicts.Verdicts.span), so each further line compares its receipt's time. These tests
show the lines that must still be refused in the same listing: a time after a revocation dated between
two lines, a time outside the certificate's dates, and every line after the CRLs changed (a watch takes
them afresh). And the key of a kept subject still names every field the kept checks read.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import secrets
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from client.connection import RelayClient
from client.mailbox import Mailbox
from client.state import ClientState, SubjectFacts
from pki.ca import CertificateAuthority
from pki.keystore import load_keystore
from pki.validation import TrustPolicy
from pki.verdicts import Verdicts
from protocol.encoding import utc_now
from protocol.keyrecord import read_record
from protocol.messages import QueueEntry
from protocol.receipts import Receipt

from .harness import Result, private_pki, run_client
from .hostile_relay import HostileRelay, forge_sealed

UIDS = ("ALICE", "BOB")
HOUR = dt.timedelta(hours=1)
UNVERIFIABLE = "(unverifiable)"


@pytest.fixture()
def ca(tmp_path: Path) -> CertificateAuthority:
    return private_pki(tmp_path, UIDS)


@pytest.fixture()
def relay(tmp_path: Path, ca: CertificateAuthority):
    with HostileRelay(tmp_path) as hostile:
        hostile.enroll(*UIDS)
        yield hostile


def cli(relay: HostileRelay, uid: str, *args: str, stdin: bytes = b"") -> Result:
    d = relay.directory
    return run_client(relay.address, d / f"{uid}.p12", *args, stdin=stdin, state=d / "st" / uid,
                      extra=["--timeout", "5"])


def subjects(relay: HostileRelay) -> list[str]:
    """Bob's askqueue, the subject of each line."""
    r = cli(relay, "BOB", "askqueue")
    assert r.code == 0, r.err
    return [line.rsplit(":", 1)[1] for line in r.out.splitlines()]


def from_alice_at(relay: HostileRelay, when: dt.datetime, subject: str) -> None:
    """A genuine message of Alice's in Bob's queue, with a receipt the relay signed for ``when``."""
    alice = load_keystore(relay.directory / "ALICE.p12")
    msg_id = secrets.token_hex(16)
    sealed = forge_sealed(read_record(relay.keys["BOB"].record), sender="ALICE", recipient="BOB", msg_id=msg_id,
                          subject=subject, inner_signer=alice.key)
    num = 1 + sum(1 for uid, _ in relay.messages if uid == "BOB")
    relay.store("BOB", "ALICE", msg_id, sealed, num=num,
                receipt=relay.receipt("ALICE", "BOB", msg_id, sealed, num, server_time=when))


def publish_crls(relay: HostileRelay, ca: CertificateAuthority) -> None:
    relay.served_crls = [c.public_bytes(Encoding.DER) for c in ca.build_crls()]


# ============================================================================ kept within one command
def test_a_sender_revoked_from_a_date_is_checked_at_each_lines_time(relay, ca):
    """Revoked (not for a compromise) after the first message and before the second: in one listing the
    lines before the date verify and the line after it does not, whatever the order, kept subjects or not."""
    assert cli(relay, "BOB", "askqueue").code == 0  # Bob publishes his key
    now = utc_now()
    for when, subject in [(now + HOUR, "before"), (now + 48 * HOUR, "after"), (now + 2 * HOUR, "before too")]:
        from_alice_at(relay, when, subject)
    assert subjects(relay) == ["before", "after", "before too"]
    ca.revoke(uid="ALICE", reason="superseded", when=now + 24 * HOUR)
    publish_crls(relay, ca)
    assert subjects(relay) == ["before", UNVERIFIABLE, "before too"]
    assert subjects(relay) == ["before", UNVERIFIABLE, "before too"]


def test_a_line_outside_the_senders_certificate_dates_is_checked_in_full(relay):
    assert cli(relay, "BOB", "askqueue").code == 0
    cert = load_keystore(relay.directory / "ALICE.p12").cert
    now = utc_now()
    for when, subject in [(now + HOUR, "inside"), (cert.not_valid_before_utc - HOUR, "too early"),
                          (now + 2 * HOUR, "inside too"), (cert.not_valid_after_utc + HOUR, "too late")]:
        from_alice_at(relay, when, subject)
    assert subjects(relay) == ["inside", UNVERIFIABLE, "inside too", UNVERIFIABLE]
    assert subjects(relay) == ["inside", UNVERIFIABLE, "inside too", UNVERIFIABLE]


def test_what_one_listing_kept_of_a_certificate_is_not_used_with_newer_crls(relay, ca):
    """A watch takes the CRLs afresh every few minutes (Mailbox._forget): a sender revoked meanwhile is
    unverifiable on the next listing of the same Mailbox."""
    assert cli(relay, "BOB", "askqueue").code == 0
    assert cli(relay, "ALICE", "send", "BOB", "lunch?", stdin=b"noon").code == 0
    store = load_keystore(relay.directory / "BOB.p12")

    async def listings() -> tuple[list[str | None], list[str | None]]:
        async with RelayClient(store, "127.0.0.1", relay.port, store.ca_certificates(), timeout=5.0) as client:
            mailbox = Mailbox(client, ClientState(relay.directory / "st" / "BOB"),
                              TrustPolicy(store.ca_certificates(), []))
            await mailbox.policy()
            first = [line.subject for line in await mailbox.queue()]
            ca.revoke(uid="ALICE", reason="key_compromise")
            publish_crls(relay, ca)
            mailbox._forget()
            await mailbox.policy()
            return first, [line.subject for line in await mailbox.queue()]

    first, second = asyncio.run(listings())
    assert first == ["lunch?"] and second == [None]


def test_what_one_listing_keeps_of_certificates_is_bounded(tmp_path, monkeypatch):
    """As the directory answers are: a relay naming many certificates cannot make a listing hold them all."""
    from client import mailbox as client_mailbox

    senders = ("ANNA", "CARL", "DORA", "EMIL")
    private_pki(tmp_path, ("BOB", *senders))
    monkeypatch.setattr(client_mailbox, "DIRECTORY_CACHE", 2)
    with HostileRelay(tmp_path) as relay:
        relay.enroll("BOB", *senders)
        assert cli(relay, "BOB", "askqueue").code == 0
        for uid in senders:
            assert cli(relay, uid, "send", "BOB", f"from {uid}", stdin=b"hi").code == 0
        store = load_keystore(tmp_path / "BOB.p12")

        async def listing() -> tuple[list[str | None], int]:
            async with RelayClient(store, "127.0.0.1", relay.port, store.ca_certificates(), timeout=5.0) as client:
                mailbox = Mailbox(client, ClientState(tmp_path / "st" / "BOB"), TrustPolicy(store.ca_certificates(), []))
                await mailbox.policy()
                lines = [line.subject for line in await mailbox.queue()]
                return lines, len(mailbox._valid)

        lines, kept = asyncio.run(listing())
    assert lines == [f"from {uid}" for uid in senders] and kept == 2


# ============================================================================ Verdicts.span
def test_a_span_is_given_only_for_a_time_its_kept_path_covers(ca):
    user = ca.issue("CAROL")
    kept = Verdicts()
    policy = TrustPolicy([ca.root], ca.build_crls(), verdicts=kept)
    now = utc_now()
    assert kept.span(policy, user.cert, user.chain, "client", now) is None  # nothing validated yet
    policy.validate(user.cert, user.chain, at=now)
    span = kept.span(policy, user.cert, user.chain, "client", now)
    assert span is not None and span.covers(now) and span.covers(now + 300 * 24 * HOUR)
    assert not span.covers(user.cert.not_valid_before_utc - HOUR) and not span.covers(user.cert.not_valid_after_utc)
    assert kept.span(policy, user.cert, user.chain, "client", user.cert.not_valid_after_utc + HOUR) is None


def test_no_span_is_given_for_a_chain_revoked_at_any_time(ca):
    user = ca.issue("CAROL")
    now = utc_now()
    ca.revoke(uid="CAROL", reason="superseded", when=now + 24 * HOUR)
    kept = Verdicts()
    policy = TrustPolicy([ca.root], ca.build_crls(), verdicts=kept)
    policy.validate(user.cert, user.chain, at=now)  # before the revocation: valid
    assert kept.span(policy, user.cert, user.chain, "client", now) is None


# ============================================================================ the key of a kept subject
def _entry() -> QueueEntry:
    when = dt.datetime(2026, 11, 24, 10, 15, 2, 123456, tzinfo=dt.timezone.utc)
    receipt = Receipt("ab" * 16, "ALICE", "BOB", b"d" * 32, when, 7, b"s" * 32, b"g" * 70)
    return QueueEntry(7, "ALICE", "ab" * 16, when, 3, b"h" * 1200, receipt, b"c" * 32)


def _changed(entry: QueueEntry, **receipt: object) -> QueueEntry:
    return dataclasses.replace(entry, receipt=dataclasses.replace(entry.receipt, **receipt))


def test_a_kept_subjects_key_names_every_field_the_kept_checks_read():
    """Each field changed, and each boundary between two fields moved, gives another key."""
    e = _entry()
    r = e.receipt
    keys = [
        SubjectFacts.key("BOB", e),
        SubjectFacts.key("BOX", e),
        SubjectFacts.key("BOB", dataclasses.replace(e, sender="ALICF")),
        SubjectFacts.key("BOB", dataclasses.replace(e, msg_id="cd" * 16)),
        SubjectFacts.key("BOB", dataclasses.replace(e, envelope_version=4)),
        SubjectFacts.key("BOB", dataclasses.replace(e, header=b"h" * 1199 + b"i")),
        SubjectFacts.key("BOB", dataclasses.replace(e, sender_cert=b"c" * 31 + b"e")),
        SubjectFacts.key("BOB", _changed(e, msg_id="cd" * 16)),
        SubjectFacts.key("BOB", _changed(e, sender="ALICF")),
        SubjectFacts.key("BOB", _changed(e, recipient="BOX")),
        SubjectFacts.key("BOB", _changed(e, digest=b"d" * 31 + b"e")),
        SubjectFacts.key("BOB", _changed(e, server_time=r.server_time + dt.timedelta(microseconds=1))),
        SubjectFacts.key("BOB", _changed(e, queue_number=8)),
        SubjectFacts.key("BOB", _changed(e, signer=b"s" * 31 + b"t")),
        SubjectFacts.key("BOB", _changed(e, signature=b"g" * 69 + b"h")),
        # the same bytes and text, cut elsewhere
        SubjectFacts.key("BOB", dataclasses.replace(_changed(e, digest=b"h" + r.digest), header=b"h" * 1199)),
        SubjectFacts.key("BOB", _changed(e, signer=r.signer + b"g", signature=b"g" * 69)),
        SubjectFacts.key("BOBA", dataclasses.replace(e, sender="LICE")),
    ]
    assert len(set(keys)) == len(keys)
    assert SubjectFacts.key("BOB", _entry()) == keys[0]  # and the same entry, the same key
