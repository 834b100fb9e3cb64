"""The newest CRL the client has verified for each CA, kept in its state directory.

Revocation data comes from the relay, which the client does not trust: a CRL counts only when its
signature verifies under a CA certificate that chains to our trust anchor, it is not past its
``nextUpdate``, and its CRL number is not lower than that of the CRL we already hold for that CA.
So a relay can withhold a newer CRL for a while, but never make the client go back to an older one.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence

from cryptography import x509

from pki.validation import trusted_crl
from protocol.crls import crl_number, issuer_id
from protocol.encoding import utc_now

from .errors import ClientError
from .operations import RelayOperations
from .state import ClientState, StateError

_DOC = "crls.json"


class CrlRefused(ClientError):
    """A CRL that must not be used (unknown issuer, bad signature, expired, older than ours)."""


class CrlUntrusted(CrlRefused):
    """A CRL of a CA we do not know (a relay may serve several organisations' CRLs)."""


class CrlOlder(CrlRefused):
    """A valid CRL, but older than the one already held for its CA."""


class CrlCache:
    def __init__(self, state: ClientState, anchors: Sequence[x509.Certificate],
                 intermediates: Sequence[x509.Certificate] = ()) -> None:
        self.state = state
        self._anchors, self._intermediates = list(anchors), list(intermediates)
        self._held: dict[bytes, x509.CertificateRevocationList] = {}
        self._der: dict[bytes, bytes] = {}  # the DER each held CRL was read from: its digest costs no re-encoding
        for text in state.load_doc(_DOC, {}).values():
            try:
                der = base64.b64decode(text)
                crl = x509.load_der_x509_crl(der)
            except (ValueError, TypeError):
                raise StateError(f"{state.dir / _DOC}: corrupt CRL cache (move it away to start afresh)") from None
            self._held[issuer_id(crl.issuer)] = crl
            self._der[issuer_id(crl.issuer)] = der

    def crls(self) -> list[x509.CertificateRevocationList]:
        return list(self._held.values())

    def digests(self) -> list[tuple[x509.CertificateRevocationList, bytes]]:
        """Each held CRL with the SHA-256 of its DER (what names it in kept verdicts, pki.verdicts)."""
        return [(crl, hashlib.sha256(self._der[key]).digest()) for key, crl in self._held.items()]

    def number(self, issuer: bytes) -> int | None:
        held = self._held.get(issuer)
        return crl_number(held) if held is not None else None

    def offer(self, der: bytes) -> bool:
        """Keep ``der`` if it is a valid CRL newer than the one held for its CA; True if it was kept.

        Raises CrlRefused for a CRL that is invalid or older than ours (a relay rolling back).

        The very bytes of the CRL held for its CA (a ``--crl`` file given on every command, say) were
        verified when they were kept: their signature and issuer are not checked again, their dates are."""
        try:
            crl = x509.load_der_x509_crl(der)
            same = self._der.get(issuer_id(crl.issuer)) == der
            ours = same or any(c.subject == crl.issuer for c in (*self._anchors, *self._intermediates))
            trusted = same or ours and trusted_crl(crl, self._anchors, self._intermediates)
        except ValueError:  # an issuer name that does not parse, say
            raise CrlRefused("the relay sent an unreadable CRL") from None
        if not ours:
            raise CrlUntrusted(f"CRL of {crl.issuer.rfc4514_string()} is from a CA we do not know")
        if not trusted:
            # Our CA's name, not our CA's signature: a forgery, named as such.
            raise CrlRefused(f"CRL of {crl.issuer.rfc4514_string()} is not signed by a CA we trust")
        if crl.next_update_utc is not None and crl.next_update_utc <= utc_now():
            raise CrlRefused(f"CRL of {crl.issuer.rfc4514_string()} expired at {crl.next_update_utc:%Y-%m-%d %H:%M}Z")
        key = issuer_id(crl.issuer)
        held = self._held.get(key)
        if held is not None:
            if crl_number(crl) < crl_number(held):
                raise CrlOlder(f"CRL number {crl_number(crl)} is older than the one we hold ({crl_number(held)})")
            if crl_number(crl) == crl_number(held):
                return False
        self._held[key] = crl
        self._der[key] = der
        self.state.save_doc(_DOC, {k.hex(): base64.b64encode(d).decode() for k, d in self._der.items()})
        return True

    async def refresh(self, client: RelayOperations) -> None:
        """Fetch from the relay every CRL newer than ours (by CRL number); nothing else travels."""
        for info in await client.crl_list():
            held = self.number(info.issuer)
            if held is not None and held >= info.number:
                continue
            try:
                self.offer(await client.fetch_crl(info))
            except CrlUntrusted:
                continue  # another CA's (a relay may serve several): not ours to use

