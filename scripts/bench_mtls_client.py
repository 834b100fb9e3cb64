"""The least a one-shot ``msg-client`` command must do, as a reference for ``--only cli``.

Load the PKCS#12 keystore, make a TLS 1.3 context with our key and the CA, connect with both
certificates, ask ``hello`` once and exit: no CRL, no certificate policy, no state directory, no
command. What a real command costs beyond this is the project's own work.

    python scripts/bench_mtls_client.py KEYSTORE.p12 PORT
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
import sys

from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, pkcs12


def main(p12: str, port: int) -> None:
    with open(p12, "rb") as fh:
        key, cert, extra = pkcs12.load_key_and_certificates(fh.read(), None)
    assert key is not None and cert is not None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata="".join(c.public_bytes(Encoding.PEM).decode() for c in extra))
    fd = os.memfd_create("bench-key", os.MFD_CLOEXEC)  # as pki.tls hands key material to OpenSSL
    try:
        os.write(fd, key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
                 + cert.public_bytes(Encoding.PEM))
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
    raw = socket.create_connection(("127.0.0.1", port))
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with ctx.wrap_socket(raw) as tls:
        body = b'{"v":1,"id":1,"op":"hello"}'
        tls.sendall(struct.pack(">I", len(body)) + body)
        answer = b""
        while len(answer) < 4 or len(answer) < 4 + struct.unpack(">I", answer[:4])[0]:
            chunk = tls.recv(65536)
            if not chunk:
                raise SystemExit("the relay closed the connection")
            answer += chunk
    if b'"ok":true' not in answer:
        raise SystemExit(f"hello refused: {answer[4:]!r}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
