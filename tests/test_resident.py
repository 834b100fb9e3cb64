"""The resident starter (client/resident.py) and the launcher in front of it (client/launch.py).

``msg-client`` runs a command in a child forked from a resident process that has done the imports. The
tests run the real console script against a relay, and play the other side where it matters: a
stranger at the socket, a directory others can enter, code changed on disk, a launcher that gives up,
a child that is killed.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from client import launch, resident
from client.launch import DECLINED, answer, encode_request, identity
from pki.keystore import load_keystore, save_keystore

from .harness import ROOT

MSG_CLIENT = Path(sys.executable).with_name("msg-client")
DEADLINE_S = 60.0  # for what a busy machine may be slow to do; a working resident does it at once


class Home:
    """A user's XDG data home of its own (short: a socket path has at most 107 bytes), where the
    launcher finds or starts the resident; every resident started here is stopped at the end."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="mr-"))
        self.dir = self.root / "msg-relay" / "resident"
        self.env = {**os.environ, "XDG_DATA_HOME": str(self.root)}
        self.env.pop(launch.RESIDENT_ENV, None)
        self.env.pop("MSG_RELAY_PASSWORD", None)

    @property
    def socket(self) -> Path:
        return Path(launch.socket_path(str(self.dir), identity(self.env)))

    def resident_pid(self) -> int | None:
        lock = Path(launch.lock_path(str(self.socket)))
        text = lock.read_text().strip() if lock.exists() else ""
        return int(text) if text else None

    def wait_for_resident(self) -> int:
        deadline = time.monotonic() + DEADLINE_S
        while not self.socket.exists():
            assert time.monotonic() < deadline, "no resident starter came up"
            time.sleep(0.02)
        pid = self.resident_pid()
        assert pid is not None
        return pid

    def run(self, *args: str, stdin: bytes = b"", cwd: Path = ROOT, env: dict[str, str] | None = None,
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(MSG_CLIENT), *args], input=stdin.decode(), capture_output=True, text=True,
                              cwd=cwd, env=env or self.env, timeout=DEADLINE_S)

    def stop(self) -> None:
        pid = self.resident_pid()
        if pid is not None:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture()
def home() -> Iterator[Home]:
    assert MSG_CLIENT.exists(), "msg-client is not installed in this interpreter's environment"
    h = Home()
    yield h
    h.stop()


def _client_args(relay: Any, p12: Path | str) -> list[str]:
    return ["--server", relay.address, "--p12", str(p12)]


RUN_BY_RESIDENT = "msg-client: command run by the resident starter's child "


def _warm(home: Home, relay: Any, p12: Path, state: Path) -> int:
    """The first command starts the resident: it runs here, and says so with -v."""
    first = home.run("-v", *_client_args(relay, p12), "--state-dir", str(state), "askqueue")
    assert first.returncode == 0, first.stderr
    assert "msg-client: no resident starter:" in first.stderr and RUN_BY_RESIDENT not in first.stderr
    return home.wait_for_resident()


def _protected(p12: Path, directory: Path) -> Path:
    """A copy of the keystore ``p12`` under the password ``s3cret``."""
    protected = directory / f"{p12.stem}-pw.p12"
    save_keystore(protected, load_keystore(p12), b"s3cret")
    return protected


