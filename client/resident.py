"""The resident starter: ``msg-client`` with its imports done, forking one child per command.

Started in the background by :mod:`client.launch` (``python -P -m client.resident SOCKET``) and gone
after :data:`IDLE_S` without a command, when its socket is removed or replaced, or when the code it
runs changes on disk. Before it forks it holds imported modules and nothing else: no key, no password,
no state directory, no connection, no thread. Each child takes the launcher's arguments, environment,
working directory, umask and open files, runs :func:`client.cli.main` as a fresh process would, and
reports its exit code. The rules both sides keep are in :mod:`client.launch`.
"""

from __future__ import annotations

import fcntl
import importlib
import io
import os
import pkgutil
import select
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from pki.frozen import make_all

from . import launch
from .launch import DECLINED, EXITED, GO, HANDED_BACK, REQUEST_MAX, STARTED, TerminalNeeded, Unsafe, answer

IDLE_S = 600.0  # a resident with no command for this long leaves
CHECK_S = 5.0  # how often an idle resident looks whether its socket is still its own
LOCK_WAIT_S = 1.0  # a resident being replaced (its code changed) has this long to let go of the lock
REQUEST_WAIT_S = 10.0  # for the launcher's request and for its go-ahead
PACKAGES = ("client", "pki", "protocol")  # imported whole: what any msg-client command may need
ALSO = ("asyncio", "getpass", "logging", "OpenSSL.crypto")  # imported later by some commands


class Request:
    """One command, as :func:`client.launch.encode_request` sends it."""

    def __init__(self, body: bytes) -> None:
        fields = iter(body.split(b"\0"))
        if next(fields) != launch.PROTOCOL:
            raise ValueError("another version of the launcher")
        self.identity = next(fields).decode()
        self.umask = int(next(fields), 8)
        self.streams = [(next(fields).decode(), next(fields).decode(), next(fields) == b"1", next(fields) == b"1")
                        for _ in range(3)]
        self.fds = [int(next(fields)) for _ in range(int(next(fields)))]
        self.argv = [os.fsdecode(next(fields)) for _ in range(int(next(fields)))]
        self.env = dict(next(fields).split(b"=", 1) for _ in range(int(next(fields))))
        if next(fields, None) is not None:
            raise ValueError("a request of the wrong length")


class CodeStamp:
    """What a resident runs, as it is on disk: a change means an upgrade or an edit, after which its
    children would run code that is no longer the installed one.

    The project's own files and every file mapped into the process (the interpreter, ``libssl``,
    ``libc``, extension modules: a security update replaces them) are compared one by one; for the
    other Python modules, each directory's, which changes whenever ``pip`` adds, removes or replaces
    a file in it.
    """

    def __init__(self, modules: Mapping[str, object], own: tuple[str, ...], mapped: Iterable[str] = ()) -> None:
        paths = set(mapped)
        for module in list(modules.values()):
            path = getattr(module, "__file__", None)
            if isinstance(path, str):
                paths.add(path if path.startswith(own) else os.path.dirname(path))
        self.paths = sorted(paths)
        self.seen = self._read()

    def _read(self) -> list[tuple[int, int, int] | None]:
        seen: list[tuple[int, int, int] | None] = []
        for path in self.paths:
            try:
                st = os.stat(path)
            except OSError:
                seen.append(None)
            else:
                seen.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return seen

    def changed(self) -> bool:
        return self._read() != self.seen


def mapped_files() -> set[str]:
    """The files mapped into this process (``/proc/self/maps``): the interpreter and its libraries."""
    with open("/proc/self/maps", encoding="utf-8", errors="surrogateescape") as maps:
        names = {parts[5].rstrip("\n") for parts in (line.split(None, 5) for line in maps) if len(parts) == 6}
    return {name for name in names if name.startswith("/") and not name.endswith(" (deleted)")}


def warm_up() -> CodeStamp:
    """Import everything a command may need and make the frozen classes; the stamp of what was loaded."""
    root = Path(__file__).resolve().parent.parent
    for package in PACKAGES:
        importlib.import_module(package)
        for info in pkgutil.iter_modules([str(root / package)], f"{package}."):
            importlib.import_module(info.name)
    for name in ALSO:
        importlib.import_module(name)
    make_all()
    return CodeStamp(sys.modules, tuple(str(root / package) + os.sep for package in PACKAGES), mapped_files())


