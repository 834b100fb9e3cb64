"""``msg-server``: run the relay until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import Sequence

from pki.errors import MsgRelayError
from pki.passwords import PasswordSource

from .app import RelayServer
from .config import DEFAULT_PORT, ServerConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="msg-server", description="MSG Relay server (mutual TLS 1.3).")
    d = ServerConfig()
    p.add_argument("--p12", default=d.p12, help=f"server keystore (default {d.p12})")
    p.add_argument("--password-file", help="keystore password file (or MSG_RELAY_PASSWORD)")
    p.add_argument("--ca", help="trust anchor, PEM (default: the CA certificate bundled in the keystore)")
    p.add_argument("--crl", help="the CA's CRL file, enforced on every client certificate")
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--db", default=d.db, help=f"SQLite database (default {d.db})")
    p.add_argument("--log-file", help="audit log file (JSON lines; default stderr)")
    p.add_argument("--users-dir", help="enroll the users whose certificates or keystores lie here")
    p.add_argument("--max-connections", type=int, default=d.max_connections)
    p.add_argument("--max-handshakes", type=int, default=d.max_handshakes,
                   help="connections allowed in the TLS handshake at once; the oldest is dropped beyond")
    p.add_argument("--max-per-user", type=int, default=d.max_per_user)
    p.add_argument("--max-frame", type=int, default=d.max_frame)
    p.add_argument("--idle-timeout", type=float, default=d.idle_timeout)
    p.add_argument("--handshake-timeout", type=float, default=d.handshake_timeout)
    p.add_argument("--frame-timeout", type=float, default=d.frame_timeout,
                   help="seconds within which a started frame must be complete")
    p.add_argument("--verbose", "-v", action="store_true")
    return p


async def serve(config: ServerConfig) -> None:
    server = RelayServer(config)
    await server.start()
    print(f"msg-server: listening on {config.host}:{server.port}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload_crl)
    await stop.wait()
    print("msg-server: shutting down", file=sys.stderr, flush=True)
    await server.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not 0 <= args.port <= 65535 or min(args.max_connections, args.max_handshakes, args.max_per_user) < 1 \
            or args.max_frame < 1024:
        print("msg-server: error: --port 0-65535, connection limits >= 1, --max-frame >= 1024", file=sys.stderr)
        return 2
    config = ServerConfig(p12=args.p12, passwords=PasswordSource(file=args.password_file), ca=args.ca,
                          crl=args.crl, host=args.host, port=args.port, db=args.db, log_file=args.log_file,
                          users_dir=args.users_dir, max_connections=args.max_connections,
                          max_handshakes=args.max_handshakes, max_per_user=args.max_per_user,
                          max_frame=args.max_frame, idle_timeout=args.idle_timeout, frame_timeout=args.frame_timeout,
                          handshake_timeout=args.handshake_timeout)
    try:
        asyncio.run(serve(config))
    except MsgRelayError as exc:
        print(f"msg-server: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"msg-server: error: cannot listen on {config.host}:{config.port} ({exc.strerror or exc})",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
