"""Open-file limits: a relay that holds 10 000 connections needs 10 000 descriptors, and says so.

Each connection is one socket, and Linux starts most processes with a soft limit of 1024 open files
(the hard limit, which an unprivileged process may raise its soft limit to, is usually far higher). A
relay past its limit fails in the worst way: ``accept()`` gets EMFILE, asyncio logs it and stops
accepting for a second at a time, and clients time out with no reason given. So the relay raises its
soft limit to the hard limit at start, and checks that ``--max-connections`` fits in it with
:data:`FD_RESERVE` to spare: a ``--max-connections`` given explicitly that cannot fit refuses to start
and names the fix; the default, which nobody asked for, is lowered to what fits, with a warning.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

from pki.errors import MsgRelayError

# Descriptors the relay needs besides its connections: stdio, the event loop's epoll and self-pipe,
# listening sockets, the audit log, the database (SQLite's file, WAL and shared memory, or the
# PostgreSQL pool and its LISTEN connection), CRL reads and TLS-context temporary files; and transient
# ones: sockets accepted only to be refused when the relay is full, and refused handshakes lingering
# for their TLS alert (server/tls_alerts.py, at most 2 s each).
FD_RESERVE = 128


class ConnectionLimitError(MsgRelayError):
    """``--max-connections`` asks for more connections than the process may open files."""


@dataclass(frozen=True)
class Capacity:
    """What the relay may hold: ``connections`` at once, ``open_files`` being its soft limit (raised to
    the hard limit, unless the system refused); ``lowered`` says why fewer than configured, or is None."""

    connections: int
    open_files: int
    lowered: str | None = None


def raise_open_file_limit() -> tuple[int, int]:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; return (soft, hard) as they now are.

    An unlimited hard limit (macOS reports one, then refuses it for files) is left alone: the soft
    limit is what there is. A system that refuses the raise leaves the soft limit as it was."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return resource.getrlimit(resource.RLIMIT_NOFILE)
        soft = hard
    return soft, hard


def connection_capacity(wanted: int, strict: bool) -> Capacity:
    """How many connections the relay may hold, after raising its open-file limit.

    ConnectionLimitError when ``wanted`` (plus :data:`FD_RESERVE`) does not fit and ``strict`` (the
    operator gave ``--max-connections``), or when not even one connection fits."""
    soft, hard = raise_open_file_limit()
    if soft == resource.RLIM_INFINITY or wanted + FD_RESERVE <= soft:
        return Capacity(wanted, soft)
    fits = soft - FD_RESERVE
    shortfall = (f"{wanted} connections need {wanted + FD_RESERVE} open files ({FD_RESERVE} for the relay's own), "
                 f"but this process may open {soft} (hard limit {'unlimited' if hard == resource.RLIM_INFINITY else hard})")
    if strict or fits < 1:
        raise ConnectionLimitError(f"--max-connections: {shortfall}: raise the hard limit (ulimit -Hn, "
                                   "LimitNOFILE= in a systemd unit) or give a lower --max-connections")
    return Capacity(fits, soft, lowered=f"holding at most {fits} connections: {shortfall} "
                                        "(raise the hard limit, or give --max-connections)")
