"""``make bench`` rows of issue 14: every ``msg-client`` command fast, and ``askqueue`` of 10 000 messages.

* ``--only cli``: whole ``msg-client`` processes (start to exit: interpreter, imports, TLS handshake,
  round trips, crypto, exit) against a local relay: ``send``, ``askqueue`` (one new message each time, so
  its subject is opened and checked) and ``getmsg`` of it, as users run them (the launcher hands each
  command to the resident starter, client/resident.py, started by the first) and with
  ``MSG_CLIENT_RESIDENT=off`` (each process imports and runs everything itself), interleaved with the
  floor, a Python process that only imports ``cryptography.x509``, with ``import client.cli`` on its
  own, and with the least a one-shot command that imports what it uses must do
  (``scripts/bench_mtls_client.py``: keystore, mutual-TLS handshake, one hello). Medians over CLI_ROUNDS
  rounds, reported as ratios to the floor of the same run (the machine is shared and noisy).
* ``--only askqueue``: ``msg-client askqueue`` of 10 000 unread messages, each sealed to the reader
  (ML-KEM-768 + X25519) with a signed subject, as a whole process: the first run (every receipt, subject
  and certificate checked), then later runs (what verified before is kept in the state directory; the
  certificates are still validated at each receipt's time against the current CRL). Beside it, the
  queue fetched alone in-process (``RelayClient.queue``: paging, parsing, no checks).

The client processes run without ``PYTHONDONTWRITEBYTECODE``: the project's modules are read from their
``.pyc`` as after ``pip install``, not compiled on every start.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import BULK, RECIPIENT, ROOT, SENDER, World, percentile, start_relay
from client.keys import Keyring
from client.launch import RESIDENT_ENV
from client.state import ClientState
from pki.identity import cert_fingerprint
from pki.keystore import load_keystore
from protocol.encoding import utc_now
from protocol.envelope import InnerMessage, seal

CLI_ROUNDS = 100  # rounds of floor, the commands (through the resident and not), client.cli imported, bare mTLS
COMMANDS = ("send", "askqueue", "getmsg")
CLI_GOAL_MS = 100.0  # issue 14: median per command, against a floor of about 70 ms where it was filed
ASKQUEUE_MESSAGES = 10_000
ASKQUEUE_GOAL_S = 0.5
ASKQUEUE_WARM_RUNS = 3
FLOOR = [sys.executable, "-c", "import cryptography.x509"]
MTLS_CLIENT = str(ROOT / "scripts" / "bench_mtls_client.py")  # the least a one-shot command must do


def _env(tmp: Path) -> dict[str, str]:
    """The clients' environment: default state directories under ``tmp``, byte-code written and read."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["XDG_DATA_HOME"] = str(tmp / "cli-xdg")
    return env


def _client() -> list[str]:
    """``.venv/bin/msg-client``, the entry point users run (``python -m client.cli`` without one)."""
    entry = Path(sys.executable).with_name("msg-client")
    return [str(entry)] if entry.exists() else [sys.executable, "-m", "client.cli"]


def _timed(argv: list[str], env: dict[str, str], stdin: bytes = b"") -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, env=env, input=stdin, capture_output=True)
    took = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv[-3:])} failed: {done.stderr.decode(errors='replace')}")
    return took, done.stdout.decode(errors="replace")


def _stats(values: list[float], floor: float) -> dict[str, float]:
    median = statistics.median(values)
    return {"median_ms": 1000 * median, "p90_ms": 1000 * percentile(values, 90), "ratio_to_floor": median / floor}


