"""Key generation and signatures for every key type the relay accepts.

Certificates carry ECDSA, Ed25519 or RSA keys; the relay signs messages, key records and receipts
with them. The choice of hash and padding per key type lives here only, so signer and verifier
can never disagree.
"""

from __future__ import annotations

from typing import Union

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from .errors import PkiError

PrivateKey = Union[ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey, rsa.RSAPrivateKey]
PublicKey = Union[ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey, rsa.RSAPublicKey]

KEY_TYPES = ("ecdsa-p256", "ecdsa-p384", "ed25519", "rsa-2048", "rsa-3072", "rsa-4096")
DEFAULT_KEY_TYPE = "ecdsa-p256"


def generate_key(key_type: str = DEFAULT_KEY_TYPE) -> PrivateKey:
    """A fresh private key of one of :data:`KEY_TYPES`."""
    if key_type == "ecdsa-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ecdsa-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if key_type.startswith("rsa-") and key_type in KEY_TYPES:
        return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[4:]))
    raise PkiError(f"unknown key type {key_type!r} (choose from {', '.join(KEY_TYPES)})")


def describe_key(key: PublicKey | PrivateKey) -> tuple[str, int]:
    """(algorithm name, size in bits) for display."""
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        return f"ECDSA {key.curve.name}", key.curve.key_size
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey)):
        return "Ed25519", 256
    if isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
        return "RSA", key.key_size
    return type(key).__name__, 0


def certificate_hash(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384 | None:
    """The hash used when this key signs a certificate or CRL (None for Ed25519, which has its own)."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


def _ec_hash(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> hashes.HashAlgorithm:
    return hashes.SHA384() if key.curve.key_size >= 384 else hashes.SHA256()


def _pss() -> padding.PSS:
    return padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)


def sign(key: PrivateKey, data: bytes) -> bytes:
    """Sign ``data``: ECDSA with SHA-256/384, Ed25519, or RSA-PSS with SHA-256."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(_ec_hash(key)))
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data)
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, _pss(), hashes.SHA256())
    raise PkiError(f"keys of type {type(key).__name__} cannot sign messages")


def verify_signature(key: PublicKey, signature: bytes, data: bytes) -> bool:
    """True when ``signature`` is ``key``'s signature over ``data`` (per :func:`sign`)."""
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, data, ec.ECDSA(_ec_hash(key)))
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, data)
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, data, _pss(), hashes.SHA256())
        else:
            return False
    except (InvalidSignature, ValueError):
        return False
    return True


def max_signature_size(key: PrivateKey | PublicKey) -> int:
    """The longest signature :func:`sign` can make with ``key``: ECDSA signatures are DER and vary."""
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey)):
        return 64
    if isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
        return (key.key_size + 7) // 8
    n = (key.curve.key_size + 7) // 8
    return 2 * (n + 1) + 8  # SEQUENCE of two INTEGERs, each possibly with a leading zero byte
