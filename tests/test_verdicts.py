"""Kept certificate verdicts (pki/verdicts.py) give the answer a fresh validation gives, or none.

Each test makes a verdict, changes one thing it depended on (a CRL, the time, the pool, the kept
dates) and checks that validation with the kept verdicts still refuses what a fresh one refuses.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from pki.ca import CertificateAuthority
from pki.errors import ValidationError
from pki.validation import TrustPolicy
from pki.verdicts import Verdicts

from .certfactory import self_signed_ca

NOW = dt.datetime.now(dt.timezone.utc)
DAY = dt.timedelta(days=1)


@pytest.fixture()
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path / "ca")


def _policy(ca: CertificateAuthority, verdicts: Verdicts, crls: list | None = None) -> TrustPolicy:
    return TrustPolicy([ca.root], ca.build_crls() if crls is None else crls, verdicts=verdicts)


def _afresh(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Record every validation made in full (OpenSSL asked), so a test can tell a kept verdict was used."""
    calls: list[object] = []
    original = TrustPolicy.validated

    def spy(self: TrustPolicy, *args: object, **kw: object) -> object:
        calls.append(args)
        return original(self, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(TrustPolicy, "validated", spy)
    return calls


def test_a_kept_verdict_is_used_and_survives_the_state_directory(ca, monkeypatch):
    user = ca.issue("ALICE")
    calls = _afresh(monkeypatch)
    kept = Verdicts()
    crls = ca.build_crls()
    _policy(ca, kept, crls).validate(user.cert, user.chain)
    _policy(ca, kept, crls).validate(user.cert, user.chain, at=NOW)
    assert len(calls) == 2 and kept.changed
    again = Verdicts(kept.to_doc())  # as the next command loads it
    assert _policy(ca, again, crls).validate(user.cert, user.chain).uid == "ALICE"
    assert _policy(ca, again, crls).validate(user.cert, user.chain, at=NOW - dt.timedelta(minutes=1)).uid == "ALICE"
    assert len(calls) == 2  # neither asked OpenSSL again


def test_a_verdict_of_now_does_not_outlive_its_crl(ca):
    """A new CRL is a new key: the certificate it revokes is refused at once."""
    user = ca.issue("BOB")
    kept = Verdicts()
    _policy(ca, kept).validate(user.cert, user.chain)
    ca.revoke(uid="BOB")
    with pytest.raises(ValidationError) as info:
        _policy(ca, kept).validate(user.cert, user.chain)
    assert info.value.reason == "revoked"


def test_a_kept_path_is_checked_against_the_current_crl_every_time(ca):
    """The chain at a past time is kept; whether it was revoked by then is asked of the CRLs of now."""
    user = ca.issue("CAROL")
    kept = Verdicts()
    _policy(ca, kept).validate(user.cert, user.chain, at=NOW)
    ca.revoke(uid="CAROL", reason="key_compromise")  # retroactive: nothing CAROL signed counts
    with pytest.raises(ValidationError) as info:
        _policy(ca, kept).validate(user.cert, user.chain, at=NOW)
    assert info.value.reason == "revoked"


def test_a_kept_path_holds_only_within_its_certificates_dates(ca):
    user = ca.issue("DAVE", days=2)
    kept = Verdicts()
    _policy(ca, kept).validate(user.cert, user.chain, at=NOW)
    with pytest.raises(ValidationError) as info:
        _policy(ca, kept).validate(user.cert, user.chain, at=NOW + 5 * DAY)
    assert info.value.reason == "expired"


def test_a_verdict_past_its_dates_is_worked_out_again(ca, monkeypatch):
    user = ca.issue("ERIN")
    kept = Verdicts()
    crls = ca.build_crls()
    _policy(ca, kept, crls).validate(user.cert, user.chain)
    _policy(ca, kept, crls).validate(user.cert, user.chain, at=NOW)
    for verdict in (*kept.now.values(), *kept.paths.values()):
        verdict["until"] = NOW.timestamp() - 3600  # as if its certificate or CRL had expired an hour ago
    calls = _afresh(monkeypatch)
    _policy(ca, kept, crls).validate(user.cert, user.chain)
    _policy(ca, kept, crls).validate(user.cert, user.chain, at=NOW)
    assert len(calls) == 2


def test_a_verdict_is_for_the_pool_it_was_reached_with(ca):
    """Without the intermediate there is no path, whatever was kept for the leaf with it."""
    user = ca.issue("FRANK")
    kept = Verdicts()
    crls = ca.build_crls()  # the same CRLs throughout: only the pool differs
    _policy(ca, kept, crls).validate(user.cert, user.chain)
    _policy(ca, kept, crls).validate(user.cert, user.chain, at=NOW)
    for at in (None, NOW):
        with pytest.raises(ValidationError) as info:
            _policy(ca, kept, crls).validate(user.cert, [], at=at)
        assert info.value.reason == "unknown_issuer"


def test_a_kept_crl_signature_vouches_for_that_crl_only(ca):
    """The genuine CRL's signature is kept; a look-alike CRL of the same issuer name is not trusted."""
    user = ca.issue("GRACE")
    kept = Verdicts()
    _policy(ca, kept).validate(user.cert, user.chain, at=NOW)
    assert kept.crl_signatures
    fake = self_signed_ca(ca.intermediate.subject)
    forged = (x509.CertificateRevocationListBuilder().issuer_name(ca.intermediate.subject)
              .last_update(NOW - DAY).next_update(NOW + DAY).sign(fake.key, hashes.SHA256()))
    with pytest.raises(ValidationError) as info:
        _policy(ca, kept, [forged, ca.build_crls()[1]]).validate(user.cert, user.chain, at=NOW)
    assert info.value.reason == "crl_missing"


def test_a_malformed_kept_verdict_is_never_taken(ca, monkeypatch):
    user = ca.issue("HEIDI")
    kept = Verdicts()
    crls = ca.build_crls()
    _policy(ca, kept, crls).validate(user.cert, user.chain, at=NOW)
    doc = kept.to_doc()
    for verdict in doc["paths"].values():
        verdict["chain"] = ["00" * 32]  # names a certificate nobody has
    calls = _afresh(monkeypatch)
    assert _policy(ca, Verdicts(doc), crls).validate(user.cert, user.chain, at=NOW).uid == "HEIDI"
    assert len(calls) == 1
    assert Verdicts({"now": "nonsense", "paths": {"k": "nonsense"}}).to_doc()["paths"] == {}


def test_what_is_kept_by_object_is_for_that_object_only(ca):
    """Fingerprints and keys are kept by ``id()`` within a process; an id reused by another object (the
    first one gone) must not hand the new one the old one's answer."""
    alice, bob = ca.issue("IVAN"), ca.issue("JUDY")
    kept = Verdicts()
    kept._fps[id(bob.cert)] = (alice.cert, b"\x00" * 32)  # as if alice.cert had lived at bob.cert's address
    from pki.identity import cert_fingerprint

    assert kept.fingerprint(bob.cert) == cert_fingerprint(bob.cert)
    policy = _policy(ca, kept)
    policy.validate(alice.cert, alice.chain)
    (ids,) = kept._keys
    kept._keys[(True, "client", id(policy), id(bob.cert), *map(id, bob.chain))] = kept._keys.pop(ids)
    assert policy.validate(bob.cert, bob.chain).uid == "JUDY"


def test_a_keystore_answers_for_its_current_chain_and_certificate(ca):
    user = ca.issue("KARL")
    assert user.uid == "KARL" and user.intermediates() == [ca.intermediate]
    user.chain = [ca.root]
    user.cert = ca.issue("LUKE").cert
    assert user.intermediates() == [] and user.ca_certificates() == [ca.root] and user.uid == "LUKE"


def test_a_verdict_reached_without_an_ou_check_does_not_stand_for_one(ca):
    """``org_unit=None`` checks no organisational unit; its verdict must not answer a policy that checks
    one, even the empty one."""
    user = ca.issue("ALICE")
    kept = Verdicts()
    crls = ca.build_crls()
    unchecked = TrustPolicy([ca.root], crls, None, verdicts=kept)
    assert unchecked.validate(user.cert, user.chain).uid == "ALICE"
    with pytest.raises(ValidationError, match="organisational unit ''"):
        TrustPolicy([ca.root], crls, "", verdicts=kept).validate(user.cert, user.chain)
