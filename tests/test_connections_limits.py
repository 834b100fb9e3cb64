"""Issue 13, connections that cost little: the open-file limit a relay of 10 000 connections needs.

Each test runs ``msg-server`` as a child process with its own RLIMIT_NOFILE (set before it starts), so
the limits of the test process itself are never lowered.
"""

from __future__ import annotations

import asyncio
import json
import resource
import select
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pki.keystore import load_keystore
from pki.tls import client_context
from protocol.frames import decode_payload, encode_frame
from server.limits import FD_RESERVE, ConnectionLimitError, connection_capacity

from .harness import ROOT

DEADLINE = 60.0


def relay_args(demo_dir: Path, tmp: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "server.cli", "--p12", str(demo_dir / "MSG_SERVER.p12"), "--crl",
            str(demo_dir / "ca" / "crl.pem"), "--host", "127.0.0.1", "--port", "0", "--db", str(tmp / "relay.db"),
            "--log-file", str(tmp / "audit.log"), *extra]


def with_open_files(soft: int, hard: int) -> Callable[[], None]:
    """A preexec_fn: the child starts with this RLIMIT_NOFILE, as a shell with ``ulimit -n`` would start it."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return limit


class Exited(Exception):
    """The relay exited instead of listening: (exit code, what it wrote on stderr)."""


def start(args: list[str], soft: int, hard: int) -> tuple[subprocess.Popen[str], int]:
    """The relay started with that limit; (process, port) once it listens, Exited if it exits first."""
    proc = subprocess.Popen(args, cwd=ROOT, stderr=subprocess.PIPE, text=True, preexec_fn=with_open_files(soft, hard))
    assert proc.stderr is not None
    end = time.monotonic() + DEADLINE
    seen = []
    while time.monotonic() < end:
        ready, _, _ = select.select([proc.stderr], [], [], end - time.monotonic())
        if not ready:
            break
        line = proc.stderr.readline()
        if not line:
            raise Exited(proc.wait(DEADLINE), "".join(seen))
        seen.append(line)
        if "listening on" in line:
            return proc, int(line.rsplit(":", 1)[1])
    proc.kill()
    raise AssertionError(f"the relay did not start within {DEADLINE} s: {''.join(seen)}")


def stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def audit(tmp: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp / "audit.log").read_text().splitlines()]


def hard_limit_allows(n: int) -> bool:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return hard == resource.RLIM_INFINITY or hard >= n


def test_a_max_connections_the_open_file_limit_cannot_hold_refuses_to_start(demo_dir, tmp_path):
    """1000 connections need 1000 + FD_RESERVE descriptors; under a hard limit of 200 the relay says so and
    how to fix it, before it listens, instead of failing accept() with EMFILE once clients come."""
    with pytest.raises(Exited) as exited:
        proc, _ = start(relay_args(demo_dir, tmp_path, "--max-connections", "1000"), 200, 200)
        stop(proc)
    code, err = exited.value.args
    assert code == 2, err
    assert (f"msg-server: error: --max-connections: 1000 connections need {1000 + FD_RESERVE} open files "
            f"({FD_RESERVE} for the relay's own), but this process may open 200 (hard limit 200): raise the hard "
            "limit (ulimit -Hn, LimitNOFILE= in a systemd unit) or give a lower --max-connections") in err


@pytest.mark.skipif(not hard_limit_allows(4096), reason="needs a hard open-file limit of at least 4096")
def test_the_relay_raises_its_soft_open_file_limit_to_the_hard_limit(demo_dir, tmp_path):
    """Started with ``ulimit -Sn 256`` under a hard limit of 4096, the relay can hold 2000 connections:
    it raised its soft limit itself (without that, it would refuse to start)."""
    proc, _ = start(relay_args(demo_dir, tmp_path, "--max-connections", "2000"), 256, 4096)
    try:
        limits = Path(f"/proc/{proc.pid}/limits").read_text().splitlines()
        assert [line.split()[3:5] for line in limits if line.startswith("Max open files")] == [["4096", "4096"]]
        started = [e for e in audit(tmp_path) if e["event"] == "server_started"]
        assert started and (started[0]["max_connections"], started[0]["open_files"]) == (2000, 4096)
        assert not any(e["event"] == "connection_limit_lowered" for e in audit(tmp_path))
    finally:
        stop(proc)


def test_the_default_max_connections_is_lowered_to_what_the_limit_holds_and_enforced(demo_dir, tmp_path):
    """Nobody asked for the default 10 000: under a hard limit of FD_RESERVE + 3 the relay starts, says it
    holds at most 3 connections, and does: a fourth makes it close the oldest idle one (relay full)."""
    limit = FD_RESERVE + 3
    proc, port = start(relay_args(demo_dir, tmp_path, "--max-per-user", "20"), limit, limit)
    alice = load_keystore(demo_dir / "MSG_CLI1.p12")
    ctx = client_context(alice, alice.ca_certificates())

    async def hold(n: int) -> list[asyncio.StreamWriter]:
        writers = []
        for i in range(n):
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=ctx), DEADLINE)
            writer.write(encode_frame({"v": 1, "id": i, "op": "hello"}))
            head = await asyncio.wait_for(reader.readexactly(4), DEADLINE)
            assert decode_payload(await reader.readexactly(int.from_bytes(head, "big")))["ok"]
            writers.append(writer)
        return writers

    async def scenario() -> None:
        writers = await hold(4)
        end = time.monotonic() + DEADLINE
        while not any("relay full" in e.get("reason", "") for e in audit(tmp_path)):
            assert time.monotonic() < end, "the relay held a fourth connection beside three"
            await asyncio.sleep(0.05)
        for writer in writers:
            writer.close()

    try:
        lowered = [e for e in audit(tmp_path) if e["event"] == "connection_limit_lowered"]
        assert lowered and lowered[0]["reason"].startswith("holding at most 3 connections: 10000 connections need")
        started = [e for e in audit(tmp_path) if e["event"] == "server_started"]
        assert started and started[0]["max_connections"] == 3
        asyncio.run(scenario())
    finally:
        stop(proc)


def test_capacity_without_room_for_one_connection_is_refused_even_by_default(monkeypatch):
    """A limit that cannot hold even one connection beside the relay's own descriptors is no default to
    lower to: refused like an explicit --max-connections."""
    monkeypatch.setattr(resource, "getrlimit", lambda which: (FD_RESERVE, FD_RESERVE))
    with pytest.raises(ConnectionLimitError, match="may open 128"):
        connection_capacity(10_000, strict=False)
    monkeypatch.setattr(resource, "getrlimit", lambda which: (FD_RESERVE + 1, FD_RESERVE + 1))
    assert connection_capacity(10_000, strict=False).connections == 1


def test_max_connections_of_ten_thousand_and_more_are_accepted_by_the_cli():
    """No upper bound on the option: only the open-file limit decides (checked at start)."""
    from server.cli import _refusal, build_parser

    base = ["--no-crl"]
    assert _refusal(build_parser().parse_args([*base, "--max-connections", "20000"])) is None
    assert _refusal(build_parser().parse_args(base)) is None
    assert "at least 1" in (_refusal(build_parser().parse_args([*base, "--max-connections", "0"])) or "")