# ------------------------------------------------------------------------------------ what users see
def test_commands_after_the_first_run_in_the_resident_as_they_would_here(relay: Any, user: Any, home: Home,
                                                                          tmp_path: Path) -> None:
    """Same output, exit codes and files, with the launcher's stdin, working directory and environment."""
    alice, alice_state = user("MSG_CLI1")
    bob, bob_state = user("MSG_CLI2")
    _warm(home, relay, bob, bob_state)
    # A keystore with a password, given in the environment; --p12 relative to the launcher's directory.
    protected = _protected(alice, tmp_path)
    env = {**home.env, "MSG_RELAY_PASSWORD": "s3cret"}
    sent = home.run("-v", *_client_args(relay, protected.name), "--state-dir", str(alice_state), "send", "MSG_CLI2",
                    "through the resident", stdin=b"line one\nline two", cwd=tmp_path, env=env)
    assert sent.returncode == 0, sent.stderr
    assert RUN_BY_RESIDENT in sent.stderr and sent.stdout.startswith("sent ")
    listed = home.run(*_client_args(relay, bob), "--state-dir", str(bob_state), "askqueue")
    num, sender, rest = listed.stdout.strip().splitlines()[-1].split(":", 2)
    subject = rest.split("Z:", 1)[1]
    assert (listed.returncode, sender, subject) == (0, "MSG_CLI1", "through the resident"), listed
    read = home.run(*_client_args(relay, bob), "--state-dir", str(bob_state), "getmsg", num)
    assert read.returncode == 0 and read.stdout.endswith("\n\nline one\nline two\n"), read
    unknown = home.run("-v", *_client_args(relay, bob), "--state-dir", str(bob_state), "getmsg", "999")
    assert unknown.returncode == 1 and RUN_BY_RESIDENT in unknown.stderr
    assert unknown.stderr.splitlines()[-2:][0] == "MSG RELAY SERVICE: unknown message!"


def test_the_child_sees_the_very_arguments_and_a_large_environment(relay: Any, user: Any, home: Home) -> None:
    """Bytes that are no UTF-8, an = in a value, an empty argument, 400 KB of environment (a request read in
    many pieces): the child answers as the command run in its own process does."""
    bob, bob_state = user("MSG_CLI2")
    _warm(home, relay, bob, bob_state)
    home.env.update({f"BIG{i}": "x=" + "y" * 100_000 for i in range(4)})
    argv = [str(MSG_CLIENT), "-v", *_client_args(relay, bob), "--state-dir", str(bob_state)]
    for weird in (b"\xff\xfe-\xc3\xa9", b""):
        runs = [subprocess.run([*argv, b"getmsg", weird], capture_output=True, cwd=ROOT, timeout=DEADLINE_S,
                               env={**home.env, launch.RESIDENT_ENV: mode}) for mode in ("", "off")]
        remote, here = runs
        assert RUN_BY_RESIDENT.encode() in remote.stderr and RUN_BY_RESIDENT.encode() not in here.stderr
        assert (remote.returncode, remote.stdout) == (here.returncode, here.stdout) == (1, b"")
        assert remote.stderr.split(b"\n", 1)[1] == here.stderr, (remote.stderr, here.stderr)


def test_the_resident_keeps_no_password_of_the_command_that_started_it(relay: Any, user: Any, home: Home,
                                                                        tmp_path: Path) -> None:
    """Its children take each launcher's environment; the resident itself keeps only what decides which
    code it runs (a password given in the environment stays with the command that was given it)."""
    bob, bob_state = user("MSG_CLI2")
    home.env.update(MSG_RELAY_PASSWORD="s3cret", PYTHONNOUSERSITE="1")
    pid = _warm(home, relay, _protected(bob, tmp_path), bob_state)
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert b"PYTHONNOUSERSITE=1" in environ and f"XDG_DATA_HOME={home.root}".encode() in environ
    assert not [e for e in environ if e.startswith(b"MSG_RELAY_PASSWORD=")]


def test_off_runs_every_command_here_and_starts_nothing(relay: Any, user: Any, home: Home) -> None:
    bob, bob_state = user("MSG_CLI2")
    env = {**home.env, launch.RESIDENT_ENV: "off"}
    for _ in range(2):
        done = home.run("-v", *_client_args(relay, bob), "--state-dir", str(bob_state), "askqueue", env=env)
        assert done.returncode == 0 and "resident starter" not in done.stderr, done.stderr
    assert not home.dir.exists()


