"""``msg-client``'s entry point: run the command in the resident starter if one is up, else here.

A one-shot command spends most of its time starting Python and importing ``cryptography``, the
project and ``ssl``, and less than a third doing its work. The resident starter
(:mod:`client.resident`) has done the imports once; for each command it forks a child that runs
exactly what ``msg-client`` would run here (same code, same checks, same files), with this process's
arguments, environment, working directory, umask and open files. It holds no key, no password and no
state of any user: only imported code. This module is what every command pays before it, so it
imports only what the interpreter has loaded already, ``_socket`` (not ``socket``, which pulls in
``selectors``) and, once a command runs remotely, ``signal``.

The rules, in one place for both sides:

* The socket and its lock live in ``$XDG_DATA_HOME/msg-relay/resident/`` (default
  ``~/.local/share``), a directory of ours that nobody else may enter. The process at the other end of
  the socket must run as our own user, in our namespaces, checked through the kernel (``SO_PEERCRED``,
  ``/proc/PID/ns``) on both sides.
* A resident serves only launchers of its own interpreter, environment and code (:func:`identity`).
* A command is never run twice: the child waits for a go-ahead before it starts, and once it has one
  the launcher runs the command itself only when the child hands it back before anything is done
  (it would read the terminal, which a child cannot do right, or it gave up waiting for the go-ahead).
* ``MSG_CLIENT_RESIDENT=off`` runs every command here and starts no resident.
"""

from __future__ import annotations

import _socket
import binascii
import os
import sys
from collections.abc import Mapping, Sequence

RESIDENT_ENV = "MSG_CLIENT_RESIDENT"
INTERRUPTED = "msg-client: interrupted"  # Ctrl-C, here or in the child (client.cli prints it too)
PROTOCOL = b"msg-client-resident/2"
REQUEST_MAX = 4 << 20  # arguments and environment of one command; Linux allows at most about 2 MiB
FDS_MAX = 250  # open files passed on (the kernel takes at most 253 in one message); more: run here
START_WAIT_S = 3.0  # for the child's pid (a resident answers in milliseconds): then the command runs here
SUN_PATH_MAX = 107  # bytes in a Unix socket's path
# Answers are five bytes: a letter and a signed 32-bit number.
STARTED, GO, EXITED, DECLINED, HANDED_BACK = b"P", b"G", b"X", b"S", b"T"
FORWARDED_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT")
NAMESPACES = ("mnt", "net", "pid", "user", "ipc", "uts")
# The resident's own environment (each child takes its launcher's whole): what decides which code the
# interpreter imports and how it behaves (part of the identity), then where it finds its home.
IDENTITY_PREFIXES = ("PYTHON", "CRYPTOGRAPHY_", "OPENSSL_", "SSL_CERT_", "LC_", "LANG", "LD_", "GLIBC_", "MALLOC_")
# What else a child takes from the resident, not from its launcher: so part of the identity too.
CONTEXT_STATUS = ("Gid:", "Groups:", "CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:", "NoNewPrivs:",
                  "Seccomp:", "Seccomp_filters:", "Cpus_allowed_list:", "Mems_allowed_list:")
RESIDENT_KEEPS = ("PATH", "HOME", "XDG_DATA_HOME", "TMPDIR", "VIRTUAL_ENV")

# Set in a resident's child, where a command cannot read the user's terminal (see before_terminal_input).
IN_CHILD = False


class Unsafe(Exception):
    """The resident's directory or peer is not ours alone: run the command here instead."""


class TerminalNeeded(BaseException):
    """Raised in a resident's child where the command would read the terminal: it hands the command back."""


def main() -> None:
    """The ``msg-client`` console script."""
    argv = sys.argv[1:]
    if os.environ.get(RESIDENT_ENV, "").lower() != "off":
        try:
            code = through_resident(argv)
        except KeyboardInterrupt:  # before the child had the go-ahead: it runs nothing
            print(INTERRUPTED, file=sys.stderr)
            sys.exit(130)
        if code is not None:
            sys.exit(code)
    from client.cli import main as run_here

    sys.exit(run_here(argv))


def before_terminal_input() -> None:
    """Called before a command reads the user's terminal (a password prompt, a body typed in). A
    resident's child has no controlling terminal and is not in the terminal's job (Ctrl-Z, ``bg``),
    so there it hands the command back to the launcher, which runs it itself. Nothing has been sent
    or shown by then: the keystore has been read and the state directory bound, which the launcher
    does again to the same effect."""
    if IN_CHILD:
        raise TerminalNeeded


