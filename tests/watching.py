"""``msg-client watch`` as a child process, its output read line by line with deadlines."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class WatchProcess:
    """``msg-client … watch`` for ``uid`` of a :func:`tests.harness.private_pki` directory."""

    def __init__(self, server: str, directory: Path, uid: str, *args: str) -> None:
        argv = [sys.executable, "-m", "client.cli", "--server", server, "--p12", str(directory / f"{uid}.p12"),
                "--state-dir", str(directory / "st" / uid), "watch", *args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=env)
        self.lines: queue.Queue[str] = queue.Queue()
        self.err: list[str] = []
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines.put), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.err.append), daemon=True).start()

    @staticmethod
    def _pump(stream, put) -> None:  # type: ignore[no-untyped-def]
        for line in stream:
            put(line.rstrip("\n"))

    def next_line(self, timeout: float = 30.0) -> str:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line from watch within {timeout} s; stderr: {self.err}") from None

    def lines_until(self, predicate, timeout: float = 30.0) -> list[str]:  # type: ignore[no-untyped-def]
        """Lines until one satisfies ``predicate`` (included)."""
        out: list[str] = []
        deadline = time.monotonic() + timeout
        while not out or not predicate(out[-1]):
            out.append(self.next_line(max(0.1, deadline - time.monotonic())))
        return out

    def interrupt(self) -> int:
        """Ctrl-C, as a terminal sends it; the exit code."""
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(30)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