class Resident:
    """The listening socket and the loop that forks a child per command.

    ``uid`` is whose commands it runs (our own; a test gives another to see a stranger refused);
    ``clock`` and ``fork`` are injectable, so a test drives the loop without waiting or forking.
    """

    def __init__(self, path: str, ident: str, stamp: CodeStamp, *, lock_fd: int = -1, uid: int | None = None,
                 clock: Callable[[], float] = time.monotonic, fork: Callable[[], int] = os.fork) -> None:
        self.path, self.ident, self.stamp, self.lock_fd = path, ident, stamp, lock_fd
        self.uid = os.getuid() if uid is None else uid
        self.clock, self.fork = clock, fork
        self.namespaces = launch.namespaces("self")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        temporary = launch.temporary_path(path)
        if os.path.lexists(temporary):
            os.unlink(temporary)  # left by a resident that died; the lock says none is running
        self.listener.bind(temporary)
        self.listener.listen(64)
        os.replace(temporary, path)  # appears whole, and only once the imports are done
        self.inode = os.stat(path).st_ino
        self.last = clock()

    def still_ours(self) -> bool:
        try:
            return os.stat(self.path).st_ino == self.inode
        except OSError:
            return False

    def serve(self) -> None:
        """Until idle for IDLE_S, the socket is no longer ours, or the code on disk has changed."""
        while self.serve_one():
            pass

    def serve_one(self) -> bool:
        """Wait for one command (at most CHECK_S) and fork its child; False when it is time to leave."""
        if not self.still_ours():
            return False
        left = IDLE_S - (self.clock() - self.last)
        if left <= 0:
            return False
        ready, _, _ = select.select([self.listener], [], [], min(left, CHECK_S))
        if not ready:
            return True
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return True
        with conn:
            try:
                launch.check_peer(conn, self.uid, self.namespaces)
            except Unsafe:
                return True  # a stranger, or a sandbox of ours: closed unanswered
            if self.stamp.changed():
                return False  # closed unanswered: the launcher runs the command and starts a new resident
            self.last = self.clock()
            if self.fork() == 0:
                self._child(conn)  # never returns
        return True

    def close(self) -> None:
        if self.still_ours():
            os.unlink(self.path)
        self.listener.close()

    # ------------------------------------------------------------------------ in the child
    def _child(self, conn: socket.socket) -> None:
        code = 1
        try:
            self.listener.close()
            if self.lock_fd >= 0:
                os.close(self.lock_fd)  # a long `watch` must not keep the next resident out
            _default_signals()
            launch.IN_CHILD = True
            code = run_command(conn, self.ident)
        finally:
            os._exit(code)


