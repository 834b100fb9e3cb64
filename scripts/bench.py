#!/usr/bin/env python3
"""``make bench``: measure the relay against a reference server in the same run.

Starts the relay (``msg-server``) and a reference server (``bench_reference.py``: asyncio + stdlib
``ssl``, same certificates and TLS settings, only handshakes and echoes frames) on 127.0.0.1 with a
demo PKI in a temporary directory, then measures handshakes, durable sends, latency at a fixed load,
memory per idle connection, memory under clients that pipeline and never read, and how costs grow
with the store's size. Figures are reported as ratios to the reference because the machine is shared
and noisy. Writes bench/results.json and bench/results.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from client.connection import RelayClient  # noqa: E402
from client.keys import Keyring  # noqa: E402
from client.state import ClientState  # noqa: E402
from pki.cli import make_demo  # noqa: E402
from pki.identity import cert_fingerprint  # noqa: E402
from pki.keystore import Keystore, load_keystore  # noqa: E402
from pki.tls import client_context  # noqa: E402
from protocol.encoding import utc_now  # noqa: E402
from protocol.envelope import InnerMessage, Sealed, seal, sign_submission  # noqa: E402
from protocol.frames import FrameDecoder, decode_payload, encode_frame  # noqa: E402
from protocol.keyrecord import KeyRecord  # noqa: E402
from protocol.messages import GetRequest, SendRequest, request_to_wire  # noqa: E402

SENDER, RECIPIENT, BULK = "MSG_CLI1", "MSG_CLI2", "MSG_CLI3"


# ------------------------------------------------------------------------------------ progress
class Progress:
    """A one-line progress bar on stderr: step k of n, what runs now, time so far."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.start = total, 0, time.monotonic()

    def step(self, what: str) -> None:
        self.done += 1
        width = 30
        filled = int(width * self.done / self.total)
        bar = "#" * filled + "-" * (width - filled)
        elapsed = time.monotonic() - self.start
        sys.stderr.write(f"\r[{bar}] {self.done}/{self.total} {elapsed:5.0f}s  {what[:60]:<60}")
        sys.stderr.flush()

    def finish(self) -> None:
        sys.stderr.write("\n")


# ------------------------------------------------------------------------------------ processes
class Proc:
    """A server child process on port 0; the bound port is read from its first stderr line."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen(args, cwd=ROOT, stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()
        if "listening on" not in line:
            raise SystemExit(f"server did not start: {line}{self.proc.stderr.read()}")
        self.port = int(line.rsplit(":", 1)[1])

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def cpu_seconds(self) -> float:
        """User + system CPU time so far: a server that has stopped working has stopped using it."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_relay(certs: Path, db: Path, max_per_user: int | None = 5000) -> Proc:
    """The relay on port 0, its connection caps raised for load; ``max_per_user=None`` keeps its default."""
    args = [sys.executable, "-m", "server.cli", "--p12", str(certs / "MSG_SERVER.p12"), "--crl",
            str(certs / "ca" / "crl.pem"), "--users-dir", str(certs), "--port", "0", "--db", str(db),
            "--log-file", str(db.with_suffix(".audit.log")), "--max-connections", "5000", "--max-handshakes", "512"]
    if max_per_user is not None:
        args += ["--max-per-user", str(max_per_user)]
    return Proc(args + lifted_quotas())


def lifted_quotas() -> list[str]:
    """Per-user send and unread quotas set far above what the bench does, for the relays that have them.

    The bench sends tens of thousands of messages from one user to another within a minute: with the
    default quotas it would measure refusals, not the cost of a send. Each option is passed only if this
    relay's CLI offers it, so the bench runs on relays from before and after the quotas.
    """
    from server.cli import build_parser

    offered = build_parser().format_help()
    wanted = {"--max-sends-per-minute": 10**9, "--max-unread": 10**9, "--max-unread-bytes": 1 << 50}
    return [a for flag, v in wanted.items() if flag in offered for a in (flag, str(v))]