# ------------------------------------------------------------------------------------ shared rules
def identity(environ: Mapping[str, str] = os.environ) -> str:
    """What a resident must share with a launcher to run its commands: the interpreter, its virtualenv,
    this code, the environment that decides what the interpreter imports and how (``LD_PRELOAD``:
    ``torsocks`` must not be bypassed), and the process context a child inherits from the resident."""
    kept = sorted(f"{k}={v}" for k, v in environ.items() if k.startswith(IDENTITY_PREFIXES))
    return "\n".join([sys.executable, sys.prefix, os.path.dirname(os.path.realpath(__file__)), *kept,
                      process_context()])


def process_context() -> str:
    """Resource limits, priority, groups, capabilities, seccomp and no-new-privileges, CPUs, control
    group and root directory: ``ulimit``, ``nice``, ``taskset``, ``setpriv`` or a sandbox that shares our
    namespaces get a resident of their own, started under the same settings."""
    with open("/proc/self/status", encoding="ascii", errors="replace") as status:
        lines = [line for line in status if line.startswith(CONTEXT_STATUS)]
    with open("/proc/self/limits", encoding="ascii", errors="replace") as limits:
        lines.append(limits.read())
    with open("/proc/self/cgroup", encoding="utf-8", errors="replace") as cgroup:
        lines.append(cgroup.read())
    root = os.stat("/")
    lines.append(f"nice {os.getpriority(os.PRIO_PROCESS, 0)} root {root.st_dev}:{root.st_ino}")
    return "".join(lines)


def resident_environment() -> dict[str, str]:
    """The environment a resident starts with: never a password or anything else a command was given."""
    return {k: v for k, v in os.environ.items() if k in RESIDENT_KEEPS or k.startswith(IDENTITY_PREFIXES)}


def resident_dir() -> str:
    """``$XDG_DATA_HOME/msg-relay/resident`` (a relative XDG_DATA_HOME is ignored, as the XDG
    specification says), beside the state directories (client.state)."""
    base = os.environ.get("XDG_DATA_HOME", "")
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "msg-relay", "resident")


def socket_path(directory: str, ident: str) -> str:
    """One resident per identity (the name is a checksum; the identity itself is compared too)."""
    path = os.path.join(directory, "%08x.sock" % binascii.crc32(ident.encode()))
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise Unsafe(f"{path} is too long for a socket")
    return path


def temporary_path(path: str) -> str:
    """Where a resident binds before its socket appears under ``path`` (as long as ``path``)."""
    return path[: -len(".sock")] + ".tmp"


def lock_path(path: str) -> str:
    return path[: -len(".sock")] + ".lock"


def private_dir(directory: str, create: bool, uid: int | None = None) -> str:
    """``directory`` (made 0700 if ``create``) once it is ours (``uid``, default this process's user)
    alone and not a link, in a parent of ours that not everyone may write to; :class:`Unsafe` if not.

    The parent may be group-writable (a umask of 002, usual where each user has a group of their own):
    whoever swapped the directory could only offer a socket of their own, whose user the kernel names,
    and the resident opens its lock without following links (client.resident).
    """
    if create:
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise Unsafe(f"{directory}: {exc.strerror}") from None
    uid = os.getuid() if uid is None else uid
    for path, forbidden in ((os.path.dirname(directory), 0o002), (directory, 0o077)):
        try:
            st = os.lstat(path)
        except OSError as exc:
            raise Unsafe(f"{path}: {exc.strerror}") from None
        # A link fails this too: its own mode is 0777. A file in the way fails the socket's connect.
        if st.st_uid != uid or st.st_mode & forbidden:
            raise Unsafe(f"{path} is not a directory of this user's closed to others")
    return directory


