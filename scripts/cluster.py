"""``make run-cluster``: two relay nodes (ports 7777 and 7778) on one PostgreSQL database.

Uses the demo PKI of ``make pki``: node A is ``certs/MSG_SERVER.p12``; node B gets a certificate of its
own (UID ``MSG_SERVER``, CN ``node-b``), issued once. The database named by ``PG_DSN`` (default
``postgresql://postgres@127.0.0.1:5432/msg_relay``) is created if the server does not have it yet.
Ctrl-C stops both nodes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/msg_relay"


async def ensure_database(dsn: str) -> None:
    """CREATE DATABASE for the DSN's database unless it exists (connecting to the server's ``postgres``)."""
    import asyncpg

    parts = urlsplit(dsn)
    name = parts.path.lstrip("/")
    if not name or not name.replace("_", "").isalnum():
        raise SystemExit(f"run-cluster: PG_DSN must name a database of letters, digits and _: {dsn}")
    admin = await asyncpg.connect(urlunsplit(parts._replace(path="/postgres")))
    try:
        if not await admin.fetchval("SELECT 1 FROM pg_database WHERE datname=$1", name):
            await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()


def node_b_keystore(certs: Path) -> Path:
    out = certs / "MSG_SERVER-node-b.p12"
    if not out.exists():
        subprocess.run([str(BIN / "msg-pki"), "issue", "--ca-dir", str(certs / "ca"), "--uid", "MSG_SERVER", "--server",
                        "--cn", "node-b", "--dns", "localhost", "--ip", "127.0.0.1", "--out", str(out)], check=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--certs", default=str(ROOT / "certs"))
    parser.add_argument("--ports", default="7777,7778")
    args = parser.parse_args()
    certs = Path(args.certs)
    dsn = os.environ.get("PG_DSN") or DEFAULT_DSN
    try:
        asyncio.run(ensure_database(dsn))
    except (OSError, ImportError) as exc:
        print(f"run-cluster: cannot reach PostgreSQL at {urlsplit(dsn).netloc} ({exc})", file=sys.stderr)
        return 2
    keystores = [certs / "MSG_SERVER.p12", node_b_keystore(certs)]
    nodes = []
    for port, p12 in zip(args.ports.split(","), keystores, strict=True):
        nodes.append(subprocess.Popen([str(BIN / "msg-server"), "--p12", str(p12), "--crl", str(certs / "ca" / "crl.pem"),
                                       "--users-dir", str(certs), "--port", port, "--db", dsn]))
    print(f"run-cluster: nodes on ports {args.ports} sharing {urlsplit(dsn).path.lstrip('/')}; "
          f"clients: msg-client --server 127.0.0.1:{args.ports.replace(',', ',127.0.0.1:')} ...", file=sys.stderr)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops the nodes too, like Ctrl-C
    try:
        while all(n.poll() is None for n in nodes):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the nodes' shutdown short
            signal.signal(sig, signal.SIG_IGN)
        for n in nodes:
            if n.poll() is None:
                n.send_signal(signal.SIGTERM)
        codes = [n.wait(30) for n in nodes]
    return max(codes) if any(codes) else 0


if __name__ == "__main__":
    sys.exit(main())
