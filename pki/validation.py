"""Certificate validation as the relay does it, for TLS peers and for message senders alike.

Path building, signatures, validity periods, CA constraints and CRLs are OpenSSL's (through
pyOpenSSL's ``X509StoreContext``), so a certificate accepted here is one stdlib ``ssl`` accepts in
the handshake. On top come the relay's profile checks, which no TLS library knows: a UID
(PSEUDONYM) present, the organisation's OU, the key usage and extended key usage for the role, and
a leaf that is not a CA. Nothing assumes our own profile: the original course certificates (flat
root, no SAN/SKI/AKI, no EKU) pass when their dates are valid.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from .errors import ValidationError
from .identity import (
    DEFAULT_ORG_UNIT,
    MSG_SERVER,
    RESERVED_UIDS,
    Identity,
    cert_fingerprint,
    cn_of,
    org_units_of,
    uid_of,
)

if TYPE_CHECKING:
    from OpenSSL import crypto

    from .verdicts import Verdicts

# pyOpenSSL (about 15 ms to import) is loaded by the first path validation, not by importing this module:
# a command whose certificates were all validated before (pki.verdicts) never loads it.

Role = Literal["client", "server"]
ROLES: tuple[Role, ...] = ("client", "server")

# OpenSSL verify error codes (x509_vfy.h) grouped into the reasons we report.
_REASONS: dict[int, tuple[str, str]] = {
    9: ("not_yet_valid", "certificate is not yet valid"),
    10: ("expired", "certificate has expired"),
    23: ("revoked", "certificate is revoked"),
    2: ("unknown_issuer", "unknown issuer: the certificate does not chain to the trusted CA"),
    20: ("unknown_issuer", "unknown issuer: the certificate does not chain to the trusted CA"),
    21: ("unknown_issuer", "unknown issuer: the certificate does not chain to the trusted CA"),
    18: ("unknown_issuer", "unknown issuer: self-signed certificate not trusted"),
    19: ("unknown_issuer", "unknown issuer: self-signed certificate in chain not trusted"),
    7: ("bad_signature", "certificate signature does not verify (look-alike or tampered issuer?)"),
    3: ("crl_missing", "no CRL available for the issuing CA"),
    8: ("crl_invalid", "CRL signature does not verify"),
    11: ("crl_invalid", "CRL is not yet valid"),
    12: ("crl_expired", "CRL has expired: the CA must publish a fresh one (msg-pki crl)"),
    24: ("ca_constraints", "an issuing certificate is not a valid CA"),
    25: ("ca_constraints", "path length constraint exceeded"),
    26: ("wrong_role", "certificate is not allowed for this purpose"),
    34: ("ca_constraints", "unhandled critical extension"),
}

_ROLE_EKU = {"client": ExtendedKeyUsageOID.CLIENT_AUTH, "server": ExtendedKeyUsageOID.SERVER_AUTH}
_VIEWS_KEPT = 1024  # chains whose revocation view one policy keeps (see TrustPolicy._revocations)
# RFC 5280 §5.3.1: these reasons mean nothing the key ever signed can be trusted, whatever the date.
_ALWAYS_REVOKED = {x509.ReasonFlags.key_compromise, x509.ReasonFlags.ca_compromise}


def _utc(t: dt.datetime) -> dt.datetime:
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


# The certificate policy of both layers (TLS peers and message senders alike): no key weaker than these,
# no signature over a broken hash anywhere in a path.
MIN_RSA_BITS = 2048
ALLOWED_CURVES = frozenset({"secp256r1", "secp384r1", "secp521r1"})
BROKEN_HASHES = frozenset({"md5", "sha1"})


def check_algorithms(cert: x509.Certificate, *, check_signature: bool = True) -> None:
    """ValidationError unless ``cert``'s key and (unless it is a trust anchor's self-signature) the
    hash of its signature meet the policy. OpenSSL refuses some of this at the TLS layer on its own;
    pyOpenSSL's path validation refuses none of it, so this one rule is applied at both."""
    key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise ValidationError("weak_key", f"RSA key of {key.key_size} bits: at least {MIN_RSA_BITS} required")
    elif isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ALLOWED_CURVES:
            raise ValidationError("weak_key", f"elliptic curve {key.curve.name} not allowed (P-256 or larger)")
    elif not isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        raise ValidationError("weak_key", f"key type {type(key).__name__} not allowed")
    if check_signature:
        try:
            algorithm = cert.signature_hash_algorithm
        except UnsupportedAlgorithm:
            raise ValidationError("weak_signature", "certificate signed with an unknown algorithm") from None
        if algorithm is not None and algorithm.name in BROKEN_HASHES:
            raise ValidationError("weak_signature", f"certificate signed with {algorithm.name.upper()}, "
                                  "which is broken")


