"""What msg-client keeps between commands (issue 14), and the rule that makes each kept fact stale.

Every cache here must give the answer the full check gives: a kept subject is not shown for a sender
revoked since, for other header bytes or another receipt; the fact that the relay holds our key is
asked again after an hour, after any change, and after a publish that failed; a kept chain is
validated again; CRL bytes seen before skip their signature check, never their dates. README: "What
the client caches and when it is stale". The relay is :class:`tests.hostile_relay.HostileRelay`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from client import keys as client_keys
from client import state as client_state
from client.crlcache import CrlCache, CrlRefused
from client.state import ClientState
from pki.ca import CertificateAuthority
from pki.identity import cert_fingerprint
from pki.keystore import load_keystore
from pki.tls import client_context
from protocol.envelope import Sealed
from protocol.errors import ErrorCode
from protocol.keyrecord import read_record
from protocol.messages import error_response

from .harness import Result, private_pki, run_client
from .hostile_relay import HostileRelay, forge_sealed

UIDS = ("ALICE", "BOB", "CAROL")
UNVERIFIABLE = ":(unverifiable)"


@pytest.fixture()
def ca(tmp_path: Path) -> CertificateAuthority:
    return private_pki(tmp_path, UIDS)


@pytest.fixture()
def relay(tmp_path: Path, ca: CertificateAuthority):
    with HostileRelay(tmp_path) as hostile:
        hostile.enroll(*UIDS)
        yield hostile


def cli(relay: HostileRelay, uid: str, *args: str, stdin: bytes = b"", address: str | None = None) -> Result:
    d = relay.directory
    return run_client(address or relay.address, d / f"{uid}.p12", *args, stdin=stdin, state=d / "st" / uid,
                      extra=["--timeout", "5"])


def ok(r: Result) -> str:
    assert r.code == 0, r.err
    return r.out


def state_file(relay: HostileRelay, uid: str, name: str) -> Path:
    return relay.directory / "st" / uid / name


def cache_doc(path: Path) -> Any:
    """A cache file's document (the line after its MAC)."""
    return json.loads(path.read_bytes().partition(b"\n")[2])


def keyed_state(directory: Path, keystore: Any) -> ClientState:
    state = ClientState(directory)
    state.authenticate_caches(keystore.key)
    return state


def _der(crls: list) -> list[bytes]:
    return [c.public_bytes(Encoding.DER) for c in crls]


def _lunch(relay: HostileRelay) -> str:
    """Bob publishes his key, Alice sends him "lunch?", Bob lists it (so its subject is kept)."""
    ok(cli(relay, "BOB", "askqueue"))
    ok(cli(relay, "ALICE", "send", "BOB", "lunch?", stdin=b"at noon"))
    out = ok(cli(relay, "BOB", "askqueue"))
    assert out.startswith("1:ALICE:") and out.rstrip().endswith(":lunch?"), out
    assert cache_doc(state_file(relay, "BOB", "subjects.json"))["facts"]
    return out


# ============================================================================ kept subjects
def test_a_revoked_senders_subject_is_unverifiable_even_when_it_was_kept(relay, ca):
    _lunch(relay)
    ca.revoke(uid="ALICE", reason="key_compromise")  # nothing Alice's key signed counts any more
    relay.served_crls = _der(ca.build_crls())
    out = ok(cli(relay, "BOB", "askqueue"))
    assert out.startswith("1:ALICE:") and out.rstrip().endswith(UNVERIFIABLE), out