def peer(sock: _socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a Unix socket, as the kernel recorded them."""
    creds = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)  # struct ucred: pid, uid, gid
    return int.from_bytes(creds[:4], sys.byteorder), int.from_bytes(creds[4:8], sys.byteorder)


def namespaces(pid: int | str) -> list[int] | None:
    """The identities of a process's namespaces; None when they cannot be read."""
    try:
        return [os.stat(f"/proc/{pid}/ns/{name}").st_ino for name in NAMESPACES]
    except OSError:
        return None


def check_peer(sock: _socket.socket, uid: int, own_namespaces: list[int] | None) -> None:
    """:class:`Unsafe` unless the peer runs as ``uid`` in these namespaces: another user would run
    commands as us, and a sandbox of ours (another mount or network namespace) would run them, or
    have them run, outside itself."""
    pid, peer_uid = peer(sock)
    if peer_uid != uid:
        raise Unsafe("the socket's peer runs as another user")
    if pid <= 0 or own_namespaces is None or namespaces(pid) != own_namespaces:
        raise Unsafe("the socket's peer runs in other namespaces")


def answer(kind: bytes, number: int = 0) -> bytes:
    return kind + number.to_bytes(4, "big", signed=True)


def encode_request(ident: str, argv: list[str], fds: list[int]) -> bytes:
    """The command as the child needs it, NUL-separated (no argument or variable can hold a NUL):
    ``fds`` are the numbers of the open files passed beside it (after the working directory's)."""
    umask = os.umask(0)
    os.umask(umask)
    fields = [PROTOCOL, ident.encode(), b"%o" % umask]
    for stream in (sys.stdin, sys.stdout, sys.stderr):
        fields += [(getattr(stream, "encoding", None) or "utf-8").encode(),
                   (getattr(stream, "errors", None) or "strict").encode(),
                   b"1" if getattr(stream, "line_buffering", False) else b"0",
                   b"1" if getattr(stream, "write_through", False) else b"0"]
    env = [k + b"=" + v for k, v in os.environb.items()]
    fields += [b"%d" % len(fds), *(b"%d" % fd for fd in fds), b"%d" % len(argv), *map(os.fsencode, argv),
               b"%d" % len(env), *env]
    body = b"\0".join(fields)
    return len(body).to_bytes(4, "big") + body


def read_once(argv: list[str]) -> str | None:
    """An argument naming a terminal or another device (the child has no terminal of its own), or,
    when the command may be handed back (stdin is a terminal), a pipe (``<(...)``: a command handed
    back after the child read it would find it empty); None when there is none."""
    tty = os.isatty(0)
    for arg in argv:
        try:
            mode = os.stat(arg).st_mode
        except (OSError, ValueError):
            continue
        kind = mode & 0o170000
        if kind in (0o020000, 0o060000) or tty and kind in (0o010000, 0o140000):  # char, block; FIFO, socket
            return arg
    return None


def inherited_fds() -> list[int]:
    """The open files this process inherited (not marked close-on-exec): a command run here has them,
    so the child gets them at the same numbers (``--p12 /dev/fd/3``, ``<(...)``)."""
    fds = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.get_inheritable(int(name)):
                fds.append(int(name))
        except OSError:
            pass  # the listing's own descriptor, closed by now
    return sorted(fds)


# ------------------------------------------------------------------------------------ the launcher
def through_resident(argv: list[str]) -> int | None:
    """The command's exit code from the resident, or None when this process must run the command
    (no resident, one that is not ours or not up to date, or a command the child handed back)."""
    if sys.stdin is None or sys.stdout is None or sys.stderr is None:
        return None  # a closed standard stream: the command runs here, as it always did
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    cwd = -1
    try:
        try:  # what this process has to pass on, and where: a failure here runs the command here
            ident = identity()
            path = socket_path(private_dir(resident_dir(), create=True), ident)
            named = read_once(argv)
            if named is not None:
                raise ValueError(f"{named} can be read only once, or only with a terminal")
            fds = inherited_fds()
            if len(fds) > FDS_MAX or not {0, 1, 2} <= set(fds):
                raise ValueError(f"{len(fds)} open files to pass on")
            cwd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            request = encode_request(ident, argv, fds)
        except (Unsafe, OSError, ValueError) as exc:
            _debug(argv, f"no resident starter: {exc}")
            return None
        try:
            sock.settimeout(START_WAIT_S)
            sock.connect(path)
        except OSError as exc:  # none there (or a dead one's socket): one is started for the next command
            _debug(argv, f"no resident starter: {exc}")
            start_resident(path)
            return None
        try:
            check_peer(sock, os.getuid(), namespaces("self"))
            sent = sock.sendmsg([request], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, b"".join(
                fd.to_bytes(4, sys.byteorder, signed=True) for fd in [cwd, *fds]))])
            sock.sendall(request[sent:])
            kind, pid = _read_answer(sock)
        except EOFError:  # closed unanswered: its code changed on disk, and it has left
            _debug(argv, "no resident starter: the resident starter is out of date")
            start_resident(path)
            return None
        except (OSError, Unsafe) as exc:
            _debug(argv, f"no resident starter: {exc}")
            return None
        if kind != STARTED or pid <= 1:
            return None
        return _go(sock, pid, argv)
    finally:
        if cwd >= 0:
            os.close(cwd)
        sock.close()


