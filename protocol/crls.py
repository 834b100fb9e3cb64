"""CRLs on the wire: described by issuer, number and digest, and carried in pieces that fit a frame.

A CRL only grows (every revocation, every renewal adds an entry); with 10 000 revocations it is
hundreds of kilobytes. So it never rides inside another answer: a client asks which CRLs the relay
holds (``crls``), and fetches a CRL (``crl``, piece by piece) only when it is newer than the one it
has already verified. Both ends use this module, so the piece size and the digest rule are one.
"""

from __future__ import annotations

import hashlib
import json

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from . import PROTOCOL_VERSION
from .encoding import b64e
from .frames import MIN_FRAME_LIMIT
from .messages import CrlInfo, CrlResult

# Room in a piece's frame for everything but the data: the envelope of the response with the
# widest request id a client may send, the digest, offset and total.
_PIECE_OVERHEAD = len(json.dumps({"v": PROTOCOL_VERSION, "id": "x" * 64, "ok": True, "digest": b64e(bytes(32)),
                                  "offset": 2**53, "total": 2**53, "data": ""}, separators=(",", ":"))) + 8


def piece_size(max_frame: int) -> int:
    """The most CRL bytes whose base64 fits in one response frame (a multiple of 3: no padding inside)."""
    return (max_frame - _PIECE_OVERHEAD) // 4 * 3


def crl_number(crl: x509.CertificateRevocationList) -> int:
    """What orders a CA's CRLs: its CRL number (RFC 5280 §5.2.3), or for a CRL without one (CAs made
    elsewhere) its thisUpdate in seconds since the epoch."""
    try:
        return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
    except x509.ExtensionNotFound:
        return int(crl.last_update_utc.timestamp())


def issuer_id(name: x509.Name) -> bytes:
    """How the wire names a CRL's issuer: the SHA-256 of the issuer's DER name."""
    return hashlib.sha256(name.public_bytes()).digest()


def describe(crl: x509.CertificateRevocationList) -> tuple[CrlInfo, bytes]:
    """The wire description of ``crl`` and its DER bytes (what the digest covers)."""
    der = crl.public_bytes(Encoding.DER)
    return CrlInfo(issuer_id(crl.issuer), crl_number(crl), hashlib.sha256(der).digest(), len(der)), der


def piece(der: bytes, digest: bytes, offset: int, max_frame: int) -> CrlResult | None:
    """The piece of ``der`` from ``offset`` (None for an offset past the end)."""
    if offset >= len(der):
        return None
    return CrlResult(digest, offset, len(der), der[offset:offset + piece_size(max_frame)])


class CrlAssembler:
    """Collects the pieces of one CRL as they arrive and checks them against its announced digest.

    It refuses pieces that do not continue where the last one ended or that change the announced size,
    so a relay cannot make a client loop or grow without bound."""

    def __init__(self, info: CrlInfo) -> None:
        self.info = info
        self._data = bytearray()

    @property
    def next_offset(self) -> int:
        return len(self._data)

    @property
    def complete(self) -> bool:
        return len(self._data) == self.info.size

    def add(self, result: CrlResult) -> None:
        if result.digest != self.info.digest or result.total != self.info.size:
            raise ValueError("the relay sent a piece of another CRL")
        if result.offset != len(self._data) or not result.data:
            raise ValueError("the relay sent a CRL piece out of order")
        if len(self._data) + len(result.data) > self.info.size:
            raise ValueError("the relay sent more CRL bytes than announced")
        self._data += result.data

    def der(self) -> bytes:
        """The whole CRL, once its bytes match the announced digest."""
        data = bytes(self._data)
        if not self.complete or hashlib.sha256(data).digest() != self.info.digest:
            raise ValueError("the CRL the relay sent does not match its digest")
        return data


def piece_request_offsets(info: CrlInfo, first: CrlResult) -> list[int]:
    """After the first piece (whose length is the relay's piece size), every other piece's offset.

    A piece must be as large as the smallest frame a relay may use carries (or the whole CRL): a relay
    sending 1-byte pieces of a 16 MB CRL would have a client make 16 million requests."""
    step = len(first.data)
    if step < min(info.size, piece_size(MIN_FRAME_LIMIT)):
        raise ValueError(f"the relay sent a CRL in pieces of {step} bytes, too small")
    return list(range(step, info.size, step))


__all__ = ["CrlAssembler", "crl_number", "describe", "issuer_id", "piece", "piece_request_offsets", "piece_size"]