def start_reference(certs: Path) -> Proc:
    return Proc([sys.executable, str(ROOT / "scripts" / "bench_reference.py"), "--p12", str(certs / "MSG_SERVER.p12")])


# ------------------------------------------------------------------------------------ helpers
def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


async def rate(seconds: float, workers: int, fn: Any) -> float:
    """Run ``fn(worker_index, deadline)`` in ``workers`` tasks until the deadline (or until they run out
    of work); operations per second over the time actually taken."""
    start = time.monotonic()
    deadline = start + seconds
    total = sum(await asyncio.gather(*(fn(i, deadline) for i in range(workers))))
    return total / (time.monotonic() - start)


@dataclass
class World:
    certs: Path
    stores: dict[str, Keystore]
    record: KeyRecord
    signature: bytes
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def anchors(self) -> list:
        return self.stores[SENDER].ca_certificates()

    def client(self, port: int, uid: str = SENDER) -> RelayClient:
        return RelayClient(self.stores[uid], "127.0.0.1", port, self.anchors, timeout=60)

    def sealed(self, n: int, body: bytes = b"x" * 200) -> list[tuple[str, Sealed]]:
        out = []
        for i in range(n):
            msg_id = os.urandom(16).hex()
            inner = InnerMessage(SENDER, RECIPIENT, msg_id, utc_now(), f"bench {i}", body)
            out.append((msg_id, seal(inner, self.stores[SENDER].key, self.record)))
        return out


# ------------------------------------------------------------------------------------ 1 handshakes
async def handshakes(world: World, relay: Proc, ref: Proc, conc: int, seconds: float) -> dict[str, float]:
    ctx = client_context(world.stores[SENDER], world.anchors)
    probe = encode_frame({"v": 1, "id": 1, "op": "queue"})

    async def one(port: int, payload: bytes) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
        writer.write(payload)
        await writer.drain()
        head = await reader.readexactly(4)
        await reader.readexactly(int.from_bytes(head, "big"))
        writer.close()

    async def loop(port: int, i: int, deadline: float) -> int:
        n = 0
        while time.monotonic() < deadline:
            await one(port, probe)
            n += 1
        return n

    ours = await rate(seconds, conc, lambda i, d: loop(relay.port, i, d))
    base = await rate(seconds, conc, lambda i, d: loop(ref.port, i, d))
    return {"relay_per_s": ours, "reference_per_s": base, "ratio": ours / base}


# ------------------------------------------------------------------------------------ 2 throughput
async def sends(world: World, relay: Proc, ref: Proc, conc: int, seconds: float, window: int,
                seal_inline: bool) -> dict[str, float]:
    """Durable sends per second over persistent connections, ``window`` requests in flight each.

    Pre-sealed: every frame (envelope sealed, submission signed, JSON encoded) is made beforehand, so
    the client only writes bytes and reads answers, as it does against the reference echo: the ratio
    is the server's cost. Sealing: the client library seals and signs each message as it goes.
    """
    ctx = client_context(world.stores[SENDER], world.anchors)
    signer = world.stores[SENDER].key
    frames: list[bytes] = []
    if not seal_inline:
        for i, (mid, sealed) in enumerate(world.sealed(12000)):
            sig = sign_submission(signer, RECIPIENT, mid, sealed)
            frames.append(encode_frame(request_to_wire(
                SendRequest(i, RECIPIENT, mid, sealed.version, sealed.header, sealed.envelope, sig))))
    frame_size = len(frames[0]) if frames else 3800

    async def exchange(port: int, deadline: float, next_batch: Any, check: bool) -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
        dec, n = FrameDecoder(), 0
        while time.monotonic() < deadline:
            batch = next_batch()
            if not batch:
                break
            writer.write(b"".join(batch))
            await writer.drain()
            got: list[bytes] = []
            while len(got) < len(batch):
                got += dec.feed(await reader.read(65536))
            n += sum(1 for g in got if not check or b'"ok":true' in g)
        writer.close()
        return n

    def presealed() -> list[bytes]:
        return [frames.pop() for _ in range(min(window, len(frames)))]

    async def sealing_worker(i: int, deadline: float) -> int:
        n = 0
        async with world.client(relay.port) as c:
            while time.monotonic() < deadline:
                results = await c.pipeline([c.send_request(RECIPIENT, mid, s) for mid, s in world.sealed(window)])
                n += sum(1 for r in results if not isinstance(r, Exception))
        return n

    echo = encode_frame({"pad": "x" * (frame_size - 14)})
    if seal_inline:
        ours = await rate(seconds, conc, sealing_worker)
    else:
        ours = await rate(seconds, conc, lambda i, d: exchange(relay.port, d, presealed, True))
    base = await rate(seconds, conc, lambda i, d: exchange(ref.port, d, lambda: [echo] * window, False))
    return {"relay_per_s": ours, "reference_per_s": base, "ratio": ours / base, "frame_bytes": frame_size}


