"""``--server A,B``: a client tries the nodes of a cluster in turn (issue 12)."""

from __future__ import annotations

import socket

from .harness import private_pki, private_relay, run_client


def dead_port() -> int:
    """A port on 127.0.0.1 where nothing listens (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_node_that_is_down_is_skipped(tmp_path):
    private_pki(tmp_path, ("ANNA", "BEN"))
    server = private_relay(tmp_path)
    both = f"127.0.0.1:{dead_port()},{server.address}"
    try:
        def run(uid: str, *args: str, stdin: bytes = b""):
            return run_client(both, tmp_path / f"{uid}.p12", *args, stdin=stdin, state=tmp_path / "st" / uid)

        assert run("BEN", "askqueue").code == 0
        sent = run("ANNA", "send", "BEN", "via the second node", stdin=b"x")
        assert sent.code == 0, sent.err
        got = run("BEN", "getmsg", "1")
        assert got.code == 0 and "via the second node" in got.out
        alone = run_client(f"127.0.0.1:{dead_port()}", tmp_path / "BEN.p12", "askqueue", state=tmp_path / "st" / "BEN")
        assert alone.code == 1 and alone.err.startswith("msg-client: cannot reach the relay at 127.0.0.1:")
    finally:
        server.stop()


def test_a_malformed_node_list_is_one_line(tmp_path):
    private_pki(tmp_path, ("ANNA",))
    r = run_client("127.0.0.1:1,nonsense", tmp_path / "ANNA.p12", "askqueue", state=tmp_path / "st")
    assert r.code == 1 and r.err.strip().endswith("--server must be HOST:PORT, not 'nonsense'")