@pytest.mark.parametrize("receipt", ["the genuine receipt", "a receipt re-signed to match"])
def test_a_kept_subject_is_not_shown_for_other_header_bytes(relay, receipt):
    """The relay swaps in a header it sealed to Bob itself (the genuine receipt's digest then no longer
    covers it, which askqueue cannot see without the envelope), or re-signs the receipt to match."""
    _lunch(relay)
    genuine = relay.messages[("BOB", 1)]
    forged = forge_sealed(read_record(relay.keys["BOB"].record), sender="ALICE", recipient="BOB",
                          msg_id=genuine.msg_id, subject="lunch?", inner_signer=relay.keystore.key)
    sealed = Sealed(genuine.envelope_version, forged.header, genuine.envelope)
    relay.replace("BOB", 1, header=sealed.header, receipt=genuine.receipt if receipt == "the genuine receipt"
                  else relay.receipt("ALICE", "BOB", genuine.msg_id, sealed, 1))
    out = ok(cli(relay, "BOB", "askqueue"))
    assert out.rstrip().endswith(UNVERIFIABLE), out


def test_a_kept_subject_is_not_shown_with_another_receipt_signature(relay):
    _lunch(relay)
    genuine = relay.messages[("BOB", 1)]
    broken = genuine.receipt.signature[:-1] + bytes([genuine.receipt.signature[-1] ^ 1])
    relay.replace("BOB", 1, receipt=dataclasses.replace(genuine.receipt, signature=broken))
    out = ok(cli(relay, "BOB", "askqueue"))
    assert out.rstrip().endswith(UNVERIFIABLE), out


def test_kept_subjects_are_those_of_the_queue_just_listed(relay):
    _lunch(relay)
    ok(cli(relay, "BOB", "getmsg", "1"))
    ok(cli(relay, "BOB", "askqueue"))
    assert cache_doc(state_file(relay, "BOB", "subjects.json"))["facts"] == {}


def test_an_unreadable_cache_is_started_afresh(relay):
    _lunch(relay)
    for name in ("subjects.json", "verdicts.json", "certificates.json", "published.json"):
        state_file(relay, "BOB", name).write_text("{not json")
    out = ok(cli(relay, "BOB", "askqueue"))
    assert out.rstrip().endswith(":lunch?"), out


# ============================================================================ the published key
def test_our_key_is_not_looked_up_again_while_the_fact_holds(relay):
    ok(cli(relay, "BOB", "askqueue"))
    assert len(relay.ops("directory", "BOB")) == 1 and len(relay.ops("publish_key", "BOB")) == 1
    ok(cli(relay, "BOB", "askqueue"))
    assert len(relay.ops("directory", "BOB")) == 1 and len(relay.ops("publish_key", "BOB")) == 1


def test_a_key_the_relay_lost_is_published_again_once_the_fact_is_stale(relay, monkeypatch):
    ok(cli(relay, "BOB", "askqueue"))
    lost = relay.keys.pop("BOB")  # a relay restored from an old backup, say
    ok(cli(relay, "BOB", "askqueue"))  # within the hour: not noticed (the fact's stated price)
    assert "BOB" not in relay.keys
    monkeypatch.setattr(client_state, "PUBLISHED_TTL", dt.timedelta(0))  # the hour is over
    ok(cli(relay, "BOB", "askqueue"))
    assert relay.keys["BOB"] == lost and len(relay.ops("publish_key", "BOB")) == 2


def test_the_fact_is_about_one_record_certificate_and_relay(relay, tmp_path):
    ok(cli(relay, "BOB", "askqueue"))
    asked = len(relay.ops("directory", "BOB"))
    ok(cli(relay, "BOB", "rotate-key"))  # another record: the relay is asked whether it holds this one
    ok(cli(relay, "BOB", "askqueue"))
    assert len(relay.ops("directory", "BOB")) == asked + 1
    with HostileRelay(relay.directory) as other:  # another relay: asked there too
        other.enroll(*UIDS)
        other.keys["BOB"] = relay.keys["BOB"]
        ok(cli(relay, "BOB", "askqueue", address=other.address))
        assert len(other.ops("directory", "BOB")) == 1 and other.ops("publish_key") == []


