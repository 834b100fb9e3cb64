"""Who a certificate belongs to: the one place that reads a UID out of a certificate.

The UID is the subject's PSEUDONYM attribute (OID 2.5.4.65), as in the original course service; the
CN is only a readable name and is never used for access decisions.
"""

from __future__ import annotations

import hashlib
import re

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from .frozen import frozen

MSG_CA = "MSG_CA"
MSG_SERVER = "MSG_SERVER"
RESERVED_UIDS = frozenset({MSG_CA, MSG_SERVER})
DEFAULT_ORG_UNIT = "SSI MSG RELAY SERVICE"

# UIDs travel in protocol fields, file names and log lines: keep them to a safe, printable alphabet.
_UID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")


@frozen
class Identity:
    """The validated identity of a certificate holder."""

    uid: str
    cn: str | None = None


def is_valid_uid(uid: object) -> bool:
    """True for a syntactically acceptable UID (1-64 chars of ``A-Z a-z 0-9 _ . @ -``)."""
    return isinstance(uid, str) and _UID_RE.fullmatch(uid) is not None


def _single_attribute(name: x509.Name, oid: x509.ObjectIdentifier) -> str | None:
    values = name.get_attributes_for_oid(oid)
    if len(values) != 1:
        # Zero means absent; two or more is ambiguous, and ambiguity must never pick an identity.
        return None
    value = values[0].value
    return value if isinstance(value, str) else None


def uid_of(cert: x509.Certificate) -> str | None:
    """The certificate's UID (PSEUDONYM), or None when it has none or an unusable one."""
    uid = _single_attribute(cert.subject, NameOID.PSEUDONYM)
    return uid if uid is not None and is_valid_uid(uid) else None


def cert_fingerprint(cert: x509.Certificate | bytes) -> bytes:
    """SHA-256 of the certificate's DER: how the relay names one certificate among a user's several."""
    der = cert if isinstance(cert, bytes) else cert.public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).digest()


def cn_of(cert: x509.Certificate) -> str | None:
    """The subject's common name, if exactly one is present."""
    return _single_attribute(cert.subject, NameOID.COMMON_NAME)


def org_units_of(cert: x509.Certificate) -> list[str]:
    """All OU values of the subject (a profile check wants the configured one among them)."""
    return [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]
