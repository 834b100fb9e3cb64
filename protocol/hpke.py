"""HPKE (RFC 9180) key pairs and single-shot sealing, through ``cryptography``'s recipe.

Keys travel and rest as raw bytes: X25519 as 32 bytes; the ML-KEM-768 + X25519 hybrid as the
ML-KEM seed (64) + X25519 private key (32), public ML-KEM key (1184) + X25519 public key (32).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from pki.errors import MsgRelayError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives import hpke

_MLKEM_SEED, _MLKEM_PUB, _X = 64, 1184, 32

# cryptography's HPKE and ML-KEM are imported by the functions that seal or open, not with this module:
# most msg-client commands (askqueue with every subject verified before, getmsg of nothing) never do.


class HpkeError(MsgRelayError):
    """Sealing or opening failed (wrong key, wrong info, tampered ciphertext, malformed key)."""


def _suite(kem: str) -> "hpke.Suite":
    from cryptography.hazmat.primitives import hpke

    if kem == "X25519":
        return hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
    if kem == "MLKEM768_X25519":
        return hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
    raise HpkeError(f"unsupported KEM {kem}")


def generate(kem: str) -> tuple[bytes, bytes]:
    """A fresh key pair as (private bytes, public bytes)."""
    from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

    x = x25519.X25519PrivateKey.generate()
    if kem == "X25519":
        return x.private_bytes_raw(), x.public_key().public_bytes_raw()
    if kem == "MLKEM768_X25519":
        m = mlkem.MLKEM768PrivateKey.generate()
        return (m.private_bytes_raw() + x.private_bytes_raw(),
                m.public_key().public_bytes_raw() + x.public_key().public_bytes_raw())
    raise HpkeError(f"unsupported KEM {kem}")


def _public(kem: str, data: bytes) -> object:
    from cryptography.hazmat.primitives import hpke
    from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

    try:
        if kem == "X25519" and len(data) == _X:
            return x25519.X25519PublicKey.from_public_bytes(data)
        if kem == "MLKEM768_X25519" and len(data) == _MLKEM_PUB + _X:
            return hpke.MLKEM768X25519PublicKey(mlkem.MLKEM768PublicKey.from_public_bytes(data[:_MLKEM_PUB]),
                                                x25519.X25519PublicKey.from_public_bytes(data[_MLKEM_PUB:]))
    except ValueError:
        pass
    raise HpkeError(f"malformed {kem} public key")


def check_public(kem: str, data: bytes) -> None:
    """HpkeError unless ``data`` is a well-formed public key for ``kem`` (length, and a usable point):
    a record with a malformed key must be refused where it is read, not crash whoever seals to it."""
    from cryptography.hazmat.primitives.asymmetric import x25519

    _public(kem, data)
    try:
        # A low-order X25519 point (all zeros, say) parses, but no shared secret can be made with it.
        x25519.X25519PrivateKey.generate().exchange(x25519.X25519PublicKey.from_public_bytes(data[-_X:]))
    except ValueError:
        raise HpkeError(f"malformed {kem} public key (unusable X25519 point)") from None


@functools.lru_cache(maxsize=8)
def _private(kem: str, data: bytes) -> object:
    """The private key object, made once per key: expanding an ML-KEM seed costs more than a decryption
    (0.3 ms), and a queue opens thousands of headers sealed to the same one or two keys."""
    from cryptography.hazmat.primitives import hpke
    from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

    try:
        if kem == "X25519" and len(data) == _X:
            return x25519.X25519PrivateKey.from_private_bytes(data)
        if kem == "MLKEM768_X25519" and len(data) == _MLKEM_SEED + _X:
            return hpke.MLKEM768X25519PrivateKey(mlkem.MLKEM768PrivateKey.from_seed_bytes(data[:_MLKEM_SEED]),
                                                 x25519.X25519PrivateKey.from_private_bytes(data[_MLKEM_SEED:]))
    except ValueError:
        pass
    raise HpkeError(f"malformed {kem} private key")


def seal(kem: str, public_key: bytes, plaintext: bytes, info: bytes) -> bytes:
    try:
        return _suite(kem).encrypt(plaintext, _public(kem, public_key), info=info)  # type: ignore[arg-type]
    except ValueError:
        raise HpkeError(f"cannot seal to this {kem} public key") from None


def open_sealed(kem: str, private_key: bytes, ciphertext: bytes, info: bytes) -> bytes:
    from cryptography.exceptions import InvalidTag

    try:
        return _suite(kem).decrypt(ciphertext, _private(kem, private_key), info=info)  # type: ignore[arg-type]
    except (InvalidTag, ValueError):
        raise HpkeError("cannot open: wrong key, wrong context or tampered ciphertext") from None
