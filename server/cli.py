"""``msg-server``: run the relay until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Sequence

from pki.errors import MsgRelayError
from pki.passwords import PasswordSource
from protocol.frames import MAX_FRAME_LIMIT, MIN_FRAME_LIMIT

from .app import RelayServer
from .audit import AuditLog
from .config import DEFAULT_PORT, ServerConfig
from .quota import QuotaConfig
from .store import migrate

NO_CRL_WARNING = "msg-server: warning: --no-crl: revoked client certificates will be accepted"


def build_parser() -> argparse.ArgumentParser:
    """Every option's help names its default, so ``--help`` alone tells how the relay will run."""
    p = argparse.ArgumentParser(prog="msg-server", description="MSG Relay server (mutual TLS 1.3).")
    d = ServerConfig()
    p.add_argument("--p12", default=d.p12, help="server keystore (default: %(default)s)")
    p.add_argument("--password-file",
                   help="keystore password file (default: MSG_RELAY_PASSWORD, else a prompt if the keystore "
                        "has a password)")
    p.add_argument("--ca", help="trust anchor, PEM (default: the CA certificate bundled in the keystore)")
    crl = p.add_mutually_exclusive_group()
    crl.add_argument("--crl", default=d.crl,
                     help="the CA's CRL file, enforced on every client certificate and re-read when it changes "
                          "(default: %(default)s)")
    crl.add_argument("--no-crl", action="store_true",
                     help="run without revocation checks, with a warning (default: off, a CRL is required)")
    p.add_argument("--crl-warn-days", type=float, default=d.crl_warn_days,
                   help="warn this many days before the CRL expires (default: %(default)s)")
    p.add_argument("--host", default=d.host, help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to listen on (default: %(default)s)")
    p.add_argument("--db", default=d.db, help="SQLite database file, or postgresql://USER@HOST:PORT/DB for a "
                   "database several relay nodes share (default: %(default)s)")
    p.add_argument("--migrate-only", action="store_true",
                   help="bring the database's schema up to date, print its version and exit (default: off)")
    p.add_argument("--log-file", help="audit log file, JSON lines (default: stderr)")
    p.add_argument("--users-dir",
                   help="enroll the users whose certificates or keystores lie in this directory (default: none; "
                        "users are known once they connect)")
    p.add_argument("--max-connections", type=int, default=None,
                   help=f"connections at once; the relay raises its open-file limit to the hard limit and refuses "
                        f"to start if that cannot hold them (default: {d.max_connections}, or as many as the "
                        f"open-file limit holds, with a warning)")
    p.add_argument("--max-handshakes", type=int, default=d.max_handshakes,
                   help="connections allowed in the TLS handshake at once; the oldest is dropped beyond "
                        "(default: %(default)s)")
    p.add_argument("--max-per-user", type=int, default=d.max_per_user,
                   help="connections at once per user (default: %(default)s)")
    p.add_argument("--max-frame", type=int, default=d.max_frame,
                   help=f"largest frame in bytes, {MIN_FRAME_LIMIT}-{MAX_FRAME_LIMIT} (default: %(default)s)")
    p.add_argument("--idle-timeout", type=float, default=d.idle_timeout,
                   help="seconds before an idle connection is closed (default: %(default)s)")
    p.add_argument("--handshake-timeout", type=float, default=d.handshake_timeout,
                   help="seconds allowed for the TLS handshake (default: %(default)s)")
    p.add_argument("--frame-timeout", type=float, default=d.frame_timeout,
                   help="seconds within which a started frame must be complete (default: %(default)s)")
    q = d.quota
    p.add_argument("--max-sends-per-minute", type=int, default=q.sends_per_minute,
                   help="messages one user may send a minute (default: %(default)s)")
    p.add_argument("--max-unread", type=int, default=q.max_unread,
                   help="unread messages one queue may hold (default: %(default)s)")
    p.add_argument("--max-unread-bytes", type=int, default=q.max_unread_bytes,
                   help="bytes of unread ciphertext one queue may hold (default: %(default)s)")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging (default: off)")
    return p


def _refusal(args: argparse.Namespace) -> str | None:
    """The one line that says why these options cannot run, checked before anything is opened."""
    if not 0 <= args.port <= 65535:
        return f"--port must be 0-65535, not {args.port}"
    if args.max_connections is not None and args.max_connections < 1 or min(args.max_handshakes,
                                                                           args.max_per_user) < 1:
        return "--max-connections, --max-handshakes and --max-per-user must be at least 1"
    if min(args.max_sends_per_minute, args.max_unread, args.max_unread_bytes) < 1:
        return "--max-sends-per-minute, --max-unread and --max-unread-bytes must be at least 1"
    if not MIN_FRAME_LIMIT <= args.max_frame <= MAX_FRAME_LIMIT:
        return f"--max-frame must be between {MIN_FRAME_LIMIT} and {MAX_FRAME_LIMIT} bytes, not {args.max_frame}"
    if not args.no_crl and not Path(args.crl).is_file():
        return f"CRL file {args.crl} not found: give --crl FILE, or --no-crl to run without revocation checks"
    if args.users_dir is not None and not Path(args.users_dir).is_dir():
        return f"--users-dir {args.users_dir}: no such directory"
    return None


async def serve(config: ServerConfig, audit: AuditLog | None = None) -> None:
    server = RelayServer(config, audit)
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
    """Run the relay; a setting it cannot use is one ``msg-server: error:`` line and exit code 2."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.migrate_only:
        try:
            version = asyncio.run(migrate(args.db))
        except MsgRelayError as exc:
            print(f"msg-server: error: {exc}", file=sys.stderr)
            return 2
        print(f"msg-server: {args.db}: schema version {version}")
        return 0
    refusal = _refusal(args)
    if refusal is not None:
        print(f"msg-server: error: {refusal}", file=sys.stderr)
        return 2
    if args.no_crl:
        print(NO_CRL_WARNING, file=sys.stderr)
    # Opened here, before the server and its socket, so a log file it cannot write is named as such.
    try:
        audit = AuditLog(args.log_file)
    except OSError as exc:
        print(f"msg-server: error: cannot open log file {args.log_file} ({exc.strerror or exc})", file=sys.stderr)
        return 2
    try:
        return _serve(args, audit)
    finally:
        audit.close()


def _serve(args: argparse.Namespace, audit: AuditLog) -> int:
    config = ServerConfig(p12=args.p12, passwords=PasswordSource(file=args.password_file), ca=args.ca,
                          crl=None if args.no_crl else args.crl, no_crl=args.no_crl,
                          crl_warn_days=args.crl_warn_days,
                          host=args.host, port=args.port, db=args.db, log_file=args.log_file,
                          users_dir=args.users_dir,
                          max_connections=ServerConfig.max_connections if args.max_connections is None
                          else args.max_connections,
                          strict_max_connections=args.max_connections is not None,
                          max_handshakes=args.max_handshakes, max_per_user=args.max_per_user,
                          max_frame=args.max_frame, idle_timeout=args.idle_timeout, frame_timeout=args.frame_timeout,
                          handshake_timeout=args.handshake_timeout,
                          quota=QuotaConfig(args.max_sends_per_minute, args.max_unread, args.max_unread_bytes))
    try:
        asyncio.run(serve(config, audit))
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