# ------------------------------------------------------------------------------------ 3 latency
async def open_loop(rate_per_s: float, seconds: float, op: Any) -> list[float]:
    """Start ``op()`` at a fixed rate whatever the answers do (an open loop, as real users are), and
    return each one's latency: queueing inside the server shows up instead of slowing the offer."""
    lat: list[float] = []

    async def timed() -> None:
        t0 = time.monotonic()
        await op()
        lat.append(time.monotonic() - t0)

    start, k, tasks = time.monotonic(), 0, []
    while time.monotonic() - start < seconds:
        due = start + k / rate_per_s
        if due > time.monotonic():
            await asyncio.sleep(due - time.monotonic())
        tasks.append(asyncio.create_task(timed()))
        k += 1
    await asyncio.gather(*tasks)
    return lat


class EchoClient:
    """Pipelined frames to the reference echo server: answers come back in order."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.waiting: list[asyncio.Future[None]] = []
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        dec = FrameDecoder()
        while True:
            for _ in dec.feed(await self.reader.read(65536)):
                self.waiting.pop(0).set_result(None)

    async def roundtrip(self, frame: bytes) -> None:
        fut = asyncio.get_running_loop().create_future()
        self.waiting.append(fut)
        self.writer.write(frame)
        await fut


def stats(lat: list[float], offered: float) -> dict[str, float]:
    return {"offered_per_s": offered, "p50_ms": percentile(lat, 50) * 1e3, "p99_ms": percentile(lat, 99) * 1e3,
            "max_ms": max(lat) * 1e3, "n": len(lat)}


async def latency(world: World, relay: Proc, ref: Proc, rate_per_s: float, seconds: float) -> dict[str, Any]:
    """p50/p99/max of ``send`` and ``get`` at a fixed offered load, and of an echo of the same size."""
    out: dict[str, Any] = {}
    async with world.client(relay.port) as sender, world.client(relay.port, RECIPIENT) as reader:
        requests = [sender.send_request(RECIPIENT, mid, s) for mid, s in world.sealed(int(rate_per_s * seconds) + 10)]
        size = len(encode_frame(request_to_wire(requests[0])))

        async def send() -> None:
            await sender.request(requests.pop())

        out["send"] = stats(await open_loop(rate_per_s, seconds, send), rate_per_s)
        stored = len(await reader.queue()) or 1

        async def get() -> None:
            await reader.request(GetRequest(reader.next_id(), random.randint(1, stored)))

        out["get"] = stats(await open_loop(rate_per_s, seconds, get), rate_per_s)
    ctx = client_context(world.stores[SENDER], world.anchors)
    echo = EchoClient(*await asyncio.open_connection("127.0.0.1", ref.port, ssl=ctx))
    frame = encode_frame({"pad": "x" * (size - 14)})
    out["reference_echo"] = stats(await open_loop(rate_per_s, seconds, lambda: echo.roundtrip(frame)), rate_per_s)
    echo.task.cancel()
    echo.writer.close()
    return out


# ------------------------------------------------------------------------------------ 4 memory
async def memory(world: World, relay: Proc, ref: Proc, n: int) -> dict[str, float]:
    ctx = client_context(world.stores[SENDER], world.anchors)
    probe = encode_frame({"v": 1, "id": 1, "op": "queue"})

    async def hold(port: int, authenticate: bool) -> list:
        conns = []
        sem = asyncio.Semaphore(32)

        async def one() -> None:
            async with sem:
                r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
                w.write(probe)
                head = await r.readexactly(4)
                await r.readexactly(int.from_bytes(head, "big"))
                conns.append(w)

        await asyncio.gather(*(one() for _ in range(n)))
        return conns

    out = {}
    for name, proc in (("relay", relay), ("reference", ref)):
        before = proc.rss_kib()
        conns = await hold(proc.port, True)
        await asyncio.sleep(1)
        after = proc.rss_kib()
        for w in conns:
            w.close()
        out[f"{name}_kib_per_conn"] = (after - before) / n
        out[f"{name}_rss_before_mib"] = before / 1024
        out[f"{name}_rss_after_mib"] = after / 1024
    out["ratio"] = out["relay_kib_per_conn"] / out["reference_kib_per_conn"]
    out["connections"] = n
    return out


# ------------------------------------------------------------------------------------ 5 flood
FLOOD_CLIENTS, FLOOD_GETS, FLOOD_ENVELOPE = 100, 3000, 6500
FLOOD_DEADLINE_S = 120.0  # longest wait for the RSS to stop growing; the row reports if it did not


class Silent(asyncio.Protocol):
    """A client that reads one answer (proof that the relay admitted it) and then never reads again.

    Reading is paused on the TLS transport, and its read buffer limit is zero, so after that first
    answer asyncio stops taking bytes from the socket: what the server sends next fills the kernel's
    buffers, then the server's, which is what the flood row measures. A StreamReader would keep reading
    up to its own limit.
    """

    def __init__(self) -> None:
        self.decoder = FrameDecoder()
        self.first: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        for payload in self.decoder.feed(data):
            if not self.first.done():
                self.first.set_result(payload)
                assert self.transport is not None
                self.transport.pause_reading()
                self.transport.set_read_buffer_limits(high=0)  # type: ignore[attr-defined]  # TLS transports have it

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.first.done():
            self.first.set_exception(ConnectionError(f"closed before the first answer: {exc}"))


async def settled_rss(proc: Proc, deadline_s: float, still_s: float = 3.0, tolerance_kib: int = 256,
                      cpu_tolerance_s: float = 0.1) -> tuple[int, float, bool]:
    """The RSS once the server has stopped working: for ``still_s`` seconds its RSS has not risen by more
    than ``tolerance_kib`` and it has used less than ``cpu_tolerance_s`` of CPU.

    RSS alone is not enough: while the kernel's socket buffers (several MiB per connection on loopback)
    absorb answers, the relay keeps answering with a flat RSS, and its own buffers fill only after. Returns
    (peak RSS KiB, seconds waited, whether it settled before ``deadline_s``); the peak, so that a transient
    high is not hidden by a later free.
    """
    start = time.monotonic()
    peak = base = proc.rss_kib()
    cpu = proc.cpu_seconds()
    still_since = start
    while time.monotonic() - start < deadline_s:
        await asyncio.sleep(0.25)
        now, cpu_now = proc.rss_kib(), proc.cpu_seconds()
        peak = max(peak, now)
        if now > base + tolerance_kib or cpu_now - cpu > cpu_tolerance_s:
            still_since, base, cpu = time.monotonic(), now, cpu_now
        elif time.monotonic() - still_since >= still_s:
            return peak, time.monotonic() - start, True
    return peak, time.monotonic() - start, False


async def flood_one(world: World, proc: Proc, nums: dict[str, int], clients: int, gets: int,
                    deadline_s: float) -> dict[str, Any]:
    """``clients`` connections, spread round-robin over the users of ``nums``, each writing ``gets``
    pipelined ``get`` frames for the message at that user's queue number and then never reading."""
    loop = asyncio.get_running_loop()
    probe = encode_frame({"v": 1, "id": 0, "op": "queue"})
    users = sorted(nums)
    held: list[asyncio.Transport] = []
    sem = asyncio.Semaphore(16)

    async def one(k: int) -> None:
        uid = users[k % len(users)]
        burst = b"".join(encode_frame(request_to_wire(GetRequest(i, nums[uid])))
                         for i in range(1, gets + 1))
        async with sem:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            # A small receive window, as a stalled phone would have. The relay's send buffer in the kernel
            # still takes a few MiB per connection (loopback autotuning) before the relay's own buffers fill.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", proc.port))
            ctx = client_context(world.stores[uid], world.anchors)
            transport, protocol = await loop.create_connection(Silent, sock=sock, ssl=ctx,
                                                               server_hostname="127.0.0.1")
            held.append(transport)
            transport.write(probe)
            first = decode_payload(await asyncio.wait_for(protocol.first, 60))
            # The relay answers the probe; the reference echoes it. Anything else is a refusal (per-user cap).
            if first.get("ok") is not True and first.get("op") != "queue":
                raise SystemExit(f"flood client {k} ({uid}) was not admitted: {first}")
        transport.write(burst)  # never drained: the client side buffers what the server does not read

    try:
        await asyncio.gather(*(one(k) for k in range(clients)))
        rss, waited, settled = await settled_rss(proc, deadline_s)
    finally:
        for t in held:
            t.abort()  # no TLS goodbye: it would wait on a peer that we made stop reading
    return {"rss_kib": rss, "settle_s": waited, "settled": settled}