def _send_interrupted(home: Home, relay: Any, user: Any, signum: int, to_child: bool) -> tuple[int, str, str]:
    """A ``send`` through the resident waiting for its body on a pipe that stays open, given ``signum``
    (the launcher, as a terminal's Ctrl-C reaches it, or the child); its exit code and output, once
    the child is gone and Bob's queue shown to hold nothing."""
    alice, alice_state = user("MSG_CLI1")
    bob, bob_state = user("MSG_CLI2")
    _warm(home, relay, bob, bob_state)
    proc = subprocess.Popen([str(MSG_CLIENT), "-v", *_client_args(relay, alice), "--state-dir", str(alice_state),
                             "send", "MSG_CLI2", "never"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=home.env)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert line.startswith(RUN_BY_RESIDENT), line
        child = int(line.rsplit(" ", 1)[1])
        os.kill(child if to_child else proc.pid, signum)
        out, err = proc.communicate(timeout=DEADLINE_S)  # closes the body's pipe: a rerun would send
    finally:
        proc.kill()
    _gone(child)
    listed = home.run(*_client_args(relay, bob), "--state-dir", str(bob_state), "askqueue")
    assert (listed.returncode, listed.stdout) == (0, ""), listed
    return proc.returncode, out, err


def test_ctrl_c_reaches_the_command_in_the_child(relay: Any, user: Any, home: Home) -> None:
    """Ctrl-C (SIGINT to the launcher, as the terminal sends it) interrupts the command in the child:
    exit 130 and the one line, as in its own process; nothing sent."""
    assert _send_interrupted(home, relay, user, signal.SIGINT, to_child=False) == (130, "", "msg-client: interrupted\n")


def test_a_child_killed_mid_command_is_an_error_not_a_rerun(relay: Any, user: Any, home: Home) -> None:
    code, out, err = _send_interrupted(home, relay, user, signal.SIGKILL, to_child=True)
    assert (code, out) == (1, "")
    assert err == "msg-client: the command ended without an exit status (its process was killed)\n"


def test_a_terminated_launcher_ends_its_command_as_signalled(relay: Any, user: Any, home: Home) -> None:
    """SIGTERM to msg-client (kill, a closing session) ends the child, and then msg-client, by that signal."""
    assert _send_interrupted(home, relay, user, signal.SIGTERM, to_child=False) == (-signal.SIGTERM, "", "")


def _gone(pid: int) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while Path(f"/proc/{pid}").exists() and Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z":
        assert time.monotonic() < deadline, f"process {pid} is still running"
        time.sleep(0.02)


# ------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("make_unsafe", ["resident 0755", "parent 0777", "resident a link"])
def test_a_directory_others_could_use_is_not_trusted(relay: Any, user: Any, home: Home, make_unsafe: str) -> None:
    """With a resident up, the directory made enterable (or its parent writable) by others, or swapped
    for a link: the launcher no longer talks to whatever socket is there, it runs the command itself."""
    bob, bob_state = user("MSG_CLI2")
    _warm(home, relay, bob, bob_state)
    if make_unsafe == "resident 0755":
        home.dir.chmod(0o755)
    elif make_unsafe == "parent 0777":
        home.dir.parent.chmod(0o777)
    else:
        real = home.dir.with_name("elsewhere")
        home.dir.rename(real)
        home.dir.symlink_to(real)
    done = home.run("-v", *_client_args(relay, bob), "--state-dir", str(bob_state), "askqueue")
    assert done.returncode == 0, done.stderr
    assert "is not a directory of this user's closed to others" in done.stderr
    assert RUN_BY_RESIDENT not in done.stderr
    refused = subprocess.run([sys.executable, "-P", "-m", "client.resident", str(home.socket)], cwd=ROOT,
                             env=home.env, capture_output=True, timeout=DEADLINE_S)
    assert refused.returncode == 1  # nor would a resident start there


def test_a_group_writable_parent_is_fine(home: Home) -> None:
    """A umask of 002 makes ~/.local/share/msg-relay group-writable: the resident is still used there."""
    launch.private_dir(str(home.dir), create=True)
    home.dir.parent.chmod(0o775)
    assert launch.private_dir(str(home.dir), create=False) == str(home.dir)


def test_a_directory_of_another_user_is_not_trusted(home: Home) -> None:
    launch.private_dir(str(home.dir), create=True)  # the control: ours
    with pytest.raises(launch.Unsafe, match="is not a directory of this user's closed to others"):
        launch.private_dir(str(home.dir), create=False, uid=os.getuid() + 1)


def test_the_launcher_refuses_a_resident_of_another_user(relay: Any, user: Any, home: Home, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel names the user behind the socket: not ours, and nothing is sent to it."""
    bob, bob_state = user("MSG_CLI2")
    _warm(home, relay, bob, bob_state)
    monkeypatch.setenv("XDG_DATA_HOME", str(home.root))
    monkeypatch.setattr(launch, "peer", lambda sock: (os.getpid(), os.getuid() + 1))
    started: list[str] = []
    monkeypatch.setattr(launch, "start_resident", lambda path: started.append(path))
    with open(os.devnull) as null_in, open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        monkeypatch.setattr(sys, "stdin", null_in)  # real files: the streams a launcher passes on
        monkeypatch.setattr(sys, "stdout", out)
        monkeypatch.setattr(sys, "stderr", err)
        assert launch.through_resident([*_client_args(relay, bob), "--state-dir", str(bob_state), "askqueue"]) is None
    assert started == []  # nor is another resident started beside a stranger's: the command runs here


@pytest.fixture()
def listener(home: Home) -> Iterator[tuple[Path, list[int], Any]]:
    """A Resident in this process on a socket of its own, with forking replaced by a record of forks."""
    launch.private_dir(str(home.dir), create=True)
    stamp_file = home.root / "module.py"
    stamp_file.write_text("x = 1\n")
    forks: list[int] = []

    def fork() -> int:
        forks.append(1)
        return 4242  # the parent's side: the child is not made

    stamp = resident.CodeStamp({"m": type("M", (), {"__file__": str(stamp_file)})}, (str(home.root) + os.sep,))
    res = resident.Resident(str(home.dir / "t.sock"), identity(), stamp, fork=fork)
    yield home.dir / "t.sock", forks, res
    res.close()


def _connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(DEADLINE_S)
    s.connect(str(path))
    return s


def test_the_resident_runs_nothing_for_a_stranger(listener: tuple[Path, list[int], Any]) -> None:
    path, forks, res = listener
    with _connect(path):
        assert res.serve_one() and forks == [1]  # the control: our own user is served
    res.uid = os.getuid() + 1
    with _connect(path) as stranger:
        assert res.serve_one()
        assert stranger.recv(5) == b""  # closed unanswered
    assert forks == [1]


def test_code_changed_on_disk_ends_the_resident(listener: tuple[Path, list[int], Any], home: Home) -> None:
    """An upgrade or an edit after the imports: the connection is closed unanswered (the launcher runs the
    command itself) and the resident leaves instead of forking code that is no longer installed."""
    path, forks, res = listener
    module = home.root / "module.py"
    stat = module.stat()
    module.write_text("x = 2\n")  # same size; the time alone tells
    os.utime(module, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    with _connect(path) as conn:
        assert res.serve_one() is False
        assert conn.recv(5) == b""
    assert forks == []


def test_the_code_stamp_sees_files_and_directories(tmp_path: Path) -> None:
    own, lib = tmp_path / "own", tmp_path / "lib"
    own.mkdir(), lib.mkdir()
    (own / "a.py").write_text("a")
    (lib / "b.py").write_text("b")
    modules = {name: type(name, (), {"__file__": str(path)}) for name, path in (("a", own / "a.py"),
                                                                                  ("b", lib / "b.py"))}
    stamp = resident.CodeStamp(modules, (str(own) + os.sep,))
    assert stamp.paths == sorted([str(own / "a.py"), str(lib)]) and not stamp.changed()
    (lib / "c.py").write_text("c")  # pip adds a file beside b: the directory changed
    os.utime(lib, ns=(0, 1))
    assert stamp.changed()
    stamp = resident.CodeStamp(modules, (str(own) + os.sep,))
    (own / "a.py").write_text("aa")  # the project's own file edited in place
    assert stamp.changed()


def test_an_idle_resident_leaves_and_so_does_one_whose_socket_was_taken(
        listener: tuple[Path, list[int], Any]) -> None:
    path, forks, res = listener
    now = [0.0]
    res.clock, res.last = (lambda: now[0]), 0.0
    now[0] = resident.IDLE_S + 1
    assert res.serve_one() is False
    res.last = now[0]
    assert res.serve_one() is True  # nothing came within CHECK_S: still up
    path.unlink()
    path.write_bytes(b"")  # another resident's file where ours was
    assert res.serve_one() is False
    res.close()
    assert path.exists()  # not ours to remove


def test_a_request_from_another_installation_is_declined(tmp_path: Path) -> None:
    """A launcher of another interpreter or checkout that reached this socket: it is told to run the command
    itself, and nothing of the request is taken on (run in a child process: run_command takes its place)."""
    a, b = socket.socketpair()
    with a, b:
        request = encode_request("/other/python\n/other\n/other/client", ["askqueue"], [0, 1, 2])
        null, cwd = os.open(os.devnull, os.O_RDWR), os.open(".", os.O_RDONLY | os.O_DIRECTORY)
        try:
            socket.send_fds(a, [request], [cwd, null, null, null])
        finally:
            os.close(null), os.close(cwd)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child's exit code is the assertion
            a.close()
            code = 2
            try:
                code = 10 + resident.run_command(b, identity())
            finally:
                os._exit(code)
        b.close()
        assert a.recv(5) == answer(DECLINED)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 10


def test_no_go_ahead_no_command(relay: Any, user: Any, home: Home) -> None:
    """A launcher that gave up after the child's pid (too slow a resident) runs the command itself: the
    child must then never run it, whatever else it reads. Here the request is a send; nothing reaches
    the relay, and the child ends without an answer."""
    alice, alice_state = user("MSG_CLI1")
    bob, bob_state = user("MSG_CLI2")
    _warm(home, relay, bob, bob_state)
    argv = [*_client_args(relay, alice), "--state-dir", str(alice_state), "send", "MSG_CLI2", "twice?"]
    script = ("import os, sys, socket\n"
              "from client.launch import encode_request, identity, STARTED\n"
              "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
              "cwd = os.open('.', os.O_RDONLY | os.O_DIRECTORY)\n"
              "socket.send_fds(s, [encode_request(identity(), sys.argv[2:], [0, 1, 2])], [cwd, 0, 1, 2])\n"
              "a = s.recv(5); assert a[:1] == STARTED, a\n"
              "s.sendall(b'N')\n"  # not the go-ahead, and the connection kept open
              "assert s.recv(5) == b'', 'the child answered'\n"
              "print(int.from_bytes(a[1:], 'big'))\n")
    done = subprocess.run([sys.executable, "-c", script, str(home.socket), *argv], input="body", capture_output=True,
                          text=True, cwd=ROOT, env=home.env, timeout=DEADLINE_S)
    assert done.returncode == 0, done.stderr
    _gone(int(done.stdout))
    listed = home.run(*_client_args(relay, bob), "--state-dir", str(bob_state), "askqueue")
    assert listed.returncode == 0 and listed.stdout == "", listed


def test_forked_children_draw_different_randomness() -> None:
    """The design rests on it: OpenSSL (in cryptography and in ssl) reseeds after fork, so two commands
    forked from one resident never share a key, a nonce or a message id."""
    script = ("import os, ssl\n"
              "from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey\n"
              "X25519PrivateKey.generate(); ssl.RAND_bytes(16)\n"
              "seen = []\n"
              "for _ in range(2):\n"
              "    r, w = os.pipe()\n"
              "    if os.fork() == 0:\n"
              "        os.write(w, X25519PrivateKey.generate().public_key().public_bytes_raw() + ssl.RAND_bytes(16)"
              " + os.urandom(16)); os._exit(0)\n"
              "    os.close(w); seen.append(os.read(r, 64)); os.wait()\n"
              "assert len(seen[0]) == 64 and all(a != b for a, b in zip((seen[0][:32], seen[0][32:48], seen[0][48:]),"
              " (seen[1][:32], seen[1][32:48], seen[1][48:])))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=DEADLINE_S)
    assert done.returncode == 0, done.stderr


def test_the_launcher_imports_almost_nothing() -> None:
    """What every command pays before the resident takes over: no cryptography, no ssl, no socket module."""
    done = subprocess.run([sys.executable, "-c", "import sys, client.launch; print(' '.join(sys.modules))"],
                          capture_output=True, text=True, cwd=ROOT, timeout=DEADLINE_S)
    loaded = set(done.stdout.split())
    assert "client.launch" in loaded
    assert not loaded & {"cryptography", "ssl", "socket", "json", "pki", "protocol", "selectors"}, loaded


def test_the_resident_has_every_frozen_class_made(tmp_path: Path) -> None:
    """So that no child pays for them: after warm_up, making an instance builds nothing."""
    done = subprocess.run([sys.executable, "-c", "from client.resident import warm_up; import pki.frozen as f;"
                           " warm_up(); print(sum('__frozen_compare__' not in c.__dict__ for c in f.CLASSES),"
                           " len(f.CLASSES))"], capture_output=True, text=True, cwd=ROOT, timeout=DEADLINE_S)
    missing, total = map(int, done.stdout.split())
    assert (missing, total > 20) == (0, True), done.stderr


# ------------------------------------------------------------------------------------ the child's world
def test_files_named_by_descriptor_reach_the_child(relay: Any, user: Any, home: Home) -> None:
    """``--p12 /dev/fd/N`` (what ``<(...)`` gives): the child has the launcher's open files at their numbers."""
    bob, bob_state = user("MSG_CLI2")
    _warm(home, relay, bob, bob_state)
    with open(bob, "rb") as keystore:
        fd = keystore.fileno()
        done = subprocess.run([str(MSG_CLIENT), "-v", *_client_args(relay, f"/dev/fd/{fd}"), "--state-dir",
                               str(bob_state), "askqueue"], capture_output=True, text=True, cwd=ROOT, env=home.env,
                              pass_fds=(fd,), timeout=DEADLINE_S)
    assert done.returncode == 0 and RUN_BY_RESIDENT in done.stderr, done.stderr


def test_the_resident_holds_none_of_the_files_of_the_command_that_started_it(relay: Any, user: Any,
                                                                             home: Home) -> None:
    """A pipe the first command inherited (``{ msg-client ...; } | cat`` with a copy on fd 7) must not be
    held open by the resident for minutes: the reader would never see its end."""
    bob, bob_state = user("MSG_CLI2")
    read_end, write_end = os.pipe()
    try:
        first = subprocess.run([str(MSG_CLIENT), *_client_args(relay, bob), "--state-dir", str(bob_state),
                                "askqueue"], capture_output=True, cwd=ROOT, env=home.env, pass_fds=(write_end,),
                               timeout=DEADLINE_S)
        assert first.returncode == 0, first.stderr
        pid = home.wait_for_resident()
        pipe = f"pipe:[{os.fstat(write_end).st_ino}]"
        held = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        assert pipe not in held, held
    finally:
        os.close(read_end), os.close(write_end)


def test_a_command_that_reads_the_terminal_is_handed_back(relay: Any, user: Any, home: Home) -> None:
    """A body typed at a terminal: a child has no terminal of its own (Ctrl-Z, job control), so the
    command comes back to the launcher before anything is done, and runs there."""
    import pty

    alice, alice_state = user("MSG_CLI1")
    bob, bob_state = user("MSG_CLI2")
    _warm(home, relay, bob, bob_state)
    controller, terminal = pty.openpty()
    try:
        os.write(controller, b"typed at the terminal\n\x04")  # the line, then Ctrl-D
        done = subprocess.run([str(MSG_CLIENT), "-v", *_client_args(relay, alice), "--state-dir", str(alice_state),
                               "send", "MSG_CLI2", "typed"], stdin=terminal, capture_output=True, text=True,
                              cwd=ROOT, env=home.env, timeout=DEADLINE_S)
    finally:
        os.close(controller), os.close(terminal)
    assert done.returncode == 0, done.stderr
    assert "msg-client: the command reads the terminal: run here" in done.stderr
    assert done.stderr.count("type the message, end with Ctrl-D") == 1  # shown once, by the launcher
    listed = home.run(*_client_args(relay, bob), "--state-dir", str(bob_state), "askqueue")
    assert listed.stdout.strip().endswith(":typed"), listed


def test_a_password_prompt_is_preceded_by_the_hook(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """PasswordSource calls before_prompt before it reads the terminal (the child hands the command back)."""
    import getpass

    from pki.passwords import PasswordSource

    class Tty:
        def isatty(self) -> bool:
            return True

    order: list[str] = []
    monkeypatch.setattr(sys, "stdin", Tty())
    monkeypatch.setattr(getpass, "getpass", lambda prompt: order.append("read") or "pw")
    monkeypatch.delenv("MSG_RELAY_PASSWORD", raising=False)
    assert PasswordSource(before_prompt=lambda: order.append("hook")).obtain("x") == b"pw"
    assert order == ["hook", "read"]
    monkeypatch.setattr(launch, "IN_CHILD", True)
    with pytest.raises(launch.TerminalNeeded):
        PasswordSource(before_prompt=launch.before_terminal_input).obtain("x")
    assert order == ["hook", "read"]  # the terminal was not read


def test_a_killed_launcher_takes_its_command_with_it(relay: Any, user: Any, home: Home) -> None:
    """``kill -9`` of msg-client during ``watch``: the child does not run on, orphaned."""
    alice, alice_state = user("MSG_CLI1")
    bob, bob_state = user("MSG_CLI2")
    _warm(home, relay, bob, bob_state)
    sent = home.run(*_client_args(relay, alice), "--state-dir", str(alice_state), "send", "MSG_CLI2", "first",
                    stdin=b"x")
    assert sent.returncode == 0, sent.stderr
    proc = subprocess.Popen([str(MSG_CLIENT), "-v", *_client_args(relay, bob), "--state-dir", str(bob_state),
                             "watch"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=home.env)
    try:
        assert proc.stderr is not None and proc.stdout is not None
        line = proc.stderr.readline()
        assert line.startswith(RUN_BY_RESIDENT), line
        assert proc.stdout.readline().endswith(":first\n")  # the child is past the go-ahead, watching
        proc.kill()
        proc.wait(DEADLINE_S)
    finally:
        proc.kill()
    _gone(int(line.rsplit(" ", 1)[1]))


# ------------------------------------------------------------------------------------ the rules' corners
def test_a_peer_in_other_namespaces_is_refused() -> None:
    """A sandbox of ours (another mount or network namespace) neither serves nor is served."""
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        own = launch.namespaces("self")
        assert own is not None
        launch.check_peer(a, os.getuid(), own)  # the control: this very process
        with pytest.raises(launch.Unsafe, match="other namespaces"):
            launch.check_peer(a, os.getuid(), [n + 1 for n in own])
        with pytest.raises(launch.Unsafe, match="another user"):
            launch.check_peer(a, os.getuid() + 1, own)


def test_the_identity_covers_what_decides_the_code(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another PYTHONPATH or OpenSSL configuration is another resident (PATH is not)."""
    base = identity({})
    assert identity({"PYTHONPATH": "/elsewhere"}) != base
    assert identity({"CRYPTOGRAPHY_OPENSSL_NO_LEGACY": "1"}) != base
    assert identity({"LD_PRELOAD": "/usr/lib/torsocks/libtorsocks.so"}) != base  # torsocks is not bypassed
    assert identity({"PATH": "/bin"}) == base


def test_the_identity_covers_the_process_context_a_child_inherits() -> None:
    """A launcher under ``nice`` or ``ulimit`` (or a sandbox's seccomp, capabilities, CPUs) would have
    its command run with the resident's settings: it gets a resident of its own instead."""
    probe = [sys.executable, "-c", "from client.launch import identity; print(identity({}))"]
    plain = subprocess.run(probe, capture_output=True, text=True, cwd=ROOT, timeout=DEADLINE_S).stdout
    assert plain == identity({}) + "\n"
    def smaller_files() -> None:  # ulimit -f
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    for change in (lambda: os.nice(1), smaller_files):
        other = subprocess.run(probe, capture_output=True, text=True, cwd=ROOT, timeout=DEADLINE_S,
                               preexec_fn=change).stdout
        assert other and other != plain


def test_a_relative_data_home_and_a_socket_path_too_long_are_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", "relative/dir")
    assert launch.resident_dir() == os.path.join(os.path.expanduser("~"), ".local", "share", "msg-relay", "resident")
    with pytest.raises(launch.Unsafe, match="too long for a socket"):
        launch.socket_path("/" + "d" * 100, identity())
    assert len(launch.temporary_path("/a/b.sock")) <= len("/a/b.sock")  # what the resident binds fits too


def test_the_lock_is_never_opened_through_a_link(tmp_path: Path) -> None:
    """Someone who could swap the resident's directory plants a link (or a hard link) at the lock's
    name: the resident does not follow it, so it truncates no file of ours."""
    victims = [tmp_path / "soft-victim.p12", tmp_path / "hard-victim.p12"]
    for victim in victims:
        victim.write_bytes(b"precious")
    (tmp_path / "soft.lock").symlink_to(victims[0])
    os.link(victims[1], tmp_path / "hard.lock")
    assert resident._lock(str(tmp_path / "soft.lock")) == -1
    assert resident._lock(str(tmp_path / "hard.lock")) == -1
    assert [v.read_bytes() for v in victims] == [b"precious"] * 2
    fd = resident._lock(str(tmp_path / "plain.lock"))  # the control
    try:
        assert fd >= 0 and (tmp_path / "plain.lock").read_text() == f"{os.getpid()}\n"
    finally:
        os.close(fd)


def test_a_resident_started_for_another_identity_leaves_at_once(home: Home) -> None:
    """The socket's name must be this installation's: else it would decline every command for ever."""
    launch.private_dir(str(home.dir), create=True)
    done = subprocess.run([sys.executable, "-P", "-m", "client.resident", str(home.dir / "0badc0de.sock")],
                          cwd=ROOT, env=home.env, capture_output=True, timeout=DEADLINE_S)
    assert done.returncode == 1 and not (home.dir / "0badc0de.lock").exists()


def test_files_that_can_be_read_once_keep_the_command_here(relay: Any, user: Any, home: Home,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A device named on the command line (``--password-file /dev/tty``: the child has no terminal), or a
    pipe when the command may be handed back (stdin a terminal: a rerun would find the pipe empty)."""
    read_end, write_end = os.pipe()
    try:
        pipe = f"/dev/fd/{read_end}"
        monkeypatch.setattr(os, "isatty", lambda fd: False)
        assert launch.read_once(["askqueue", pipe, str(ROOT / "README.md"), "--p12"]) is None
        assert launch.read_once(["--crl", "/dev/null"]) == "/dev/null"
        monkeypatch.setattr(os, "isatty", lambda fd: True)
        assert launch.read_once(["--p12", pipe]) == pipe
    finally:
        os.close(read_end), os.close(write_end)
    monkeypatch.undo()
    bob, bob_state = user("MSG_CLI2")
    _warm(home, relay, bob, bob_state)
    done = home.run("-v", *_client_args(relay, bob), "--state-dir", str(bob_state), "--password-file", "/dev/null",
                    "askqueue")
    assert "msg-client: no resident starter: /dev/null can be read only once, or only with a terminal" in done.stderr
    assert RUN_BY_RESIDENT not in done.stderr


def test_a_parent_that_ignores_sigchld_still_gets_its_command_run(relay: Any, user: Any, home: Home) -> None:
    """The first command starts a resident and waits for the short-lived process between: with SIGCHLD
    ignored the kernel has reaped it already, which is no reason for a traceback."""
    bob, bob_state = user("MSG_CLI2")
    done = subprocess.run([str(MSG_CLIENT), *_client_args(relay, bob), "--state-dir", str(bob_state), "askqueue"],
                          capture_output=True, text=True, cwd=ROOT, env=home.env, timeout=DEADLINE_S,
                          preexec_fn=lambda: signal.signal(signal.SIGCHLD, signal.SIG_IGN))
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    home.wait_for_resident()
