"""``make bench`` rows of issue 13: live delivery latency and messages to several recipients.

* Store-to-screen latency of ``watch``: a watcher (``Mailbox.watch``, as ``msg-client watch`` runs it)
  on one node, a sender pacing messages; from the moment the sender holds its receipt (the message is
  durable) to the moment the watcher has verified and "printed" the line. One node on SQLite, and two
  nodes on PostgreSQL (sender on A, watcher on B: the notification crosses the database).
* One message to 32 recipients against 32 messages to one: whole ``msg-client send`` processes, the
  client's wall time and the relay's CPU time.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import (
    RECIPIENT,
    ROOT,
    SENDER,
    World,
    fresh_database,
    node_keystore,
    percentile,
    pg_unavailable,
    start_relay,
)
from client.keys import Keyring
from client.mailbox import Mailbox, QueueLine
from client.state import ClientState
from pki.keystore import load_keystore, save_keystore
from pki.validation import TrustPolicy

WATCH_MESSAGES = 200
WATCH_INTERVAL = 0.02  # seconds between sends: the watcher is idle when each one arrives
FANOUT = 32
FANOUT_ROUNDS = 3


async def _watch_latency(world: World, state: Path, send_port: int, watch_port: int, n: int) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    shown: dict[int, float] = {}
    arrived = asyncio.Event()

    def on_line(line: QueueLine) -> None:
        shown[line.num] = time.perf_counter()
        arrived.set()

    watcher_client = world.client(watch_port, RECIPIENT)
    mailbox = Mailbox(watcher_client, ClientState(state), TrustPolicy(world.anchors, []))
    watching = loop.create_task(mailbox.watch(on_line, lambda _m: None))
    stored: dict[int, float] = {}
    try:
        async with world.client(send_port, SENDER) as sender:
            for msg_id, sealed in world.sealed(n):
                receipt = await sender.send(RECIPIENT, msg_id, sealed)
                stored[receipt.queue_number] = time.perf_counter()
                await asyncio.sleep(WATCH_INTERVAL)
            deadline = loop.time() + 60
            while not all(num in shown for num in stored) and loop.time() < deadline:
                arrived.clear()
                await asyncio.wait_for(arrived.wait(), max(0.01, deadline - loop.time()))
    finally:
        watching.cancel()
        await watcher_client.close()
    lat = [(shown[num] - t) * 1000 for num, t in stored.items() if num in shown]
    return {"messages": n, "shown": len(lat), "p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99),
            "max_ms": max(lat) if lat else float("nan")}


def watch_latency(world: World, tmp: Path, admin_dsn: str, state: Path, n: int = WATCH_MESSAGES) -> dict[str, Any]:
    """One node on SQLite, then two nodes on one PostgreSQL database."""
    out: dict[str, Any] = {}
    relay = start_relay(world.certs, tmp / "live.db")
    try:
        out["one_node"] = asyncio.run(_watch_latency(world, state, relay.port, relay.port, n))
    finally:
        relay.stop()
    why = asyncio.run(pg_unavailable(admin_dsn))
    if why is not None:
        out["two_nodes"] = {"skipped": why}
        return out
    with fresh_database(admin_dsn) as dsn:
        a = start_relay(world.certs, dsn, log=tmp / "live-a.log")
        b = start_relay(world.certs, dsn, p12=node_keystore(world.certs, tmp, "node-b"), log=tmp / "live-b.log")
        try:
            out["two_nodes"] = asyncio.run(_watch_latency(world, state, a.port, b.port, n))
        finally:
            a.stop()
            b.stop()
    return out


# ------------------------------------------------------------------------------ several recipients
def _fanout_users(world: World) -> list[str]:
    """FANOUT recipients issued by the demo CA, their keystores beside the demo users' (enrolled by the relay)."""
    from pki.ca import CertificateAuthority

    ca = CertificateAuthority.load(world.certs / "ca")
    uids = [f"FAN{i:02d}" for i in range(FANOUT)]
    for uid in uids:
        if not (world.certs / f"{uid}.p12").exists():
            save_keystore(world.certs / f"{uid}.p12", ca.issue(uid), None)
    return uids