async def store_for_flood(world: World, relay: Proc, users: list[str]) -> dict[str, int]:
    """One message with a ~6.5 KB envelope in each user's own mailbox (a ``get`` of it is a ~9 KB answer);
    its queue number per user."""
    nums = {}
    for uid in users:
        async with world.client(relay.port, uid) as c:
            receipt = await c.send(uid, os.urandom(16).hex(), Sealed(2, os.urandom(200), os.urandom(FLOOD_ENVELOPE)))
            nums[uid] = receipt.queue_number
    return nums


def flood(world: World, tmp: Path, clients: int, gets: int, deadline_s: float) -> dict[str, Any]:
    """Relay RSS with ``clients`` pipelining, non-reading connections, against its idle RSS (goal: within 2×).

    A fresh relay and a fresh reference are started for this row, so "idle" means started and enrolled
    with no connection ever made, not the figure of a process that earlier rows have warmed up. The
    clients are spread over the three demo users and the relay's per-user cap is raised to just what
    that needs (34 for 100 clients), above the default, which is meant for people, not for this row.
    """
    users = [SENDER, RECIPIENT, BULK]
    per_user = -(-clients // len(users))
    db = tmp / "flood.db"
    relay = start_relay(world.certs, db, max_per_user=per_user)
    ref = start_reference(world.certs)
    out: dict[str, Any] = {"clients": clients, "gets_per_client": gets, "envelope_bytes": FLOOD_ENVELOPE,
                           "users": len(users), "max_per_user": per_user}
    try:
        time.sleep(1.0)  # let both finish start-up allocations before the idle sample
        for name, proc in (("relay", relay), ("reference", ref)):
            out[f"{name}_idle_mib"] = proc.rss_kib() / 1024
        nums = asyncio.run(store_for_flood(world, relay, users))
        out["relay_after_setup_mib"] = relay.rss_kib() / 1024
        for name, proc in (("relay", relay), ("reference", ref)):
            got = asyncio.run(flood_one(world, proc, nums, clients, gets, deadline_s))
            out[f"{name}_flooded_mib"] = got["rss_kib"] / 1024
            out[f"{name}_settle_s"] = got["settle_s"]
            out[f"{name}_settled"] = got["settled"]
            out[f"{name}_ratio"] = out[f"{name}_flooded_mib"] / out[f"{name}_idle_mib"]
            out[f"{name}_kib_per_conn"] = (out[f"{name}_flooded_mib"] - out[f"{name}_idle_mib"]) * 1024 / clients
            if name == "relay":  # how far the relay got before it stopped reading: bounded work, not only memory
                log = db.with_suffix(".audit.log").read_text()
                out["relay_gets_answered"] = sum(1 for line in log.splitlines() if '"op":"get"' in line)
    finally:
        relay.stop()
        ref.stop()
    out["goal_ratio"] = 2.0
    return out


# ------------------------------------------------------------------------------------ 6 growth
def prefill(world: World, db: Path, total: int, unread_for_bulk: int) -> None:
    """Put ``total`` messages straight into the store (server stopped), ``unread_for_bulk`` of them
    queued for one user; receipts are signed with the server key as the relay would."""
    from server.store import SQLiteStore, Submission

    server = load_keystore(world.certs / "MSG_SERVER.p12")
    server_key, signer = server.key, cert_fingerprint(server.cert)
    store = SQLiteStore(str(db))
    template = world.sealed(1)[0][1]
    fingerprint = cert_fingerprint(world.stores[SENDER].cert)
    have = store.db.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
    bulk = store.db.execute("SELECT COUNT(*) FROM messages WHERE recipient=?", (BULK,)).fetchone()[0]
    batch: list[Submission] = []
    for i in range(max(0, unread_for_bulk - bulk) + max(0, total - have - max(0, unread_for_bulk - bulk))):
        to = BULK if bulk < unread_for_bulk else f"FILL{i % 50}"
        bulk += to == BULK
        batch.append(Submission(SENDER, to, os.urandom(16).hex(), template, fingerprint))
        if len(batch) == 2000:
            store.add_messages(batch, lambda r: r.signed_by(server_key, signer))
            batch = []
    if batch:
        store.add_messages(batch, lambda r: r.signed_by(server_key, signer))
    store.close()


async def queue_time(world: World, relay: Proc) -> float:
    async with world.client(relay.port, BULK) as c:
        t0 = time.monotonic()
        entries = await c.queue()
        elapsed = time.monotonic() - t0
    assert len(entries) == 10000, f"expected 10000 unread, found {len(entries)}"
    return elapsed


# ------------------------------------------------------------------------------------ main
async def publish_key(world: World, port: int) -> None:
    async with world.client(port, RECIPIENT) as c:
        await c.publish_key(world.record.to_bytes(), world.signature)


def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=3.0, help="duration of each throughput run")
    p.add_argument("--quick", action="store_true", help="smaller figures for a smoke run")
    p.add_argument("--out", default=str(ROOT / "bench"))
    p.add_argument("--only", choices=["flood"],
                   help="run one row and print it; bench/results.json and the plot are left as they are")
    args = p.parse_args()
    secs = 1.0 if args.quick else args.seconds
    idle_conns = 200 if args.quick else 1000
    growth = (10000, 20000) if args.quick else (10000, 100000)
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="msg-relay-bench-"))
    certs = tmp / "certs"
    make_demo(certs)
    stores = {u: load_keystore(certs / f"{u}.p12") for u in (SENDER, RECIPIENT, BULK)}
    keyring = Keyring(ClientState(tmp / "state"), RECIPIENT)
    own = keyring.ensure(stores[RECIPIENT].key)
    world = World(certs, stores, own.record, own.signature)
    results: dict[str, Any] = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                                           "platform": platform.platform()},
                               "seconds_per_run": secs}
    if args.only == "flood":
        results["flood"] = flood(world, tmp, FLOOD_CLIENTS, FLOOD_GETS, FLOOD_DEADLINE_S)
        print(json.dumps(results["flood"], indent=2))
        print(table([SUMMARY_HEADER, *flood_rows(results["flood"])]))
        return 0
    steps = 3 + 3 + 2 + 1 + 1 + 1 + 2 * len(growth)
    bar = Progress(steps)
    db = tmp / "relay.db"
    relay, ref = start_relay(certs, db), start_reference(certs)
    try:
        asyncio.run(publish_key(world, relay.port))
        results["handshakes"] = {}
        for conc in (1, 8, 32):
            bar.step(f"handshakes, {conc} concurrent clients")
            results["handshakes"][str(conc)] = asyncio.run(handshakes(world, relay, ref, conc, secs))
        for mode, inline in (("presealed", False), ("sealing", True)):
            results[f"sends_{mode}"] = {}
            for conc in (1, 8, 64) if not inline else (1, 8):
                bar.step(f"durable sends ({mode}), {conc} clients")
                results[f"sends_{mode}"][str(conc)] = asyncio.run(
                    sends(world, relay, ref, conc, secs, window=16, seal_inline=inline))
        bar.step("latency at 500 requests/s")
        results["latency"] = asyncio.run(latency(world, relay, ref, 500.0, 2.0 if args.quick else 5.0))
        bar.step(f"memory with {idle_conns} idle connections")
        results["memory"] = asyncio.run(memory(world, relay, ref, idle_conns))
        bar.step(f"memory with {FLOOD_CLIENTS} pipelining clients that never read")
        results["flood"] = flood(world, tmp, FLOOD_CLIENTS, FLOOD_GETS, FLOOD_DEADLINE_S)
        relay.stop()
        baseline = results["sends_presealed"]["8"]["relay_per_s"]
        results["growth"] = {}
        for stored in growth:
            bar.step(f"filling the store to {stored} messages")
            prefill(world, db, stored, 10000)
            relay = start_relay(certs, db)
            bar.step(f"sends with {stored} stored")
            thr = asyncio.run(sends(world, relay, ref, 8, secs, window=16, seal_inline=False))
            lat = asyncio.run(latency(world, relay, ref, 500.0, 2.0))
            qt = asyncio.run(queue_time(world, relay))
            results["growth"][str(stored)] = {"sends_per_s": thr["relay_per_s"],
                                              "ratio_to_empty_store": thr["relay_per_s"] / baseline,
                                              "send_p99_ms": lat["send"]["p99_ms"],
                                              "queue_10k_unread_s": qt}
            relay.stop()
    finally:
        bar.finish()
        for proc in (relay, ref):
            if proc.proc.poll() is None:
                proc.stop()
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(summary(results))
    plot(results, out / "results.png")
    print(f"\nwritten: {out / 'results.json'}, {out / 'results.png'}")
    return 0


