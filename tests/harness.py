"""A real relay on 127.0.0.1 (port 0) in a background thread, and helpers to drive the CLI."""

from __future__ import annotations

import asyncio
import io
import signal
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from client.cli import main as client_main
from pki.tls import client_context
from protocol.frames import FrameDecoder, decode_payload
from server.app import RelayServer
from server.audit import AuditLog
from server.config import ServerConfig

ROOT = Path(__file__).resolve().parent.parent


class ServerThread:
    """Runs a RelayServer on its own event loop; ``stop()`` closes it gracefully."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = replace(config, host="127.0.0.1", port=0)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: RelayServer | None = None

    def start(self) -> "ServerThread":
        self.thread.start()
        self.server = self.call(self._create())
        return self

    async def _create(self) -> RelayServer:
        server = RelayServer(self.config, AuditLog(self.config.log_file))
        await server.start()
        return server

    def call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.port

    async def until(self, condition: Callable[[RelayServer], bool], what: str, timeout: float = 20) -> None:
        """From another event loop: wait until ``condition(server)`` holds, evaluated on the relay's own
        loop (so it sees a consistent state). ``timeout`` only matters when the relay never gets there."""
        assert self.server is not None
        server = self.server

        async def check() -> bool:
            return condition(server)

        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while not await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(check(), self.loop)):
            if loop.time() > end:
                raise AssertionError(f"the relay did not reach this state within {timeout} s: {what}")
            await asyncio.sleep(0.01)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        if self.server is not None:
            self.call(self.server.close(grace=5))
            self.server = None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


async def raw_session(port: int, store: Any, payload: bytes, *, until: Any = None, count: int | None = None,
                      deadline: float = 20) -> list[dict]:
    """Send raw bytes on an authenticated connection; return the relay's answers, decoded.

    Reads until the answer with id ``until`` is in, or ``count`` answers are, or the relay closes the
    connection (with neither given: until it closes). ``deadline`` (seconds) only matters when the relay
    does none of these: the test then fails, showing what had arrived.
    """
    ctx = client_context(store, store.ca_certificates())
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=ctx), deadline)
    dec, out = FrameDecoder(), []

    def complete() -> bool:
        return ((count is not None and len(out) >= count)
                or (until is not None and any(r.get("id") == until for r in out)))

    try:
        try:
            writer.write(payload)
            await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass  # the relay closed early (it refuses an oversize frame at once): read what it answered
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline
        while not complete():
            try:
                data = await asyncio.wait_for(reader.read(65536), end - loop.time())
            except (ConnectionError, ssl.SSLError):
                break
            except asyncio.TimeoutError:
                raise AssertionError(f"the relay neither finished answering nor closed within {deadline} s; "
                                     f"answers so far: {out!r}") from None
            if not data:
                break
            out += [decode_payload(p) for p in dec.feed(data)]
    finally:
        writer.close()
    return out


def server_config(demo_dir: Path, tmp: Path, **kw: Any) -> ServerConfig:
    base = dict(p12=str(demo_dir / "MSG_SERVER.p12"), crl=str(demo_dir / "ca" / "crl.pem"),
                users_dir=str(demo_dir), db=str(tmp / "relay.db"), log_file=str(tmp / "audit.log"))
    base.update(kw)
    return ServerConfig(**base)


@dataclass
class Result:
    code: int
    out: str
    err: str
    out_bytes: bytes


class _Stdin:
    def __init__(self, data: bytes) -> None:
        self.buffer = io.BytesIO(data)

    def isatty(self) -> bool:
        return False


def run_client(server: ServerThread | str, keystore: Path, *args: str, stdin: bytes = b"",
               state: Path | None = None, extra: Sequence[str] = ()) -> Result:
    """msg-client in-process, with stdin/stdout/stderr captured."""
    address = server if isinstance(server, str) else server.address
    argv = ["--server", address, "--p12", str(keystore)]
    if state is not None:
        argv += ["--state-dir", str(state)]
    argv += [*extra, *args]
    out, err = io.BytesIO(), io.StringIO()
    old = sys.stdin, sys.stdout, sys.stderr
    stdout = io.TextIOWrapper(out, encoding="utf-8", write_through=True)
    sys.stdin, sys.stdout, sys.stderr = _Stdin(stdin), stdout, err  # type: ignore[assignment]
    try:
        code = client_main(argv)
    finally:
        sys.stdin, sys.stdout, sys.stderr = old
    raw = out.getvalue()
    return Result(code, raw.decode("utf-8", "replace"), err.getvalue(), raw)


def private_pki(directory: Path, uids: Sequence[str] = (), key_type: str = "ecdsa-p256") -> Any:
    """A CA of the test's own (one it may revoke in) in ``directory/ca``, the relay's keystore
    ``MSG_SERVER.p12`` and one unprotected keystore per UID beside it."""
    from pki.ca import CertificateAuthority
    from pki.keystore import save_keystore

    ca = CertificateAuthority.init(directory / "ca", key_type=key_type)
    save_keystore(directory / "MSG_SERVER.p12", ca.issue("MSG_SERVER", server=True, key_type=key_type), None)
    for uid in uids:
        save_keystore(directory / f"{uid}.p12", ca.issue(uid, key_type=key_type), None)
    return ca


def private_relay(directory: Path, *, crl: bool = True, enroll: bool = True, **kw: Any) -> ServerThread:
    """A relay for :func:`private_pki`'s CA, with its CRL unless ``crl=False`` (a relay with a stale CRL)."""
    cfg = server_config(directory, directory, p12=str(directory / "MSG_SERVER.p12"),
                        crl=str(directory / "ca" / "crl.pem") if crl else None, no_crl=not crl,
                        users_dir=str(directory) if enroll else None, **kw)
    return ServerThread(cfg).start()


def private_client(server: ServerThread, directory: Path, uid: str, *args: str, stdin: bytes = b"",
                   with_crl: bool = False) -> Result:
    """msg-client as ``uid`` of :func:`private_pki`, state in ``directory/st/uid``; ``with_crl`` passes
    the CA's CRL file itself (``--crl``) instead of trusting the one the relay serves."""
    extra = ["--crl", str(directory / "ca" / "crl.pem")] if with_crl else []
    return run_client(server, directory / f"{uid}.p12", *args, stdin=stdin, state=directory / "st" / uid,
                      extra=extra)


class RelayProcess:
    """``msg-server`` as a child process on 127.0.0.1, killable and restartable on the same port."""

    def __init__(self, pki_dir: Path, tmp: Path, *, p12: Path | None = None, db: str | None = None,
                 name: str = "relay") -> None:
        self.args = [sys.executable, "-m", "server.cli", "--p12", str(p12 or pki_dir / "MSG_SERVER.p12"),
                     "--crl", str(pki_dir / "ca" / "crl.pem"), "--users-dir", str(pki_dir),
                     "--host", "127.0.0.1", "--port", "0", "--db", db or str(tmp / f"{name}.db"),
                     "--log-file", str(tmp / f"audit-{name}.log"), "--max-sends-per-minute", "100000"]
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0

    def start(self) -> None:
        self.proc = subprocess.Popen(self.args, cwd=ROOT, stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()
        assert "listening on" in line, line
        self.port = int(line.rsplit(":", 1)[1])
        self.args[self.args.index("--port") + 1] = str(self.port)  # a restart comes back where clients look

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(20)

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)