def cli(world: World, tmp: Path, rounds: int = CLI_ROUNDS) -> dict[str, Any]:
    """Whole ``msg-client`` processes against a local relay, interleaved with the floor."""
    relay = start_relay(world.certs, tmp / "cli.db")
    env = _env(tmp)
    cold = {**env, RESIDENT_ENV: "off"}
    server = f"127.0.0.1:{relay.port}"

    def client(uid: str, *args: str) -> list[str]:
        return [*_client(), "--p12", str(world.certs / f"{uid}.p12"), "--server", server, *args]

    names = ("floor", "mtls", "import", *COMMANDS, *(f"{c}_cold" for c in COMMANDS))
    times: dict[str, list[float]] = {k: [] for k in names}
    mtls = [sys.executable, MTLS_CLIENT, str(world.certs / f"{SENDER}.p12"), str(relay.port)]
    try:
        # Outside the timing: each user's key made and published, byte-code written, caches filled once,
        # the resident starter up (the first command starts it) and taking the commands.
        for uid in (SENDER, RECIPIENT):
            _timed(client(uid, "askqueue"), env)
        _resident_up(env, client(RECIPIENT, "-v", "askqueue"))
        for _ in range(2):
            for e in (env, cold):
                _timed(client(SENDER, "send", RECIPIENT, "warm-up"), e, b"hello")
                _timed(client(RECIPIENT, "getmsg", _newest(_timed(client(RECIPIENT, "askqueue"), e)[1])), e)
            _timed(FLOOR, env)
        for i in range(rounds):
            times["floor"].append(_timed(FLOOR, env)[0])
            times["mtls"].append(_timed(mtls, env)[0])
            times["import"].append(_timed([sys.executable, "-c", "import client.cli"], env)[0])
            for suffix, e in (("", env), ("_cold", cold)):
                times["send" + suffix].append(_timed(client(SENDER, "send", RECIPIENT, f"round {i}"), e,
                                                     b"See you at noon.")[0])
                took, listing = _timed(client(RECIPIENT, "askqueue"), e)
                times["askqueue" + suffix].append(took)
                times["getmsg" + suffix].append(_timed(client(RECIPIENT, "getmsg", _newest(listing)), e)[0])
    finally:
        _stop_resident(env)
        relay.stop()
    floor = statistics.median(times["floor"])
    out: dict[str, Any] = {"rounds": rounds, "floor_ms": 1000 * floor, "goal_ms": CLI_GOAL_MS}
    for name in names[1:]:
        out[name] = _stats(times[name], floor)
    return out


def _resident_up(env: dict[str, str], argv: list[str]) -> None:
    """Wait until the resident starter the first commands started takes commands (a -v run says so)."""
    deadline = time.monotonic() + 60
    while b"command run by the resident starter" not in subprocess.run(argv, cwd=ROOT, env=env,
                                                                       capture_output=True).stderr:
        if time.monotonic() > deadline:
            raise SystemExit("the resident starter did not come up within 60 s")
        time.sleep(0.05)


def _stop_resident(env: dict[str, str]) -> None:
    """The bench's resident leaves with the bench, not after its idle time."""
    directory = Path(env["XDG_DATA_HOME"]) / "msg-relay" / "resident"
    for lock in directory.glob("*.lock"):
        text = lock.read_text().strip()
        if text:
            try:
                os.kill(int(text), signal.SIGTERM)
            except ProcessLookupError:
                pass  # gone already


def _newest(listing: str) -> str:
    lines = [line for line in listing.splitlines() if line.strip()]
    if not lines:
        raise SystemExit("askqueue listed nothing where a message was just sent")
    return lines[-1].split(":", 1)[0]


def cli_rows(r: dict[str, Any]) -> list[tuple[str, ...]]:
    rows = []
    for name, what in (("send", "msg-client send (1 recipient)"), ("askqueue", "msg-client askqueue (1 new message)"),
                       ("getmsg", "msg-client getmsg"),
                       ("send_cold", "msg-client send, MSG_CLIENT_RESIDENT=off"),
                       ("askqueue_cold", "msg-client askqueue, MSG_CLIENT_RESIDENT=off"),
                       ("getmsg_cold", "msg-client getmsg, MSG_CLIENT_RESIDENT=off"),
                       ("import", "python -c 'import client.cli'"),
                       ("mtls", "least one-shot mutual-TLS client (PKCS#12, handshake, one hello)")):
        if name not in r:
            continue  # a results.json of an earlier bench
        v = r[name]
        goal = f" (goal <= {r['goal_ms']:.0f} ms)" if name in COMMANDS else ""
        rows.append((f"{what}, median of {r['rounds']} processes", f"{v['median_ms']:.0f} ms (p90 {v['p90_ms']:.0f})"
                     f"{goal}", f"floor {r['floor_ms']:.0f} ms", f"{v['ratio_to_floor']:.2f}"))
    return rows


