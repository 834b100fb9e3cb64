"""The validation API against a matrix of bad certificates: each check is shown rejecting."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from pki.ca import CertificateAuthority
from pki.errors import ValidationError
from pki.validation import TrustPolicy, check_profile

from .certfactory import DAY, NOW, Issuer, course_pki, leaf, self_signed_ca


@pytest.fixture()
def ca(fresh_ca: CertificateAuthority) -> CertificateAuthority:
    return fresh_ca


def policy(ca: CertificateAuthority, crl: bool = True) -> TrustPolicy:
    return TrustPolicy([ca.root], ca.build_crls() if crl else [])


def inter(ca: CertificateAuthority) -> Issuer:
    return Issuer(ca.intermediate, ca.intermediate_key)


def reason_of(ca: CertificateAuthority, store, role="client", **kw) -> str:
    with pytest.raises(ValidationError) as info:
        policy(ca).validate(store.cert, store.chain, role=role, **kw)
    return info.value.reason


def test_issued_client_and_server_validate(ca: CertificateAuthority) -> None:
    user = ca.issue("ALICE", cn="Alice")
    identity = policy(ca).validate(user.cert, user.chain, role="client")
    assert (identity.uid, identity.cn) == ("ALICE", "Alice")
    server = ca.issue("MSG_SERVER", server=True, dns_names=("localhost",))
    assert policy(ca).validate(server.cert, server.chain, role="server").uid == "MSG_SERVER"


@pytest.mark.parametrize("key_type", ["ecdsa-p384", "ed25519", "rsa-2048"])
def test_other_key_types_validate(tmp_path, key_type: str) -> None:
    ca = CertificateAuthority.init(tmp_path / key_type, key_type=key_type)
    user = ca.issue("BOB", key_type=key_type)
    assert policy(ca).validate(user.cert, user.chain).uid == "BOB"


def test_expired(ca):
    store = leaf(inter(ca), "OLD", not_before=NOW - 30 * DAY, not_after=NOW - DAY)
    store.chain = ca.chain
    assert reason_of(ca, store) == "expired"


def test_not_yet_valid(ca):
    store = leaf(inter(ca), "EARLY", not_before=NOW + DAY, not_after=NOW + 30 * DAY)
    store.chain = ca.chain
    assert reason_of(ca, store) == "not_yet_valid"


def test_validity_is_checked_at_the_time_of_use(ca):
    user = ca.issue("CAROL")
    with pytest.raises(ValidationError) as info:
        policy(ca, crl=False).validate(user.cert, user.chain, at=NOW + 400 * DAY)
    assert info.value.reason == "expired"


def test_unknown_issuer(ca, tmp_path):
    other = CertificateAuthority.init(tmp_path / "other")
    stranger = other.issue("ALICE")
    assert reason_of(ca, stranger) == "unknown_issuer"


def test_look_alike_ca_with_identical_subject_is_rejected(ca):
    """Issuer-name matching without a signature check is the classic failure: copy our exact DNs."""
    fake_root = self_signed_ca(ca.root.subject)
    fake_inter = self_signed_ca(ca.intermediate.subject)  # same DN as our intermediate, other key
    forged = leaf(fake_inter, "ALICE")
    forged.chain = [fake_inter.cert, fake_root.cert]
    assert reason_of(ca, forged) in {"unknown_issuer", "bad_signature"}
    forged.chain = [ca.intermediate]  # real intermediate offered, but it did not sign the leaf
    assert reason_of(ca, forged) in {"unknown_issuer", "bad_signature"}


def test_revoked(ca):
    user = ca.issue("MALLORY")
    ca.revoke(uid="MALLORY")
    assert reason_of(ca, user) == "revoked"


def test_revocation_at_a_past_time_respects_the_revocation_date(ca):
    user = ca.issue("DAVE")
    before = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=5)
    ca.revoke(uid="DAVE")
    assert policy(ca).validate(user.cert, user.chain, at=before).uid == "DAVE"
    assert reason_of(ca, user, at=dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=5)) == "revoked"


def test_key_compromise_revokes_retroactively(ca):
    user = ca.issue("ERIN")
    before = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=5)
    ca.revoke(uid="ERIN", reason="key_compromise")
    assert reason_of(ca, user, at=before) == "revoked"


def test_crl_from_a_look_alike_is_not_trusted_at_a_past_time(ca):
    """A CRL is used only when its signature verifies under the real issuer."""
    user = ca.issue("FRANK")
    fake = self_signed_ca(ca.intermediate.subject)
    forged_crl = (x509.CertificateRevocationListBuilder().issuer_name(ca.intermediate.subject)
                  .last_update(NOW - DAY).next_update(NOW + DAY).sign(fake.key, hashes.SHA256()))
    p = TrustPolicy([ca.root], [forged_crl, ca.build_crls()[1]])
    with pytest.raises(ValidationError) as info:
        p.validate(user.cert, user.chain, at=NOW)
    assert info.value.reason == "crl_missing"


def test_intermediate_missing(ca):
    user = ca.issue("GRACE")
    with pytest.raises(ValidationError) as info:
        policy(ca).validate(user.cert, [], role="client")
    assert info.value.reason == "unknown_issuer"


def test_no_pseudonym(ca):
    store = leaf(inter(ca), None, cn="anonymous")
    store.chain = ca.chain
    assert reason_of(ca, store) == "no_uid"


def test_wrong_ou(ca):
    store = leaf(inter(ca), "HEIDI", ou="SOME OTHER UNIT")
    store.chain = ca.chain
    assert reason_of(ca, store) == "wrong_ou"


def test_wrong_eku_for_role(ca):
    server = ca.issue("MSG_SERVER", server=True)
    assert reason_of(ca, server, role="client") == "wrong_role"
    user = ca.issue("IVAN")
    assert reason_of(ca, user, role="server") == "wrong_role"


def test_server_role_needs_the_server_uid_even_without_eku(ca):
    store = leaf(inter(ca), "JUDY", eku=[])
    store.chain = ca.chain
    assert reason_of(ca, store, role="server") == "wrong_role"
    assert policy(ca).validate(store.cert, store.chain, role="client").uid == "JUDY"


def test_ca_true_leaf(ca):
    store = leaf(inter(ca), "KEN", ca=True)
    store.chain = ca.chain
    # OpenSSL refuses it already (pathlen:0 on the intermediate forbids a CA below it), the profile check
    # refuses it on its own as well.
    assert reason_of(ca, store) in {"ca_leaf", "ca_constraints"}
    with pytest.raises(ValidationError) as info:
        check_profile(store.cert, "client")
    assert info.value.reason == "ca_leaf"


def test_reserved_uid_cannot_be_a_user(ca):
    store = leaf(inter(ca), "MSG_SERVER")
    store.chain = ca.chain
    assert reason_of(ca, store) == "wrong_role"


def test_course_certificates_validate(tmp_path):
    from pki.files import load_certificate_file
    from pki.keystore import load_keystore

    paths = course_pki(tmp_path)
    anchors = load_certificate_file(paths["ca"])
    alice = load_keystore(paths["ALICE"])
    assert alice.chain and alice.chain[0].subject == anchors[0].subject
    p = TrustPolicy(anchors)
    assert p.validate(alice.cert, alice.chain, role="client").uid == "ALICE"
    server = load_keystore(paths["MSG_SERVER"])
    assert p.validate(server.cert, server.chain, role="server").uid == "MSG_SERVER"
    with pytest.raises(ValidationError):
        p.validate(alice.cert, alice.chain, role="server")


def test_duplicate_pseudonym_is_no_identity(ca):
    from cryptography.x509.oid import NameOID

    from pki.identity import uid_of

    store = leaf(inter(ca), "LEO")
    assert uid_of(store.cert) == "LEO"
    two = x509.Name([x509.NameAttribute(NameOID.PSEUDONYM, "A"), x509.NameAttribute(NameOID.PSEUDONYM, "B")])
    cert = store.cert
    twin = (x509.CertificateBuilder().subject_name(two).issuer_name(cert.issuer).public_key(cert.public_key())
            .serial_number(1).not_valid_before(NOW - DAY).not_valid_after(NOW + DAY)
            .sign(ca.intermediate_key, hashes.SHA256()))
    assert uid_of(twin) is None