SUMMARY_HEADER = ("measure", "relay", "reference", "relay / reference")


def flood_rows(f: dict[str, Any]) -> list[tuple[str, ...]]:
    """The flood row: here the last column is flooded / idle for the relay, the figure with a goal."""
    late = "" if f["relay_settled"] and f["reference_settled"] else " (RSS still rising at the deadline)"
    return [(f"RSS MiB idle -> {f['clients']} non-reading pipelining clients",
             f"{f['relay_idle_mib']:.1f} -> {f['relay_flooded_mib']:.1f} ({f['relay_ratio']:.2f}x)",
             f"{f['reference_idle_mib']:.1f} -> {f['reference_flooded_mib']:.1f} ({f['reference_ratio']:.2f}x) echo",
             f"{f['relay_ratio']:.2f} flooded/idle (goal <= {f['goal_ratio']:.1f}){late}")]


def summary(r: dict[str, Any]) -> str:
    rows: list[tuple[str, ...]] = [SUMMARY_HEADER]
    for c, v in r["handshakes"].items():
        rows.append((f"handshakes/s, {c} clients", f"{v['relay_per_s']:.0f}", f"{v['reference_per_s']:.0f}",
                     f"{v['ratio']:.2f}"))
    for mode in ("presealed", "sealing"):
        for c, v in r[f"sends_{mode}"].items():
            rows.append((f"durable sends/s ({mode}), {c} clients", f"{v['relay_per_s']:.0f}",
                         f"{v['reference_per_s']:.0f} echo", f"{v['ratio']:.2f}"))
    lat = r["latency"]
    ref = lat["reference_echo"]
    for op in ("send", "get"):
        v = lat[op]
        rows.append((f"{op} latency p50/p99/max ms @500/s", f"{v['p50_ms']:.1f}/{v['p99_ms']:.1f}/{v['max_ms']:.1f}",
                     f"{ref['p50_ms']:.1f}/{ref['p99_ms']:.1f}/{ref['max_ms']:.1f} echo",
                     f"{v['p99_ms'] / ref['p99_ms']:.1f} (p99)"))
    m = r["memory"]
    rows.append((f"KiB per idle connection ({m['connections']})", f"{m['relay_kib_per_conn']:.1f}",
                 f"{m['reference_kib_per_conn']:.1f}", f"{m['ratio']:.2f}"))
    if "flood" in r:
        rows += flood_rows(r["flood"])
    for stored, g in r["growth"].items():
        q = f", queue of 10k unread {g['queue_10k_unread_s']:.2f}s" if g["queue_10k_unread_s"] else ""
        rows.append((f"sends/s with {stored} stored (8 clients)", f"{g['sends_per_s']:.0f}",
                     "empty store", f"{g['ratio_to_empty_store']:.2f} (p99 {g['send_p99_ms']:.1f} ms{q})"))
    return table(rows)