def check_profile(cert: x509.Certificate, role: Role, org_unit: str | None = DEFAULT_ORG_UNIT) -> Identity:
    """The relay's own rules for a leaf that already chains to the trust anchor.

    Used on its own for TLS peers (stdlib ``ssl`` has done the chain) and by :func:`validate`.
    """
    check_algorithms(cert)
    uid = uid_of(cert)
    if uid is None:
        raise ValidationError("no_uid", "certificate has no usable UID (PSEUDONYM attribute)")
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        if bc.ca:
            raise ValidationError("ca_leaf", f"certificate of {uid} is a CA certificate, not a user or server one")
    except x509.ExtensionNotFound:
        pass
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        if not ku.digital_signature:
            raise ValidationError("wrong_role", f"certificate of {uid} does not allow digital signatures")
    except x509.ExtensionNotFound:
        pass
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        if _ROLE_EKU[role] not in eku and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in eku:
            raise ValidationError("wrong_role", f"certificate of {uid} is not a {role} certificate (extended key usage)")
    except x509.ExtensionNotFound:
        pass  # no EKU means unrestricted (RFC 5280), as on the course certificates
    # The UID decides the role as well: the course certificates carry no EKU at all.
    if role == "server" and uid != MSG_SERVER:
        raise ValidationError("wrong_role", f"server certificate has UID {uid}, expected {MSG_SERVER}")
    if role == "client" and uid in RESERVED_UIDS:
        raise ValidationError("wrong_role", f"UID {uid} is reserved and cannot act as a user")
    if org_unit is not None and org_unit not in org_units_of(cert):
        raise ValidationError("wrong_ou", f"certificate of {uid} is not from organisational unit {org_unit!r}")
    return Identity(uid=uid, cn=cn_of(cert))


def crl_covers_anchors(anchors: Iterable[x509.Certificate], crls: Iterable[x509.CertificateRevocationList]) -> bool:
    """Whether every CA can be checked (CRL_CHECK_ALL) or only the leaf (CRL_CHECK).

    Our CA publishes root and intermediate CRLs together; a flat CA made elsewhere may publish only
    one for its leaves. One rule for both the TLS layer and message validation.
    """
    issuers = {c.issuer for c in crls}
    return all(a.subject in issuers for a in anchors)