def test_a_key_due_for_renewal_is_renewed_whatever_the_fact(relay, monkeypatch):
    ok(cli(relay, "BOB", "askqueue"))
    first = relay.keys["BOB"]
    monkeypatch.setattr(client_keys, "RENEW_BEFORE", dt.timedelta(days=400))  # every key is due now
    ok(cli(relay, "BOB", "askqueue"))
    assert relay.keys["BOB"] != first and len(relay.ops("publish_key", "BOB")) == 2


def test_a_publish_that_failed_leaves_no_fact(relay):
    relay.answers["publish_key"] = lambda obj, uid: error_response(obj["id"], ErrorCode.INTERNAL, "disk full")
    assert cli(relay, "BOB", "askqueue").code == 1
    assert not state_file(relay, "BOB", "published.json").exists()
    relay.answers.pop("publish_key")
    ok(cli(relay, "BOB", "askqueue"))
    assert "BOB" in relay.keys and len(relay.ops("publish_key", "BOB")) == 2


# ============================================================================ certificates and CRLs
def test_a_kept_chain_spares_the_directory_and_is_validated_again(relay, ca):
    _lunch(relay)
    by_fingerprint = [r for r in relay.ops("directory", "BOB") if r.get("fingerprint")]
    ok(cli(relay, "BOB", "askqueue"))
    assert [r for r in relay.ops("directory", "BOB") if r.get("fingerprint")] == by_fingerprint
    ca.revoke(uid="ALICE", reason="key_compromise")
    relay.served_crls = _der(ca.build_crls())
    assert ok(cli(relay, "BOB", "askqueue")).rstrip().endswith(UNVERIFIABLE)


def test_a_kept_chain_must_be_the_certificate_it_is_kept_for(tmp_path, ca):
    alice, bob = load_keystore(tmp_path / "ALICE.p12"), load_keystore(tmp_path / "BOB.p12")
    state = keyed_state(tmp_path / "st", bob)
    fingerprint = cert_fingerprint(alice.cert)
    state.remember_chain("ALICE", fingerprint, [bob.cert.public_bytes(Encoding.DER)])  # a tampered file, say
    state.save_caches()
    assert keyed_state(tmp_path / "st", bob).known_chain("ALICE", fingerprint) is None
    state.remember_chain("CAROL", fingerprint, [alice.cert.public_bytes(Encoding.DER)])
    state.save_caches()
    assert keyed_state(tmp_path / "st", bob).known_chain("CAROL", fingerprint) == [alice.cert.public_bytes(Encoding.DER)]


def test_a_cache_file_the_keystore_did_not_write_is_not_believed(tmp_path, ca):
    """Cache files carry a MAC keyed to the keystore's private key: someone who can write to the state
    directory but cannot use the keystore (a password-protected one) cannot plant a fact."""
    alice, bob = load_keystore(tmp_path / "ALICE.p12"), load_keystore(tmp_path / "BOB.p12")
    chain = [alice.cert.public_bytes(Encoding.DER)]
    fingerprint = cert_fingerprint(alice.cert)
    writer = keyed_state(tmp_path / "st", bob)
    writer.remember_chain("ALICE", fingerprint, chain)
    writer.save_caches()
    assert keyed_state(tmp_path / "st", bob).known_chain("ALICE", fingerprint) == chain
    assert keyed_state(tmp_path / "st", alice).known_chain("ALICE", fingerprint) is None  # another key
    assert ClientState(tmp_path / "st").known_chain("ALICE", fingerprint) is None  # no key: no cache at all
    path = tmp_path / "st" / "certificates.json"
    mac, _, body = path.read_bytes().partition(b"\n")
    doc = json.loads(body)
    doc["ALICE/" + "00" * 32] = doc.pop(f"ALICE/{fingerprint.hex()}")
    path.write_bytes(mac + b"\n" + json.dumps(doc, separators=(",", ":")).encode())  # same MAC, other facts
    assert keyed_state(tmp_path / "st", bob).known_chain("ALICE", bytes(32)) is None