# ------------------------------------------------------------------------------------ askqueue of 10 000
def prefill_sealed(world: World, db: Path, state: Path, n: int) -> None:
    """``n`` unread messages from SENDER to BULK straight into the store (relay stopped), each sealed to
    the key in BULK's state directory ``state`` with its own signed subject, receipts signed as the relay
    signs them."""
    from server.store import SQLiteStore, Submission

    bulk = world.stores[BULK]
    cs = ClientState(state)
    cs.bind(BULK, cert_fingerprint(bulk.ca_certificates()[0]))
    own = Keyring(cs, BULK).ensure(bulk.key)
    server = load_keystore(world.certs / "MSG_SERVER.p12")
    signer, fingerprint = cert_fingerprint(server.cert), cert_fingerprint(world.stores[SENDER].cert)
    store = SQLiteStore(str(db))
    batch = []
    try:
        for i in range(n):
            msg_id = os.urandom(16).hex()
            inner = InnerMessage(SENDER, BULK, msg_id, utc_now(), f"bench {i}", b"x" * 200)
            batch.append(Submission(SENDER, BULK, msg_id, seal(inner, world.stores[SENDER].key, own.record),
                                    fingerprint))
            if len(batch) == 1000 or i == n - 1:
                store.add_messages(batch, lambda r: r.signed_by(server.key, signer))
                batch = []
    finally:
        store.close()


async def _fetch_only(world: World, port: int) -> float:
    async with world.client(port, BULK) as c:
        start = time.perf_counter()
        entries = await c.queue()
        took = time.perf_counter() - start
    if len(entries) != ASKQUEUE_MESSAGES:
        raise SystemExit(f"expected {ASKQUEUE_MESSAGES} unread, the relay listed {len(entries)}")
    return took


def askqueue(world: World, tmp: Path, n: int = ASKQUEUE_MESSAGES) -> dict[str, Any]:
    """``msg-client askqueue`` of ``n`` unread messages: first run, later runs, and the fetch alone."""
    db, state = tmp / "askqueue.db", tmp / "askqueue-state"
    start = time.perf_counter()
    prefill_sealed(world, db, state, n)
    prefill_s = time.perf_counter() - start
    relay = start_relay(world.certs, db)
    env = _env(tmp)
    argv = [*_client(), "--p12", str(world.certs / f"{BULK}.p12"), "--server", f"127.0.0.1:{relay.port}",
            "--state-dir", str(state), "askqueue"]
    try:
        floor = statistics.median(_timed(FLOOR, env)[0] for _ in range(5))
        first, listing = _timed(argv, env)
        shown = [line for line in listing.splitlines() if line and not line.endswith(":(unverifiable)")]
        if len(shown) != n:
            raise SystemExit(f"askqueue showed {len(shown)} verified lines of {n}")
        later = [_timed(argv, env)[0] for _ in range(ASKQUEUE_WARM_RUNS)]
        fetch = [asyncio.run(_fetch_only(world, relay.port)) for _ in range(ASKQUEUE_WARM_RUNS)]
        cpu_before = relay.cpu_seconds()
        _timed(argv, env)
        relay_cpu = relay.cpu_seconds() - cpu_before
    finally:
        _stop_resident(env)
        relay.stop()
    return {"messages": n, "prefill_s": prefill_s, "floor_ms": 1000 * floor, "goal_s": ASKQUEUE_GOAL_S,
            "first_s": first, "later_s": statistics.median(later), "later_runs": later,
            "fetch_only_s": statistics.median(fetch), "relay_cpu_per_askqueue_s": relay_cpu}


def askqueue_rows(r: dict[str, Any]) -> list[tuple[str, ...]]:
    n = f"{r['messages']:,}".replace(",", " ")
    goal = f"goal <= {r['goal_s']} s"
    return [(f"msg-client askqueue of {n} unread, first run (every check made)", f"{r['first_s']:.2f} s",
             f"floor {r['floor_ms']:.0f} ms", ""),
            (f"msg-client askqueue of {n} unread, later runs (median of {len(r['later_runs'])})",
             f"{r['later_s']:.2f} s ({goal})", f"floor {r['floor_ms']:.0f} ms", f"{r['later_s'] / r['goal_s']:.1f}x goal"),
            (f"queue of {n} fetched alone (RelayClient.queue, in-process)", f"{r['fetch_only_s']:.2f} s",
             f"relay CPU per askqueue {r['relay_cpu_per_askqueue_s']:.2f} s", "")]
