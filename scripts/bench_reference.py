#!/usr/bin/env python3
"""The benchmark's reference server: asyncio + stdlib ``ssl`` with the relay's own TLS settings and
certificates, doing nothing but the handshake and echoing frames back. It is the floor of what
Python's TLS can do on this machine, against which ``bench.py`` reports the relay's figures.

``--crl`` gives it the CA's CRL as the relay's context has it (OpenSSL then checks revocation in every
handshake, about a fifth of a handshake's CPU): the CPU-per-connection row compares against that."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pki.files import load_crl_file  # noqa: E402
from pki.keystore import load_keystore  # noqa: E402
from pki.tls import server_context  # noqa: E402
from protocol.frames import HEADER  # noqa: E402


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readexactly(HEADER.size)
            (n,) = HEADER.unpack(head)
            writer.write(head + await reader.readexactly(n))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--p12", required=True)
    p.add_argument("--crl", help="the CA's CRL file: OpenSSL then checks revocation in every handshake, as the "
                                 "relay's TLS context does (default: no CRL)")
    args = p.parse_args()
    store = load_keystore(args.p12)
    ctx = server_context(store, store.ca_certificates(), load_crl_file(args.crl) if args.crl else ())
    server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=ctx, backlog=1024)
    print(f"listening on 127.0.0.1:{server.sockets[0].getsockname()[1]}", file=sys.stderr, flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
