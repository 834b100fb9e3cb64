"""Certificates for tests that our own CA would never issue: bad ones, course-style ones, look-alikes.

Built directly with ``cryptography`` so each test states exactly which property is wrong.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pki.identity import DEFAULT_ORG_UNIT
from pki.keys import PrivateKey, certificate_hash, generate_key
from pki.keystore import Keystore, save_keystore

NOW = dt.datetime.now(dt.timezone.utc)
DAY = dt.timedelta(days=1)


def name(uid: str | None, cn: str, ou: str | None = DEFAULT_ORG_UNIT) -> x509.Name:
    attrs = []
    if ou is not None:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    if uid is not None:
        attrs.append(x509.NameAttribute(NameOID.PSEUDONYM, uid))
    return x509.Name(attrs)


@dataclass
class Issuer:
    cert: x509.Certificate
    key: PrivateKey


def self_signed_ca(subject: x509.Name, key: PrivateKey | None = None, *, days: int = 3650,
                   ski: bool = True) -> Issuer:
    key = key or generate_key()
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(NOW - DAY)
         .not_valid_after(NOW + days * DAY)
         .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True))
    if ski:
        b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    return Issuer(b.sign(key, certificate_hash(key)), key)


def leaf(issuer: Issuer, uid: str | None, *, cn: str | None = None, ou: str | None = DEFAULT_ORG_UNIT,
         not_before: dt.datetime | None = None, not_after: dt.datetime | None = None,
         eku: list[x509.ObjectIdentifier] | None = None, ca: bool | None = False,
         key: PrivateKey | None = None, course_key_usage: bool = False,
         digest: hashes.HashAlgorithm | None = None) -> Keystore:
    """A leaf with the given defects; ``eku=None`` means clientAuth, ``[]`` means no EKU extension."""
    key = key or generate_key()
    b = (x509.CertificateBuilder().subject_name(name(uid, cn or uid or "nobody", ou))
         .issuer_name(issuer.cert.subject).public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(not_before or NOW - DAY).not_valid_after(not_after or NOW + 365 * DAY))
    if ca is not None:
        b = b.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    b = b.add_extension(x509.KeyUsage(digital_signature=True, content_commitment=course_key_usage,
                                      key_encipherment=False, data_encipherment=False, key_agreement=False,
                                      key_cert_sign=bool(ca), crl_sign=False, encipher_only=False,
                                      decipher_only=False), critical=True)
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH] if eku is None else eku
    if usages:
        b = b.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    cert = b.sign(issuer.key, certificate_hash(issuer.key))
    if digest is not None:
        cert = resigned(cert, issuer.key, digest.name)
    return Keystore(key=key, cert=cert, chain=[issuer.cert])


def resigned(cert: x509.Certificate, key: PrivateKey, digest: str) -> x509.Certificate:
    """``cert`` signed again over ``digest`` (``sha1``): ``cryptography`` refuses to sign with a broken
    hash, OpenSSL (through pyOpenSSL's deprecated ``X509.sign``) still can, which is what tests need."""
    import warnings

    from OpenSSL import crypto

    legacy = crypto.X509.from_cryptography(cert)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        legacy.sign(crypto.PKey.from_cryptography_key(key), digest)
    return legacy.to_cryptography()


def course_pki(directory: Path, uids: tuple[str, ...] = ("ALICE", "BOB")) -> dict[str, Path]:
    """Keystores shaped like the original course ones: RSA-2048, flat root, no SAN/SKI/AKI, no EKU,
    KeyUsage digitalSignature+nonRepudiation, the CA bundled in an unprotected P12."""
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca = self_signed_ca(name("MSG_CA", "MSG CA"), ca_key, ski=False)
    paths = {"ca": directory / "course_ca.crt"}
    from pki.files import certs_to_pem

    paths["ca"].write_bytes(certs_to_pem([ca.cert]))
    for uid in (*uids, "MSG_SERVER"):
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        store = leaf(ca, uid, cn=f"Course {uid}", eku=[], ca=None, key=key, course_key_usage=True)
        paths[uid] = directory / f"course_{uid}.p12"
        save_keystore(paths[uid], store, None)
    return paths


def sha256(data: bytes) -> bytes:
    h = hashes.Hash(hashes.SHA256())
    h.update(data)
    return h.finalize()