def plot(r: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install -e '.[bench]')", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 4 if "flood" in r else 3, figsize=(20 if "flood" in r else 15, 4.5))
    labels = [f"hs {c}" for c in r["handshakes"]] + [f"send {c}" for c in r["sends_presealed"]] + \
             [f"seal+send {c}" for c in r["sends_sealing"]]
    ratios = [v["ratio"] for v in r["handshakes"].values()] + [v["ratio"] for v in r["sends_presealed"].values()] + \
             [v["ratio"] for v in r["sends_sealing"].values()]
    axes[0].bar(labels, ratios, color="#4472c4")
    axes[0].axhline(1.0, color="grey", linestyle="--")
    axes[0].set_title("relay / reference (throughput)")
    axes[0].tick_params(axis="x", rotation=45)
    lat = r["latency"]
    names = ["send", "get", "reference_echo"]
    for i, q in enumerate(("p50_ms", "p99_ms", "max_ms")):
        axes[1].bar([x + i * 0.25 for x in range(3)], [lat[n][q] for n in names], width=0.25, label=q)
    axes[1].set_xticks([x + 0.25 for x in range(3)], names)
    axes[1].set_title("latency at 500 requests/s (ms)")
    axes[1].legend()
    g = r["growth"]
    axes[2].bar(["empty", *[f"{int(k):,} stored" for k in g]], [1.0, *[v["ratio_to_empty_store"] for v in g.values()]],
                color="#70ad47")
    axes[2].set_ylim(0, 1.2)
    axes[2].set_title("send throughput vs an empty store (ratio)")
    if "flood" in r:
        f = r["flood"]
        names = ["relay", "reference"]
        axes[3].bar([0, 1], [f[f"{n}_idle_mib"] for n in names], width=0.35, label="idle", color="#a5a5a5")
        axes[3].bar([0.35, 1.35], [f[f"{n}_flooded_mib"] for n in names], width=0.35,
                    label=f"{f['clients']} non-reading clients", color="#ed7d31")
        axes[3].axhline(f["goal_ratio"] * f["relay_idle_mib"], color="grey", linestyle="--",
                        label=f"goal: {f['goal_ratio']:.0f}x relay idle")
        axes[3].set_xticks([0.175, 1.175], ["relay", "reference (echo)"])
        axes[3].set_title("RSS (MiB), idle vs flooded")
        axes[3].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
