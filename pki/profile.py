"""The certificate profile of DESIGN.md §2: root CA, issuing intermediate CA, user and server leaves.

A trustme-like recipe layer: callers say *who* and *what role*; the extensions follow from that.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import secrets
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .identity import DEFAULT_ORG_UNIT, MSG_CA
from .keys import PrivateKey, PublicKey, certificate_hash

# Back-date a little so that a peer whose clock is slightly behind does not see "not yet valid".
_CLOCK_SKEW = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class Subject:
    """The subject fields the relay cares about."""

    uid: str
    cn: str
    org_unit: str = DEFAULT_ORG_UNIT
    organisation: str | None = None

    def to_name(self) -> x509.Name:
        attrs = []
        if self.organisation:
            attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, self.organisation))
        attrs += [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, self.org_unit),
            x509.NameAttribute(NameOID.COMMON_NAME, self.cn),
            x509.NameAttribute(NameOID.PSEUDONYM, self.uid),
        ]
        return x509.Name(attrs)


@dataclass(frozen=True)
class LeafRequest:
    """What a leaf certificate should say; ``server`` selects serverAuth instead of clientAuth."""

    subject: Subject
    server: bool = False
    dns_names: tuple[str, ...] = ()
    ip_addresses: tuple[str, ...] = ()
    days: int = 365
    extra_eku: tuple[x509.ObjectIdentifier, ...] = field(default=())


def _validity(builder: x509.CertificateBuilder, days: int, now: dt.datetime | None) -> x509.CertificateBuilder:
    start = (now or dt.datetime.now(dt.timezone.utc)) - _CLOCK_SKEW
    return builder.not_valid_before(start).not_valid_after(start + _CLOCK_SKEW + dt.timedelta(days=days))


def _base(subject: x509.Name, issuer: x509.Name, public_key: PublicKey, days: int,
          now: dt.datetime | None) -> x509.CertificateBuilder:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        # 159 random bits: unpredictable and positive, within RFC 5280's 20 octets.
        .serial_number(secrets.randbits(159) | 1)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    return _validity(builder, days, now)


def make_root(key: PrivateKey, *, org_unit: str = DEFAULT_ORG_UNIT, cn: str = "MSG Relay Root CA",
              days: int = 3650, now: dt.datetime | None = None) -> x509.Certificate:
    """A self-signed root CA (UID ``MSG_CA``); may issue only CAs and CRLs."""
    name = Subject(MSG_CA, cn, org_unit).to_name()
    builder = (
        _base(name, name, key.public_key(), days, now)
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
    )
    return builder.sign(key, certificate_hash(key))


def make_intermediate(key: PrivateKey, root: x509.Certificate, root_key: PrivateKey, *,
                      org_unit: str = DEFAULT_ORG_UNIT, cn: str = "MSG Relay Issuing CA",
                      days: int = 1825, now: dt.datetime | None = None) -> x509.Certificate:
    """The issuing CA: ``pathlen:0`` so it can sign leaves and nothing that signs further."""
    name = Subject("MSG_CA_ISSUING", cn, org_unit).to_name()
    builder = (
        _base(name, root.subject, key.public_key(), days, now)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(_aki(root), critical=False)
    )
    return builder.sign(root_key, certificate_hash(root_key))


def make_leaf(public_key: PublicKey, request: LeafRequest, issuer: x509.Certificate,
              issuer_key: PrivateKey, *, now: dt.datetime | None = None) -> x509.Certificate:
    """A user (clientAuth) or server (serverAuth + SAN) certificate, never a CA."""
    eku = [ExtendedKeyUsageOID.SERVER_AUTH if request.server else ExtendedKeyUsageOID.CLIENT_AUTH]
    eku += list(request.extra_eku)
    builder = (
        _base(request.subject.to_name(), issuer.subject, public_key, request.days, now)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=False,
                          crl_sign=False, encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
        .add_extension(_aki(issuer), critical=False)
    )
    san: list[x509.GeneralName] = [x509.DNSName(n) for n in request.dns_names]
    san += [x509.IPAddress(ipaddress.ip_address(a)) for a in request.ip_addresses]
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key, certificate_hash(issuer_key))


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                         crl_sign=True, encipher_only=False, decipher_only=False)


def _aki(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key())  # type: ignore[arg-type]
