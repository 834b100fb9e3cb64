"""pki/validation.py's refusals that test_pki_validation.py does not reach (issue 9 §5): a key usage
without signatures, no trust anchor, and revocation of the intermediate CA (now, and at a message's
time) including a root CRL from a look-alike."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import dsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from pki.ca import CertificateAuthority
from pki.errors import ValidationError
from pki.keys import PrivateKey, certificate_hash, generate_key
from pki.validation import TrustPolicy, check_profile

from .certfactory import Issuer, leaf, name, self_signed_ca

NOW = dt.datetime.now(dt.timezone.utc)


@pytest.fixture()
def ca(fresh_ca: CertificateAuthority) -> CertificateAuthority:
    return fresh_ca


def _root_crl(ca: CertificateAuthority, signer: PrivateKey, revoked: list[int]) -> x509.CertificateRevocationList:
    """A CRL in the root's name (signed by ``signer``) revoking ``revoked`` an hour ago."""
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca.root.subject)
               .last_update(NOW - dt.timedelta(minutes=5)).next_update(NOW + dt.timedelta(days=30))
               .add_extension(x509.CRLNumber(int(NOW.timestamp() * 1e6) + 1), critical=False))
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(NOW - dt.timedelta(hours=1)).build())
    return builder.sign(signer, certificate_hash(signer))


def test_a_key_usage_without_digital_signatures_is_refused(ca):
    """OpenSSL's path check has nothing against keyAgreement alone; the relay's profile needs signatures."""
    key = generate_key()
    cert = (x509.CertificateBuilder().subject_name(name("KIM", "KIM")).issuer_name(ca.intermediate.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW - dt.timedelta(days=1)).not_valid_after(NOW + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(ca.intermediate_key, certificate_hash(ca.intermediate_key)))
    with pytest.raises(ValidationError) as info:
        TrustPolicy([ca.root], ca.build_crls()).validate(cert, ca.chain)
    assert (info.value.reason, str(info.value)) == ("wrong_role", "certificate of KIM does not allow digital signatures")
    with pytest.raises(ValidationError):
        check_profile(cert, "server")


def test_a_server_only_certificate_is_no_client(ca):
    """An ordinary UID (not reserved, so no other check minds) with serverAuth only: the extended key
    usage alone refuses it as a client; anyExtendedKeyUsage allows both roles."""
    only_server = leaf(Issuer(ca.intermediate, ca.intermediate_key), "JUDY", eku=[ExtendedKeyUsageOID.SERVER_AUTH])
    with pytest.raises(ValidationError) as info:
        TrustPolicy([ca.root], ca.build_crls()).validate(only_server.cert, ca.chain, role="client")
    assert (info.value.reason, str(info.value)) == ("wrong_role", "certificate of JUDY is not a client certificate "
                                                                  "(extended key usage)")
    anything = leaf(Issuer(ca.intermediate, ca.intermediate_key), "KATE",
                    eku=[ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE])
    assert TrustPolicy([ca.root], ca.build_crls()).validate(anything.cert, ca.chain, role="client").uid == "KATE"


def test_no_trust_anchor_no_policy():
    with pytest.raises(ValidationError) as info:
        TrustPolicy([])
    assert info.value.reason == "no_anchor"


def test_a_revoked_intermediate_revokes_every_certificate_below_it(ca):
    user = ca.issue("ANNA")
    leaf_crl = ca.build_crls()[0]
    policy = TrustPolicy([ca.root], [leaf_crl, _root_crl(ca, ca.root_key, [ca.intermediate.serial_number])])
    for at in (None, NOW):  # now (OpenSSL's CRL checks) and at a message's time (the relay's own)
        with pytest.raises(ValidationError) as info:
            policy.validate(user.cert, user.chain, at=at)
        assert (info.value.reason, str(info.value)) == ("revoked", "certificate is revoked (CA certificate at depth 1)")
    clean = TrustPolicy([ca.root], [leaf_crl, _root_crl(ca, ca.root_key, [])])
    assert clean.validate(user.cert, user.chain).uid == clean.validate(user.cert, user.chain, at=NOW).uid == "ANNA"


def test_a_root_crl_from_a_look_alike_does_not_count(ca):
    """A CRL with the root's name, signed by another key, cannot vouch that the intermediate is not
    revoked: at a message's time the intermediate then has no CRL at all."""
    user = ca.issue("BEN")
    fake_root = self_signed_ca(ca.root.subject)
    policy = TrustPolicy([ca.root], [ca.build_crls()[0], _root_crl(ca, fake_root.key, [])])
    with pytest.raises(ValidationError) as info:
        policy.validate(user.cert, user.chain, at=NOW)
    assert (info.value.reason, str(info.value)) == ("crl_missing", "no CRL available for the issuing CA")
    with pytest.raises(ValidationError) as now:
        policy.validate(user.cert, user.chain)
    assert now.value.reason == "crl_invalid"


def test_a_dsa_key_is_refused(ca):
    """Only RSA, elliptic curves of P-256 and up, and Ed25519/Ed448 keys: a DSA leaf, validly signed by
    our CA, is not one of them."""
    key = dsa.generate_private_key(key_size=2048)
    cert = (x509.CertificateBuilder().subject_name(name("DORA", "DORA")).issuer_name(ca.intermediate.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW - dt.timedelta(days=1)).not_valid_after(NOW + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca.intermediate_key, certificate_hash(ca.intermediate_key)))
    with pytest.raises(ValidationError) as info:
        TrustPolicy([ca.root], ca.build_crls()).validate(cert, ca.chain)
    assert (info.value.reason, str(info.value)) == ("weak_key", "key type DSAPublicKey not allowed")
