"""PKCS#12 keystores: a party's key, its certificate and the CA chain, in one file.

Reads keystores from anywhere (ours, the original course ones with the CA bundled, ``openssl
pkcs12 -export`` ones, unprotected or protected); writes protected ones with PBES2/AES-256 and a
SHA-256 MAC, never the RC2-40 of older tools.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from .errors import KeystoreError, PkiError, WrongPassword
from .files import read_bytes, write_atomic
from .identity import uid_of
from .keys import PrivateKey
from .passwords import NO_PASSWORD, PasswordSource


@dataclass
class Keystore:
    """A loaded keystore: the private key, its leaf certificate and the rest of the chain."""

    key: PrivateKey
    cert: x509.Certificate
    chain: list[x509.Certificate] = field(default_factory=list)

    @property
    def uid(self) -> str | None:
        held = self.__dict__.get("_uid")  # read once per certificate: a client asks for it on every line
        if held is None or held[0] is not self.cert:
            held = self.__dict__["_uid"] = (self.cert, uid_of(self.cert))
        return held[1]

    def ca_certificates(self) -> list[x509.Certificate]:
        """The self-signed certificates of the chain: the trust anchors bundled in the keystore."""
        return [c for c, root in self._sorted() if root]

    def intermediates(self) -> list[x509.Certificate]:
        return [c for c, root in self._sorted() if not root]

    def _sorted(self) -> list[tuple[x509.Certificate, bool]]:
        """Each certificate of the chain and whether it is self-signed, worked out once per chain: comparing
        two names costs 15 µs, and a client asks for its intermediates for every certificate it validates."""
        held = self.__dict__.get("_sorted_chain")
        if held is None or held[0] != [id(c) for c in self.chain]:
            held = ([id(c) for c in self.chain], [(c, c.subject == c.issuer) for c in self.chain])
            self.__dict__["_sorted_chain"] = held
        return held[1]


def order_chain(leaf: x509.Certificate, others: list[x509.Certificate]) -> list[x509.Certificate]:
    """Sort ``others`` from the leaf's issuer upward; certificates off the path go last."""
    remaining = [c for c in others if c != leaf]
    ordered: list[x509.Certificate] = []
    current = leaf
    while True:
        nxt = next((c for c in remaining if c.subject == current.issuer and c not in ordered), None)
        if nxt is None or current.subject == current.issuer:
            break
        ordered.append(nxt)
        remaining.remove(nxt)
        current = nxt
    return ordered + remaining


def _public_der(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def parse_keystore(data: bytes, password: bytes | None, name: str = "keystore") -> Keystore:
    """Decode PKCS#12 ``data`` with ``password``; raises KeystoreError with a one-line reason."""
    try:
        p12 = pkcs12.load_pkcs12(data, password)
    except ValueError:
        raise WrongPassword(f"{name}: wrong password or not a valid PKCS#12 keystore") from None
    except Exception as exc:  # noqa: BLE001 - unsupported algorithms surface as various types
        raise KeystoreError(f"{name}: cannot read keystore ({exc.__class__.__name__})") from None
    if p12.key is None:
        raise KeystoreError(f"{name}: keystore holds no private key")
    certs = [c.certificate for c in p12.additional_certs]
    leaf = p12.cert.certificate if p12.cert is not None else None
    key_der = _public_der(p12.key.public_key())
    if leaf is None or _public_der(leaf.public_key()) != key_der:
        pool = certs + ([leaf] if leaf is not None else [])
        leaf = next((c for c in pool if _public_der(c.public_key()) == key_der), None)
        if leaf is None:
            raise KeystoreError(f"{name}: keystore has no certificate matching its private key")
    return Keystore(key=p12.key, cert=leaf, chain=order_chain(leaf, certs))  # type: ignore[arg-type]


def looks_like_pkcs12(data: bytes) -> bool:
    """Whether ``data`` is one DER SEQUENCE spanning the whole file, as a PKCS#12 PFX is.

    Lets a wrong file be called what it is, instead of "wrong password" or a password prompt.
    """
    if len(data) < 4 or data[0] != 0x30:
        return False
    first = data[1]
    if first < 0x80:
        return 2 + first == len(data)
    n = first & 0x7F
    if not 1 <= n <= 4 or len(data) < 2 + n:
        return False
    return 2 + n + int.from_bytes(data[2:2 + n], "big") == len(data)


def open_keystore(data: bytes, name: str, passwords: PasswordSource = NO_PASSWORD) -> Keystore:
    """Open PKCS#12 bytes: with the given password, else unprotected (no password or an empty one, as
    the original service's keystores are), else with a password obtained from ``passwords``."""
    if not looks_like_pkcs12(data):
        raise KeystoreError(f"{name}: not a PKCS#12 keystore")
    given = passwords.given()
    if given is not None:
        return parse_keystore(data, given, name)
    for candidate in (None, b""):
        try:
            return parse_keystore(data, candidate, name)
        except WrongPassword:
            continue
    return parse_keystore(data, passwords.obtain(name), name)


def load_keystore(path: str | os.PathLike[str], passwords: PasswordSource = NO_PASSWORD) -> Keystore:
    """Load a keystore file, asking ``passwords`` only when it is actually protected."""
    try:
        data = read_bytes(path)
    except PkiError as exc:
        raise KeystoreError(str(exc)) from None
    return open_keystore(data, str(path), passwords)


def keystore_bytes(store: Keystore, password: bytes | None, friendly_name: str | None = None) -> bytes:
    """Serialise to PKCS#12; protected ones use PBES2/AES-256-CBC with a SHA-256 MAC."""
    if password:
        encryption = (
            serialization.PrivateFormat.PKCS12.encryption_builder()
            .kdf_rounds(200_000)
            .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
            .hmac_hash(hashes.SHA256())
            .build(password)
        )
    else:
        encryption = serialization.NoEncryption()
    name = (friendly_name or store.uid or "msg-relay").encode()
    return pkcs12.serialize_key_and_certificates(name, store.key, store.cert, store.chain or None, encryption)


def save_keystore(path: str | os.PathLike[str], store: Keystore, password: bytes | None) -> None:
    """Write atomically with mode 0600 (a keystore holds a private key)."""
    write_atomic(path, keystore_bytes(store, password), mode=0o600)