def _go(sock: _socket.socket, pid: int, argv: list[str]) -> int | None:
    """Give the child the go-ahead and wait for its exit code (None: it handed the command back)."""
    forwarding = _SignalForwarding(pid)  # before the go-ahead: no Ctrl-C falls between the two
    _debug(argv, f"command run by the resident starter's child {pid}")
    try:
        sock.sendall(GO)  # from here on the command is the child's, unless it hands it back
    except OSError:
        pass  # the child is gone already (a Ctrl-C passed on): its answer, or none, says how it ended
    sock.settimeout(None)
    try:
        kind, code = _read_answer(sock)
    except (OSError, EOFError):
        kind, code = b"", 1
    forwarding.stop()  # the child is gone or going: its pid may be another process's soon
    if kind == EXITED:
        return code
    if forwarding.forwarded:  # a signal came and the child did not live to answer, or left the command to
        signum = forwarding.forwarded[-1]  # us: it is this process's too (Ctrl-C: KeyboardInterrupt)
        os.kill(os.getpid(), signum)
        return 128 + signum  # a signal whose default is not to end a process
    if kind in (HANDED_BACK, DECLINED):  # the child did nothing: this process runs the command
        if kind == HANDED_BACK:
            _debug(argv, "the command reads the terminal: run here")
        return None
    print("msg-client: the command ended without an exit status (its process was killed)", file=sys.stderr)
    return 1


class _SignalForwarding:
    """Our signals (Ctrl-C, a hang-up, kill) passed on to the child; Ctrl-Z stops it with us."""

    def __init__(self, pid: int) -> None:
        import signal

        self.signal, self.pid = signal, pid
        try:  # the child is alive (it waits for the go-ahead): a pidfd names it and no later process
            self.pidfd = os.pidfd_open(pid)
        except OSError:
            self.pidfd = -1  # a kernel before 5.3: by pid
        self.forwarded: list[int] = []
        self.previous: dict[int, object] = {}
        for name in FORWARDED_SIGNALS:
            signum = getattr(signal, name)
            if signal.getsignal(signum) is not signal.SIG_IGN:  # ignored here: not passed on
                self.previous[signum] = signal.signal(signum, self._forward)
        if signal.getsignal(signal.SIGTSTP) is not signal.SIG_IGN:
            self.previous[signal.SIGTSTP] = signal.signal(signal.SIGTSTP, self._suspend)

    def _kill(self, signum: int) -> None:
        try:
            if self.pidfd >= 0:
                self.signal.pidfd_send_signal(self.pidfd, signum)
            else:
                os.kill(self.pid, signum)
        except ProcessLookupError:
            pass  # it has just ended: its exit code is on the way

    def _forward(self, signum: int, _frame: object) -> None:
        self.forwarded.append(signum)
        self._kill(signum)

    def _suspend(self, signum: int, _frame: object) -> None:
        signal = self.signal
        self._kill(signal.SIGSTOP)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)  # stopped here until the shell continues us (fg, bg)
        signal.signal(signum, self._suspend)
        self._kill(signal.SIGCONT)

    def stop(self) -> None:
        """Our own handlers back, once the child has answered or is gone."""
        for signum, handler in self.previous.items():
            self.signal.signal(signum, handler)  # type: ignore[arg-type]
        self.previous.clear()
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


def _read_answer(sock: _socket.socket) -> tuple[bytes, int]:
    data = b""
    while len(data) < 5:
        chunk = sock.recv(5 - len(data))
        if not chunk:
            raise EOFError("the resident starter closed the connection")
        data += chunk
    return data[:1], int.from_bytes(data[1:], "big", signed=True)


def start_resident(path: str) -> None:
    """Start a resident starter in the background for the next commands (if one is starting already,
    the newcomer sees its lock and leaves). Detached: no terminal, none of our files, cwd ``/``."""
    try:
        pid = os.fork()
    except OSError:
        return  # no process to spare: the next command tries again
    if pid:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass  # our parent set SIGCHLD to be ignored: the kernel has reaped it already
        return
    try:
        os.setsid()
        if os.fork():
            os._exit(0)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))  # a pipe we inherited must not be held open for hours
        os.chdir("/")
        # -P: nothing from the working directory on sys.path (it is "/" anyway).
        os.execve(sys.executable, [sys.executable, "-P", "-m", "client.resident", path], resident_environment())
    finally:
        os._exit(127)


def wants_verbose(argv: Sequence[str]) -> bool:
    """``-v``/``--verbose`` anywhere in the arguments (client.cli decides the same way)."""
    return "-v" in argv or "--verbose" in argv


def _debug(argv: list[str], line: str) -> None:
    if wants_verbose(argv):
        print(f"msg-client: {line}", file=sys.stderr)
