"""Stdlib ``ssl`` contexts for the relay: one place for the TLS rules of both ends.

TLS 1.3 only, a certificate required from both peers, the organisation's root as the only trust
anchor, and the CA's CRL enforced when one is configured. Which UID the peer has, and whether its
certificate fits the profile, is checked after the handshake with :func:`pki.validation.check_profile`
(the course server certificate has no SAN, so hostname checking cannot be the rule).
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .errors import PkiError
from .files import certs_to_pem
from .keystore import Keystore
from .validation import crl_covers_anchors


def _through_private_file(data: bytes, load: Callable[[str], object]) -> None:
    """Hand ``data`` to an ``ssl`` loader that only reads files.

    On Linux the file is an anonymous memory file (``memfd``: never on a disk, no name in any directory,
    gone when closed), read through ``/proc/self/fd``. Elsewhere it is 0600 in a private 0700 directory
    and removed as soon as OpenSSL has read it (``tempfile`` and ``shutil`` are imported only then).
    """
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fd = os.memfd_create("msg-relay-material", os.MFD_CLOEXEC)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            load(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    import shutil
    import tempfile

    private_dir = tempfile.mkdtemp(prefix="msg-relay-")
    try:
        path = os.path.join(private_dir, "material.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        load(path)
    finally:
        shutil.rmtree(private_dir, ignore_errors=True)


def load_identity(ctx: ssl.SSLContext, store: Keystore) -> None:
    """Load a keystore's key and chain into ``ctx`` (Python 3.11's ``load_cert_chain`` needs a file)."""
    key_pem = store.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())
    _through_private_file(key_pem + certs_to_pem([store.cert, *store.intermediates()]), ctx.load_cert_chain)


def _base(protocol: int, store: Keystore, anchors: Sequence[x509.Certificate],
          crls: Sequence[x509.CertificateRevocationList],
          intermediates: Sequence[x509.Certificate] = ()) -> ssl.SSLContext:
    try:
        return _build(protocol, store, anchors, crls, intermediates)
    except ssl.SSLError as exc:
        raise PkiError(f"cannot set up TLS with this keystore and CA ({exc.reason or exc})") from None


def _build(protocol: int, store: Keystore, anchors: Sequence[x509.Certificate],
           crls: Sequence[x509.CertificateRevocationList],
           intermediates: Sequence[x509.Certificate] = ()) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    # Only a self-signed root may end a chain. Python 3.13's create_default_context() turns partial
    # chains on; say here that ours never does, since the store below also holds intermediates.
    ctx.verify_flags &= ~ssl.VERIFY_X509_PARTIAL_CHAIN
    ctx.load_verify_locations(cadata=certs_to_pem(list(anchors)).decode("ascii"))
    if intermediates:
        ctx.load_verify_locations(cadata=certs_to_pem(list(intermediates)).decode("ascii"))
    if crls:
        # cadata takes certificates only; CRLs must come from a file.
        _through_private_file(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in crls),
                              lambda path: ctx.load_verify_locations(cafile=path))
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        if crl_covers_anchors(anchors, crls):
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_CHAIN
    load_identity(ctx, store)
    return ctx


def server_context(store: Keystore, anchors: Sequence[x509.Certificate],
                   crls: Sequence[x509.CertificateRevocationList] = ()) -> ssl.SSLContext:
    """The relay's context; it also completes the chain of a client that sends only its leaf.

    Many TLS clients send just their leaf. The relay's own intermediates go into the verify store
    beside the anchors, so OpenSSL finds the missing links itself (the ``--ca`` bundle's
    intermediates are already there: the bundle is loaded whole). The leaf is then validated like
    one sent with its chain: up to the self-signed root, with the CRL of every CA on the way.
    """
    ctx = _base(ssl.PROTOCOL_TLS_SERVER, store, anchors, crls, store.intermediates())
    # No session tickets: every connection presents and is checked with its certificate (and the CRL).
    ctx.num_tickets = 0
    return ctx


def client_context(store: Keystore, anchors: Sequence[x509.Certificate],
                   crls: Sequence[x509.CertificateRevocationList] = ()) -> ssl.SSLContext:
    ctx = _base(ssl.PROTOCOL_TLS_CLIENT, store, anchors, crls)
    ctx.check_hostname = False  # replaced by the MSG_SERVER UID check after the handshake
    return ctx


def peer_certificate(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> x509.Certificate | None:
    der = ssl_object.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der) if der else None