def test_a_kept_subject_edited_in_the_state_directory_is_not_shown(relay):
    _lunch(relay)
    path = state_file(relay, "BOB", "subjects.json")
    mac, _, body = path.read_bytes().partition(b"\n")
    path.write_bytes(mac + b"\n" + body.replace(b"lunch?", b"FIRED"))
    out = ok(cli(relay, "BOB", "askqueue"))
    assert out.rstrip().endswith(":lunch?"), out  # checked again, from the relay's bytes


def test_a_relay_certificate_revoked_after_a_kept_verdict_is_refused(relay, ca):
    ok(cli(relay, "BOB", "askqueue"))
    ca.revoke(uid="MSG_SERVER")
    relay.served_crls = _der(ca.build_crls())
    r = cli(relay, "BOB", "askqueue")
    assert r.code == 1 and r.err.splitlines() == [
        "msg-client: the relay's certificate is not valid: certificate is revoked"], r.err


def test_crl_bytes_held_skip_their_signature_not_their_dates(tmp_path, ca, monkeypatch):
    store = load_keystore(tmp_path / "BOB.p12")
    state = keyed_state(tmp_path / "st", store)
    der = _der(ca.build_crls())[0]
    assert CrlCache(state, [ca.root], store.intermediates()).offer(der) is True
    held = CrlCache(state, [ca.root], store.intermediates())
    monkeypatch.setattr("client.crlcache.trusted_crl", lambda *a: pytest.fail("verified again"))
    assert held.offer(der) is False  # the same bytes: nothing new, nothing to verify
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=400)
    monkeypatch.setattr("client.crlcache.utc_now", lambda: later)
    with pytest.raises(CrlRefused, match="expired"):
        held.offer(der)


def test_a_look_alike_crl_is_verified_though_a_crl_of_that_name_is_held(tmp_path, ca):
    from .certfactory import self_signed_ca
    from .test_checks_client import _crl, _newest

    store = load_keystore(tmp_path / "BOB.p12")
    state = keyed_state(tmp_path / "st", store)
    assert CrlCache(state, [ca.root], store.intermediates()).offer(_der(ca.build_crls())[0])
    forged = _crl(ca.intermediate.subject, self_signed_ca(ca.intermediate.subject).key, _newest(ca) + 10**9)
    with pytest.raises(CrlRefused, match="not signed by a CA we trust"):
        CrlCache(state, [ca.root], store.intermediates()).offer(forged.public_bytes(Encoding.DER))


def test_tls_material_reaches_openssl_without_memfd_too(tmp_path, ca, monkeypatch):
    """Where there is no memfd, the key goes through a private temporary file that is removed."""
    monkeypatch.delattr(os, "memfd_create", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    store = load_keystore(tmp_path / "BOB.p12")
    assert client_context(store, store.ca_certificates()) is not None
    assert list((tmp_path / "tmp").iterdir()) == []


def test_a_command_whose_certificates_were_all_seen_loads_no_pyopenssl(relay):
    """The point of the verdicts kept: pyOpenSSL is imported only when a path must be validated."""
    import subprocess
    import sys

    _lunch(relay)
    d = relay.directory
    code = ("import sys; from client.cli import main; rc = main(sys.argv[1:]); "
            "assert 'OpenSSL' not in sys.modules, 'pyOpenSSL loaded'; sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code, "--server", relay.address, "--p12", str(d / "BOB.p12"),
                           "--state-dir", str(d / "st" / "BOB"), "askqueue"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip().endswith(":lunch?")


def test_state_files_hold_nothing_of_another_identity(relay):
    """Caches live in the identity's own state directory (0600, as its keys)."""
    _lunch(relay)
    for name in ("subjects.json", "verdicts.json", "certificates.json", "published.json"):
        path = state_file(relay, "BOB", name)
        assert path.exists() and path.stat().st_mode & 0o777 == 0o600, name
    assert not state_file(relay, "ALICE", "subjects.json").exists()