async def _publish_all(world: World, port: int, uids: list[str], tmp: Path) -> None:
    from client.connection import RelayClient

    for uid in uids:
        store = load_keystore(world.certs / f"{uid}.p12")
        key = Keyring(ClientState(tmp / "fanout-state" / uid), uid).ensure(store.key)
        async with RelayClient(store, "127.0.0.1", port, world.anchors, timeout=60) as client:
            await client.publish_key(key.record.to_bytes(), key.signature)


def _cli(world: World, port: int, state: Path, *args: str) -> float:
    argv = [sys.executable, "-m", "client.cli", "--server", f"127.0.0.1:{port}",
            "--p12", str(world.certs / f"{SENDER}.p12"), "--state-dir", str(state), *args]
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, input=b"a message to many", capture_output=True)
    took = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"msg-client {' '.join(args)} failed: {done.stderr.decode(errors='replace')}")
    return took


def fanout(world: World, tmp: Path) -> dict[str, Any]:
    """``send FAN00,…,FAN31`` once against ``send FANxx`` 32 times, alternating, FANOUT_ROUNDS rounds."""
    uids = _fanout_users(world)
    relay = start_relay(world.certs, tmp / "fanout.db")
    state = tmp / "fanout-sender"
    try:
        asyncio.run(_publish_all(world, relay.port, uids, tmp))
        _cli(world, relay.port, state, "askqueue")  # the sender's own key published once, outside the timing
        one: list[tuple[float, float]] = []
        many: list[tuple[float, float]] = []
        for _ in range(FANOUT_ROUNDS):
            cpu = relay.cpu_seconds()
            wall = _cli(world, relay.port, state, "send", ",".join(uids), "to all")
            one.append((wall, relay.cpu_seconds() - cpu))
            cpu = relay.cpu_seconds()
            wall = sum(_cli(world, relay.port, state, "send", uid, "to one") for uid in uids)
            many.append((wall, relay.cpu_seconds() - cpu))
    finally:
        relay.stop()
    one_wall, one_cpu = statistics.median(w for w, _ in one), statistics.median(c for _, c in one)
    many_wall, many_cpu = statistics.median(w for w, _ in many), statistics.median(c for _, c in many)
    return {"recipients": FANOUT, "rounds": FANOUT_ROUNDS,
            "one_send_client_s": one_wall, "one_send_relay_cpu_s": one_cpu,
            "separate_sends_client_s": many_wall, "separate_sends_relay_cpu_s": many_cpu,
            "client_ratio": one_wall / many_wall, "relay_cpu_ratio": one_cpu / many_cpu if many_cpu else float("nan")}


def live_rows(r: dict[str, Any]) -> list[tuple[str, ...]]:
    rows = []
    for key, what in (("one_node", "one node, SQLite"), ("two_nodes", "sent via A, watched on B (PostgreSQL)")):
        w = r.get("watch", {}).get(key)
        if w is None:
            continue
        if "skipped" in w:
            rows.append((f"watch store-to-screen, {what}", "skipped", w["skipped"], ""))
            continue
        rows.append((f"watch store-to-screen ms p50 / p99, {what}", f"{w['p50_ms']:.1f} / {w['p99_ms']:.1f}",
                     f"{w['shown']}/{w['messages']} shown", f"max {w['max_ms']:.1f} ms (goal across nodes <= 1000)"))
    f = r.get("fanout")
    if f is not None:
        rows.append((f"send to {f['recipients']}: one command vs {f['recipients']} commands, client s",
                     f"{f['one_send_client_s']:.2f}", f"{f['separate_sends_client_s']:.2f}",
                     f"{f['client_ratio']:.2f}"))
        rows.append((f"send to {f['recipients']}: one command vs {f['recipients']} commands, relay CPU ms",
                     f"{f['one_send_relay_cpu_s'] * 1000:.0f}", f"{f['separate_sends_relay_cpu_s'] * 1000:.0f}",
                     f"{f['relay_cpu_ratio']:.2f}"))
    return rows


def live(world: World, tmp: Path, admin_dsn: str, state: Path) -> dict[str, Any]:
    """Both rows of issue 13 that are not about connections (those are in ``bench.memory``/``conncpu``)."""
    return {"watch": watch_latency(world, tmp, admin_dsn, state), "fanout": fanout(world, tmp)}
