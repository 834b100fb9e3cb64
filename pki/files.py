"""Reading and writing PKI files safely.

Writes go to a temporary file in the destination folder and are renamed into place, so a failure
never leaves a half-written keystore or CRL. Reads sniff the content (PEM, DER, PKCS#12) instead of
trusting the file extension.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography import x509

from .errors import PkiError

# Certificates, CRLs and keystores are small; refusing large files keeps a typo from reading a disk image.
MAX_PKI_FILE = 1 << 20


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    """The file's bytes, or a one-line :class:`PkiError`."""
    p = Path(path)
    try:
        if p.stat().st_size > MAX_PKI_FILE:
            raise PkiError(f"{p}: file too large to be a certificate, CRL or keystore")
        return p.read_bytes()
    except FileNotFoundError:
        raise PkiError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise PkiError(f"{p}: is a directory, expected a file") from None
    except PermissionError:
        raise PkiError(f"{p}: permission denied") from None
    except OSError as exc:
        raise PkiError(f"{p}: cannot read ({exc.strerror})") from None


def write_atomic(path: str | os.PathLike[str], data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` all or nothing, with ``mode`` set before any byte is written."""
    import tempfile  # here, not at the top: it brings shutil, bz2 and lzma, which reading needs none of

    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=parent)
    except FileNotFoundError:
        raise PkiError(f"{parent}: no such directory") from None
    except PermissionError:
        raise PkiError(f"{parent}: permission denied, cannot write {p.name}") from None
    except OSError as exc:
        raise PkiError(f"{parent}: cannot write ({exc.strerror})") from None
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError):
            raise PkiError(f"{p}: cannot write ({exc.strerror})") from None
        raise


def is_pem(data: bytes) -> bool:
    return b"-----BEGIN " in data[:4096]


def load_certificates(data: bytes) -> list[x509.Certificate]:
    """All certificates in PEM or DER ``data`` (empty list when there are none)."""
    try:
        if is_pem(data):
            return x509.load_pem_x509_certificates(data) if b"CERTIFICATE-----" in data else []
        return [x509.load_der_x509_certificate(data)]
    except ValueError:
        return []


def load_certificate_file(path: str | os.PathLike[str]) -> list[x509.Certificate]:
    """Certificates from a PEM/DER file; a file without any is an error."""
    certs = load_certificates(read_bytes(path))
    if not certs:
        raise PkiError(f"{path}: no certificate found (expected PEM or DER)")
    return certs


def load_crls(data: bytes) -> list[x509.CertificateRevocationList]:
    """All CRLs in PEM or DER ``data``."""
    try:
        if is_pem(data):
            marker = b"-----BEGIN X509 CRL-----"
            chunks = [marker + c for c in data.split(marker)[1:]]
            return [x509.load_pem_x509_crl(c) for c in chunks]
        return [x509.load_der_x509_crl(data)]
    except ValueError:
        return []


def load_crl_file(path: str | os.PathLike[str]) -> list[x509.CertificateRevocationList]:
    crls = load_crls(read_bytes(path))
    if not crls:
        raise PkiError(f"{path}: no CRL found (expected PEM or DER)")
    return crls


def certs_to_pem(certs: list[x509.Certificate]) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding

    return b"".join(c.public_bytes(Encoding.PEM) for c in certs)
