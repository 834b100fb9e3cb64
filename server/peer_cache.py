"""Client certificates that already passed the relay's profile check, so a reconnect skips the parsing.

Every CLI command is one connection, and after the TLS handshake the relay checks the client's leaf
against its profile (:func:`pki.validation.check_profile`: UID, OU, key usage, extended key usage, key
and signature algorithms, not a CA). That check parses the certificate's subject and extensions with
``cryptography``: about 175 µs per connection on the project machine, the largest piece of Python work
in accepting a connection. Its verdict depends on nothing but the certificate's bytes and the relay's
configured OU, so it is kept here, keyed by the exact DER the client presented (no digest, so no
collision to reason about).

What is *not* cached: the chain, validity dates and revocation. OpenSSL checks those in every
handshake against the current CRL, and a handshake that began under an older CRL is re-validated by
the session. Still, the cache belongs to one TLS context, and the relay builds a new context whenever
its CRLs change: the first lookup under a new context empties the cache, so nothing checked before a
CRL change is reused after it. A certificate that fails the check is never stored: it is checked again
on every attempt. The cache is bounded (least recently used out), and the certificate objects it keeps
are the ones the sessions of that certificate share, so an idle connection does not carry a parsed
copy of its own.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from cryptography import x509

from pki.errors import ValidationError
from pki.identity import Identity
from pki.validation import check_profile

PROFILE_CACHE_SIZE = 4096  # distinct client certificates remembered


@dataclass(frozen=True)
class CheckedPeer:
    """A client certificate that passed the profile check, and the identity the check returned."""

    identity: Identity
    cert: x509.Certificate


class ProfileCache:
    """``get``/``put`` by the certificate's DER; emptied when the TLS context (the CRL) changes."""

    def __init__(self, limit: int = PROFILE_CACHE_SIZE) -> None:
        if limit < 1:
            raise ValueError("a profile cache holds at least one certificate")
        self.limit = limit
        self._context: object | None = None
        self._entries: OrderedDict[bytes, CheckedPeer] = OrderedDict()

    def _under(self, context: object) -> None:
        """Forget everything checked under another TLS context (an earlier CRL)."""
        if context is not self._context:
            self._entries.clear()
            self._context = context

    def get(self, der: bytes, context: object) -> CheckedPeer | None:
        """The checked certificate presented as ``der``, or None when it must be checked."""
        self._under(context)
        checked = self._entries.get(der)
        if checked is not None:
            self._entries.move_to_end(der)
        return checked

    def put(self, der: bytes, context: object, identity: Identity, cert: x509.Certificate) -> CheckedPeer:
        """Remember that ``cert`` (presented as ``der``) passed the profile check under ``context``."""
        self._under(context)
        checked = CheckedPeer(identity, cert)
        self._entries[der] = checked
        self._entries.move_to_end(der)
        while len(self._entries) > self.limit:
            self._entries.popitem(last=False)
        return checked

    def check(self, der: bytes, context: object, org_unit: str | None) -> CheckedPeer:
        """The client certificate presented as ``der``, checked against the client profile: kept from an
        earlier connection under ``context``, or parsed and checked now (ValidationError, never kept)."""
        checked = self.get(der, context)
        if checked is not None:
            return checked
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            raise ValidationError("bad_certificate", "the client certificate cannot be read") from None
        return self.put(der, context, check_profile(cert, "client", org_unit), cert)

    def __len__(self) -> int:
        return len(self._entries)