def _default_signals() -> None:
    """As a fresh Python process has them, whatever the resident was started with: Ctrl-C raises
    KeyboardInterrupt, a terminating signal terminates, a closed pipe is an error, not a signal."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)


def run_command(conn: socket.socket, ident: str) -> int:
    """Receive one command, wait for the go-ahead, run it as ``msg-client`` would, report its exit code."""
    conn.settimeout(REQUEST_WAIT_S)
    request, fds = _receive(conn)
    if request.identity != ident:
        conn.sendall(answer(DECLINED))  # another installation's launcher: it runs the command itself
        return 0
    conn = _become(request, fds, conn)  # nothing is written before the go-ahead: a launcher that gives up
    try:                                # finds no trace
        conn.sendall(answer(STARTED, os.getpid()))
        try:
            go = conn.recv(1)
        except TimeoutError:
            conn.sendall(answer(DECLINED))  # the launcher runs the command itself once it reads this
            return 0
        if go != GO:
            return 0  # the launcher gave up waiting: it runs the command itself
        conn.settimeout(None)
        threading.Thread(target=_end_with_launcher, args=(conn,), daemon=True).start()
        kind, code = EXITED, _run(request.argv)
    except KeyboardInterrupt:  # Ctrl-C, passed on by the launcher, before the command's own handler
        kind, code = EXITED, _interrupted()
    except TerminalNeeded:
        kind, code = HANDED_BACK, 0
    try:
        conn.sendall(answer(kind, code))
    except OSError:
        pass  # the launcher is gone (killed): nobody is left to tell
    return code


def _end_with_launcher(conn: socket.socket) -> None:
    """A launcher killed (``kill -9``, its terminal gone) takes its command with it, as it would have
    had it run the command itself: the launcher sends nothing after the go-ahead, so any end of the
    wait means it is gone."""
    try:
        conn.recv(1)
    except OSError:
        pass  # reset: gone as well
    os.kill(os.getpid(), signal.SIGHUP)


def _interrupted() -> int:
    print(launch.INTERRUPTED, file=sys.stderr, flush=True)
    return 130


def _receive(conn: socket.socket) -> tuple[Request, list[int]]:
    data, fds, _flags, _ = socket.recv_fds(conn, 65536, launch.FDS_MAX + 1)
    if len(data) < 4:
        raise ValueError("a request cut short")
    size = int.from_bytes(data[:4], "big")
    if size > REQUEST_MAX:
        raise ValueError("a request over the size limit")
    body = bytearray(data[4:])
    while len(body) < size:
        chunk = conn.recv(min(65536, size - len(body)))
        if not chunk:
            raise ValueError("a request cut short")
        body += chunk
    request = Request(bytes(body))
    if len(fds) != len(request.fds) + 1 or not {0, 1, 2} <= set(request.fds):
        raise ValueError("a request without its open files")
    return request, fds


def _become(request: Request, received: list[int], conn: socket.socket) -> socket.socket:
    """This process takes the launcher's place: its open files at their numbers (and no other), its
    directory, umask, environment, standard streams and argv. Returns the connection, moved out of the way."""
    floor = max([*received, *request.fds, conn.fileno()]) + 1
    moved = socket.socket(fileno=fcntl.fcntl(conn.fileno(), fcntl.F_DUPFD_CLOEXEC, floor))
    moved.settimeout(conn.gettimeout())  # the copy shares the file's non-blocking mode, not the object's timeout
    conn.close()
    sources = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor) for fd in received]
    keep = {moved.fileno(), *sources}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            try:  # the resident's own /dev/null streams (their objects live on in sys.__stdin__ and the
                os.close(fd)  # others, so they never close 0-2 again), and the received copies
            except OSError:
                pass  # the listing's own descriptor, closed already
    cwd, *files = sources
    for source, target in zip(files, request.fds):
        os.dup2(source, target)  # inheritable, as a process's inherited files are
        os.close(source)
    os.fchdir(cwd)
    os.close(cwd)
    os.environ.clear()
    os.environb.update(request.env)
    time.tzset()
    os.umask(request.umask)
    sys.stdin, sys.stdout, sys.stderr = (_stream(fd, *settings) for fd, settings in enumerate(request.streams))
    sys.argv = ["msg-client", *request.argv]
    return moved


def _stream(fd: int, encoding: str, errors: str, line_buffering: bool, write_through: bool) -> io.TextIOWrapper:
    """A standard stream as the launcher's Python made it (``-u``/PYTHONUNBUFFERED: write-through)."""
    mode = "rb" if fd == 0 else "wb"
    raw = io.open(fd, mode, buffering=0 if write_through and fd else -1, closefd=False)
    return io.TextIOWrapper(raw, encoding, errors, newline="\n", line_buffering=line_buffering,  # type: ignore[arg-type]
                            write_through=write_through)


def _run(argv: list[str]) -> int:
    """``client.cli.main`` with the exit code a Python process would have."""
    from .cli import main

    try:
        code: object = main(argv)
    except SystemExit as exc:
        code = exc.code
    except (KeyboardInterrupt, TerminalNeeded):
        raise
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:
        return 120  # as Python when it cannot flush its streams at exit
    return code


def _lock(path: str) -> int:
    """The resident's lock, holding its pid; -1 when another resident holds it, or when what is there
    is not a plain file of ours (a link planted to make us overwrite another file is not followed)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError:
        return -1
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_nlink != 1:
        os.close(fd)
        return -1
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                return -1
            time.sleep(0.05)
    os.ftruncate(fd, 0)
    os.write(fd, b"%d\n" % os.getpid())
    return fd


def main(argv: list[str]) -> int:
    (path,) = argv
    ident = launch.identity()
    try:
        launch.private_dir(os.path.dirname(path), create=False)
        if launch.socket_path(os.path.dirname(path), ident) != path:
            return 1  # started by a launcher of another installation: it would decline every command
    except Unsafe:
        return 1
    os.umask(0o077)
    lock_fd = _lock(launch.lock_path(path))
    if lock_fd < 0:
        return 0  # another resident is up or starting
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    resident = Resident(path, ident, warm_up(), lock_fd=lock_fd)  # replaces a dead resident's socket
    try:
        resident.serve()
    finally:
        resident.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