@dataclass
class TrustPolicy:
    """The trust anchor(s), the CA's current CRLs and the organisation's OU: what validation needs.

    Fixed once made (a new CRL makes a new policy): what it works out per chain is kept for its lifetime."""

    anchors: Sequence[x509.Certificate]
    crls: Sequence[x509.CertificateRevocationList] = field(default_factory=tuple)
    org_unit: str | None = DEFAULT_ORG_UNIT
    # Verdicts reached before on the same inputs (pki.verdicts), reused while they hold; None: none kept.
    verdicts: "Verdicts | None" = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.anchors:
            raise ValidationError("no_anchor", "no trust anchor (CA certificate) configured")
        self._anchor_x509: list[Any] | None = None
        # What the revocation check of a chain depends on (the chain and this policy's CRLs, both fixed),
        # worked out once per chain: see _revocations.
        self._revocation_views: dict[tuple[bytes, ...], list[tuple[bool, list[tuple[dt.datetime, Any]]]]] = {}
        self._crl_signatures: dict[tuple[int, bytes], bool] = {}
        self._check_all: bool | None = None

    def _store(self, at: dt.datetime | None, with_crls: bool) -> "crypto.X509Store":
        from OpenSSL import crypto

        if self._anchor_x509 is None:
            self._anchor_x509 = [crypto.X509.from_cryptography(a) for a in self.anchors]
        store = crypto.X509Store()
        for a in self._anchor_x509:
            store.add_cert(a)
        if with_crls and self.crls:
            for crl in self.crls:
                store.add_crl(crl)
            flags = crypto.X509StoreFlags.CRL_CHECK
            if crl_covers_anchors(self.anchors, self.crls):
                flags |= crypto.X509StoreFlags.CRL_CHECK_ALL
            store.set_flags(flags)
        if at is not None:
            store.set_time(_utc(at).replace(tzinfo=None))
        return store

    def path(self, cert: x509.Certificate, untrusted: Sequence[x509.Certificate] = (),
             at: dt.datetime | None = None) -> list[x509.Certificate]:
        """The verified chain (leaf first) or ValidationError naming the reason.

        ``at=None`` validates now with OpenSSL's own CRL checks. A past ``at`` (a message's server
        time) validates the path at that time and treats a revocation as effective only from its
        revocation date, unless the reason is a key or CA compromise.
        """
        from OpenSSL import crypto

        store = self._store(at, with_crls=at is None)
        ctx = crypto.X509StoreContext(store, crypto.X509.from_cryptography(cert),
                                      [crypto.X509.from_cryptography(c) for c in untrusted])
        try:
            chain = [c.to_cryptography() for c in ctx.get_verified_chain()]
        except crypto.X509StoreContextError as exc:
            code, depth = (exc.errors[0], exc.errors[1]) if len(exc.errors) >= 2 else (-1, 0)
            reason, text = _REASONS.get(code, ("invalid", f"certificate rejected: {exc}"))
            where = "" if depth == 0 else f" (CA certificate at depth {depth})"
            raise ValidationError(reason, text + where) from None
        for depth, member in enumerate(chain):
            # The anchor's self-signature is not what makes it trusted: its hash does not matter.
            try:
                check_algorithms(member, check_signature=depth < len(chain) - 1)
            except ValidationError as exc:
                where = "" if depth == 0 else f" (CA certificate at depth {depth})"
                raise ValidationError(exc.reason, f"{exc}{where}") from None
        if at is not None and self.crls:
            self._check_revocation_at(chain, _utc(at))
        return chain

    def _check_revocation_at(self, chain: list[x509.Certificate], at: dt.datetime) -> None:
        if self._check_all is None:  # fixed for this policy; comparing names costs 15 µs each
            self._check_all = crl_covers_anchors(self.anchors, self.crls)
        check_all = self._check_all
        for depth, (crl_found, revocations) in enumerate(self._revocations(chain)):
            if not crl_found:
                if depth == 0 or check_all:
                    raise ValidationError("crl_missing", "no CRL available for the issuing CA")
                continue
            for revocation_date, reason in revocations:
                if revocation_date <= at or reason in _ALWAYS_REVOKED:
                    where = "" if depth == 0 else f" (CA certificate at depth {depth})"
                    raise ValidationError("revoked", f"certificate is revoked{where}")

    def _revocations(self, chain: list[x509.Certificate]) -> list[tuple[bool, list[tuple[dt.datetime, Any]]]]:
        """For each certificate of ``chain`` below its anchor: whether a CRL signed by its issuer is held,
        and the (date, reason) of each revocation of it those CRLs list.

        This depends only on the chain and this policy's CRLs, so it is worked out once per chain and
        then compared with each time of use: a CRL's signature costs 6 ms and a serial lookup 1 ms with
        10 000 revocations, which 10 000 queue lines from one sender must not pay 10 000 times."""
        fingerprint = self.verdicts.fingerprint if self.verdicts is not None else cert_fingerprint
        key = tuple(fingerprint(c) for c in chain)
        view = self._revocation_views.get(key)
        if view is not None:
            return view
        view = []
        for cert, issuer in zip(chain, chain[1:], strict=False):
            crls = [c for c in self.crls if c.issuer == cert.issuer
                    and self._crl_signed_by(c, issuer)]
            revocations = []
            for crl in crls:
                entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
                if entry is not None:
                    revocations.append((entry.revocation_date_utc, _entry_reason(entry)))
            view.append((bool(crls), revocations))
        if len(self._revocation_views) >= _VIEWS_KEPT:  # a relay's policy sees every user's chain: bounded
            self._revocation_views.clear()
        self._revocation_views[key] = view
        return view

    def _crl_signed_by(self, crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> bool:
        """:func:`verify_crl_signature`, once per CRL of this policy and issuer (and with ``verdicts``,
        once per CRL and issuer ever: a signature that verified once verifies forever)."""
        fingerprint = self.verdicts.fingerprint if self.verdicts is not None else cert_fingerprint
        key = (id(crl), fingerprint(issuer))  # the policy holds its CRLs: an id stays theirs
        found = self._crl_signatures.get(key)
        if found is None:
            if self.verdicts is not None:
                found = self.verdicts.crl_signed(crl, issuer, lambda: verify_crl_signature(crl, issuer))
            else:
                found = verify_crl_signature(crl, issuer)
            self._crl_signatures[key] = found
        return found

    def validate(self, cert: x509.Certificate, untrusted: Sequence[x509.Certificate] = (),
                 role: Role = "client", at: dt.datetime | None = None) -> Identity:
        """Full validation (DESIGN.md §2): path, dates, CA constraints, CRL, then the profile.

        With ``verdicts``, a verdict reached before on the very same inputs is reused while the dates it
        depended on hold (pki.verdicts); revocation at a past time is checked against these CRLs every time."""
        if self.verdicts is not None:
            return self.verdicts.validate(self, cert, untrusted, role, at)
        return self.validated(cert, untrusted, role, at)[0]

    def validated(self, cert: x509.Certificate, untrusted: Sequence[x509.Certificate] = (),
                  role: Role = "client", at: dt.datetime | None = None) -> tuple[Identity, list[x509.Certificate]]:
        """Every check made afresh, nothing reused: the identity and the verified chain (leaf first)."""
        chain = self.path(cert, untrusted, at)
        return check_profile(cert, role, self.org_unit), chain


def trusted_crl(crl: x509.CertificateRevocationList, anchors: Sequence[x509.Certificate],
                intermediates: Sequence[x509.Certificate] = ()) -> bool:
    """Whether ``crl`` is signed by one of our trust anchors, or by an intermediate that chains to one:
    the rule for a CRL that came from somewhere we do not trust (a relay, a shared database)."""
    candidates = [a for a in anchors if a.subject == crl.issuer]
    policy = TrustPolicy(anchors, (), None)
    for cert in intermediates:
        if cert.subject != crl.issuer:
            continue
        try:
            policy.path(cert)
        except ValidationError:
            continue
        candidates.append(cert)
    return any(verify_crl_signature(crl, c) for c in candidates)


def verify_crl_signature(crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> bool:
    try:
        return crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def _entry_reason(entry: x509.RevokedCertificate) -> x509.ReasonFlags | None:
    try:
        return entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    except x509.ExtensionNotFound:
        return None


def validate(cert: x509.Certificate, untrusted: Sequence[x509.Certificate], anchors: Sequence[x509.Certificate],
             crls: Sequence[x509.CertificateRevocationList] = (), role: Role = "client",
             at: dt.datetime | None = None, org_unit: str | None = DEFAULT_ORG_UNIT) -> Identity:
    """One-call form of :meth:`TrustPolicy.validate`."""
    return TrustPolicy(anchors, crls, org_unit).validate(cert, untrusted, role, at)


__all__ = ["ROLES", "Role", "TrustPolicy", "check_algorithms", "check_profile", "crl_covers_anchors", "trusted_crl",
           "validate"]
