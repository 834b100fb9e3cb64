"""The command lines say what was wrong: msg-client's command errors, help, terminal input and
Ctrl-C; the root shims without an activated virtualenv; msg-server's refusals before it listens."""

from __future__ import annotations

import os
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from client import cli as client_cli
from client.cli import COMMAND_ERROR, HELP, INTERRUPTED, TERMINAL_PROMPT
from pki.keystore import save_keystore
from protocol.frames import MAX_FRAME_LIMIT, MIN_FRAME_LIMIT
from server import cli as server_cli
from server.cli import NO_CRL_WARNING

from .harness import run_client

ROOT = Path(__file__).resolve().parent.parent
BASE_PYTHON = getattr(sys, "_base_executable", None) or shutil.which("python3") or "python3"
CRL_HINT = "give --crl FILE, or --no-crl to run without revocation checks"


# ---------------------------------------------------------------- msg-client: command errors, help


@pytest.mark.parametrize(("argv", "problem"), [
    (["getmsg", "abc"], "getmsg needs a message number, got 'abc'"),
    (["getmsg", "0"], "getmsg needs a message number, got '0'"),
    (["getmsg"], "getmsg needs a message number"),
    (["getmsg", "1", "2"], "getmsg needs one message number, got 2 arguments"),
    (["send", "MSG_CLI2"], "send needs <UID> <SUBJECT>"),
    (["send", "MSG_CLI2", "lunch", "at", "noon"],
     "send needs <UID> <SUBJECT>, got 4 arguments (quote a subject with spaces)"),
    (["send", "no/such uid", "lunch"], "send needs a UID (1-64 of A-Z a-z 0-9 _ . @ -), got 'no/such uid'"),
    (["send", "BEN,,CARL", "lunch"], "send needs a UID (1-64 of A-Z a-z 0-9 _ . @ -), got ''"),
    (["watch", "--all"], "watch takes only --open, got '--all'"),
    (["watch", "--open", "x"], "watch takes only --open, got '--open x'"),
    (["alias", "set", "TEAM"], "alias needs set NAME UID1,UID2,... or list or rm NAME"),
    (["alias", "list", "x"], "alias needs set NAME UID1,UID2,... or list or rm NAME"),
    (["alias"], "alias needs set NAME UID1,UID2,... or list or rm NAME"),
    (["foo"], "unknown command 'foo'"),
    ([], "no command given"),
    (["askqueue", "x"], "askqueue takes no arguments, got 'x'"),
    (["--kem", "RSA", "askqueue"], "argument --kem: invalid choice: 'RSA' (choose from 'MLKEM768_X25519', 'X25519')"),
    (["--bogus", "askqueue"], "unrecognized arguments: --bogus"),
])
def test_command_error_names_the_problem_then_the_usage(argv: list[str], problem: str,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    code = client_cli.main(argv)
    err = capsys.readouterr().err.splitlines()
    assert code == 1
    assert err[0] == COMMAND_ERROR  # the service's contract, unchanged
    assert err[1] == problem
    assert err[2:] == HELP.splitlines()


@pytest.mark.parametrize("argv", [["-h"], ["--help"], ["help"], ["getmsg", "--help"], ["-user", "x.p12", "-h"]])
def test_help_flags_print_help_and_exit_0(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code = client_cli.main(argv)
    out, err = capsys.readouterr()
    assert (code, out, err) == (0, HELP + "\n", "")


# ---------------------------------------------------------------- msg-client: Ctrl-C and terminals


def test_keyboard_interrupt_anywhere_exits_130_with_one_line(monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    def interrupted(*_: Any, **__: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(client_cli, "load_keystore", interrupted)  # e.g. Ctrl-C at the password prompt
    r = run_client("127.0.0.1:1", tmp_path / "x.p12", "askqueue", state=tmp_path / "st")
    assert (r.code, r.out, r.err) == (130, "", INTERRUPTED + "\n")
    monkeypatch.setattr(client_cli, "build_parser", interrupted)  # before any command runs
    r = run_client("127.0.0.1:1", tmp_path / "x.p12", "askqueue")
    assert (r.code, r.out, r.err) == (130, "", INTERRUPTED + "\n")


# A child whose controlling terminal is the pty on its stdin (so typing ^C there sends SIGINT),
# then msg-client's main() with the remaining arguments.
_ON_TERMINAL = ("import fcntl, os, sys, termios; os.setsid(); fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
                "from client.cli import main; sys.exit(main())")


def _read_until(fd: int, seen: bytes, needle: bytes, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    while needle not in seen:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no {needle!r} within {timeout}s; got {seen!r}"
        if select.select([fd], [], [], remaining)[0]:
            chunk = os.read(fd, 4096)
            assert chunk, f"closed before {needle!r}; got {seen!r}"
            seen += chunk
    return seen


class TerminalClient:
    """msg-client with a pseudo-terminal as stdin and its controlling terminal; stdout and stderr piped."""

    def __init__(self, *args: str) -> None:
        self.master, slave = os.openpty()
        try:
            self.proc = subprocess.Popen([sys.executable, "-c", _ON_TERMINAL, *args], cwd=ROOT, stdin=slave,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        finally:
            os.close(slave)
        self.err = b""
        self.screen = b""  # what the child wrote to the terminal (prompts, echo)

    def wait_for_stderr(self, line: str, timeout: float = 30) -> None:
        """Read stderr until ``line`` has appeared: the child is then blocked reading the terminal."""
        assert self.proc.stderr is not None
        self.err = _read_until(self.proc.stderr.fileno(), self.err, line.encode() + b"\n", timeout)

    def wait_for_terminal(self, text: str, timeout: float = 30) -> None:
        self.screen = _read_until(self.master, self.screen, text.encode(), timeout)

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def finish(self, timeout: float = 30) -> tuple[int, str, str]:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            raise
        finally:
            os.close(self.master)
        return self.proc.returncode, out.decode(), (self.err + err).decode()


def test_send_from_a_terminal_says_how_to_end_the_body(relay: Any, user: Any) -> None:
    bob, bob_state = user("MSG_CLI2")
    assert run_client(relay, bob, "askqueue", state=bob_state).code == 0  # Bob publishes his key
    alice, alice_state = user("MSG_CLI1")
    term = TerminalClient("--server", relay.address, "--p12", str(alice), "--state-dir", str(alice_state),
                          "send", "MSG_CLI2", "lunch")
    term.wait_for_stderr(TERMINAL_PROMPT)
    term.type(b"See you at noon.\n\x04")  # Ctrl-D at the start of a line ends the body
    code, out, err = term.finish()
    assert (code, err) == (0, TERMINAL_PROMPT + "\n") and out.startswith("sent ")
    r = run_client(relay, bob, "getmsg", "1", state=bob_state)
    assert r.code == 0 and r.out_bytes.endswith(b"\n\nSee you at noon.\n")


def test_first_ctrl_c_stops_a_terminal_send_with_130(demo_dir: Path, tmp_path: Path) -> None:
    """asyncio.run's SIGINT handler only cancels the task, which a blocking read never sees: the
    first Ctrl-C must stop the read by itself, with one line and exit code 130."""
    term = TerminalClient("--server", "127.0.0.1:1", "--p12", str(demo_dir / "MSG_CLI1.p12"),
                          "--state-dir", str(tmp_path / "st"), "send", "MSG_CLI2", "lunch")
    term.wait_for_stderr(TERMINAL_PROMPT)
    term.type(b"half a mess")
    term.type(b"\x03")  # one Ctrl-C, typed on the terminal
    code, out, err = term.finish(timeout=15)
    assert (code, out, err) == (130, "", f"{TERMINAL_PROMPT}\n{INTERRUPTED}\n")


def test_first_ctrl_c_stops_the_password_prompt_with_130(alice: Any, tmp_path: Path) -> None:
    protected = tmp_path / "alice.p12"
    save_keystore(protected, alice, b"correct horse")
    term = TerminalClient("--server", "127.0.0.1:1", "--p12", str(protected), "--state-dir", str(tmp_path / "st"),
                          "askqueue")
    term.wait_for_terminal(f"Password for {protected}: ")  # getpass writes to the terminal itself
    term.type(b"\x03")
    code, out, err = term.finish(timeout=15)
    assert (code, out, err) == (130, "", INTERRUPTED + "\n")


def test_piped_body_gets_no_terminal_prompt(relay: Any, user: Any) -> None:
    bob, bob_state = user("MSG_CLI2")
    assert run_client(relay, bob, "askqueue", state=bob_state).code == 0
    alice, alice_state = user("MSG_CLI1")
    r = run_client(relay, alice, "send", "MSG_CLI2", "piped", stdin=b"body", state=alice_state)
    assert r.code == 0 and r.err == ""


def test_help_into_a_full_disk_or_a_closed_stdout_is_no_traceback() -> None:
    """``msg-client help > /dev/full``: one line naming the failure, exit 1; with stdout closed, nothing."""
    env = {**os.environ, "MSG_CLIENT_RESIDENT": "off"}
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "client.cli", "help"], stdout=full, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT, env=env, timeout=60)
    assert (done.returncode, done.stderr) == (1, "msg-client: No space left on device\n")
    closed = subprocess.run(["sh", "-c", 'exec "$0" -m client.cli help >&-', sys.executable], capture_output=True,
                            text=True, cwd=ROOT, env=env, timeout=60)
    assert (closed.returncode, closed.stderr) == (0, "")


def test_askqueue_into_a_pipe_closed_early_ends_quietly(relay: Any, user: Any) -> None:
    """The listing is written at the end, in one go: a reader that went away (``| head``, closed at once
    here) must still make a quiet exit 0, not a BrokenPipeError at the interpreter's exit."""
    bob, bob_state = user("MSG_CLI2")
    assert run_client(relay, bob, "askqueue", state=bob_state).code == 0
    alice, alice_state = user("MSG_CLI1")
    assert run_client(relay, alice, "send", "MSG_CLI2", "piped", stdin=b"body", state=alice_state).code == 0
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will ever read the listing
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout block-buffered, as usual
    done = subprocess.run([sys.executable, "-m", "client.cli", "--server", relay.address, "--p12", str(bob),
                           "--state-dir", str(bob_state), "askqueue"], cwd=ROOT, env=env, stdout=write_end,
                          stderr=subprocess.PIPE, timeout=60)
    os.close(write_end)
    assert (done.returncode, done.stderr) == (0, b"")

# ---------------------------------------------------------------- the shims without an activated venv


def _plain_env() -> dict[str, str]:
    """The environment of a shell where the virtualenv was never activated."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "MSG_RELAY_VENV_REEXEC")}
    venv_bin = str(ROOT / ".venv" / "bin")
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    return env


def test_base_interpreter_is_not_the_project_venv() -> None:
    """The premise of the shim tests: BASE_PYTHON lacks the venv (and, today, its dependencies)."""
    prefix = subprocess.run([BASE_PYTHON, "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True,
                            timeout=30, env=_plain_env()).stdout.strip()
    assert Path(prefix).resolve() != (ROOT / ".venv").resolve()


@pytest.mark.parametrize(("script", "args", "expected"), [
    ("msg_client.py", ["help"], "getmsg <NUM>           print message NUM and mark it read"),
    ("msg_server.py", ["--help"], "--no-crl"),
    ("scripts/inspect_cert.py", ["--help"], "usage: msg-pki inspect"),
])
def test_shims_run_under_the_project_venv_from_a_plain_python(script: str, args: list[str], expected: str) -> None:
    if not (ROOT / ".venv" / "bin" / "python").exists():
        pytest.skip("no .venv in this checkout")
    res = subprocess.run([BASE_PYTHON, script, *args], cwd=ROOT, env=_plain_env(), capture_output=True, text=True,
                         timeout=60)
    assert (res.returncode, res.stderr) == (0, "") and expected in res.stdout


@pytest.mark.parametrize(("script", "missing"), [
    ("msg_client.py", "client"), ("msg_server.py", "server"), ("scripts/inspect_cert.py", "pki"),
])
def test_shims_without_venv_or_packages_say_run_make_install(script: str, missing: str, tmp_path: Path) -> None:
    (tmp_path / script).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / script, tmp_path / script)  # a checkout with neither .venv nor the packages
    (tmp_path / "scripts").mkdir(exist_ok=True)
    shutil.copy(ROOT / "scripts" / "project_venv.py", tmp_path / "scripts" / "project_venv.py")
    res = subprocess.run([BASE_PYTHON, script, "help"], cwd=tmp_path, env=_plain_env(), capture_output=True,
                         text=True, timeout=60)
    name = Path(script).name
    assert (res.returncode, res.stdout) == (2, "")
    assert res.stderr == f"{name}: No module named '{missing}': run make install first\n"


# ---------------------------------------------------------------- msg-server: refused before it listens


@pytest.fixture()
def served(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[Any]:
    """Replace the relay itself: each call records (config, audit) instead of listening. Runs in an
    empty directory, so the default CRL and keystore paths do not exist."""
    calls: list[Any] = []

    async def fake_serve(config: Any, audit: Any = None) -> None:
        calls.append((config, audit))

    monkeypatch.setattr(server_cli, "serve", fake_serve)
    monkeypatch.chdir(tmp_path)
    return calls


@pytest.fixture()
def crl_file(tmp_path: Path) -> Path:
    path = tmp_path / "crl.pem"  # existence is all the CLI checks; the server parses it
    path.write_text("")
    return path


def _server(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = server_cli.main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("value", [MIN_FRAME_LIMIT - 1, MAX_FRAME_LIMIT + 1, 0])
def test_max_frame_outside_the_limits_is_refused(value: int, served: list[Any], crl_file: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _server(["--crl", str(crl_file), "--max-frame", str(value)], capsys)
    assert (code, err) == (2, f"msg-server: error: --max-frame must be between {MIN_FRAME_LIMIT} and "
                              f"{MAX_FRAME_LIMIT} bytes, not {value}\n")
    assert served == []


@pytest.mark.parametrize("value", [MIN_FRAME_LIMIT, MAX_FRAME_LIMIT])
def test_max_frame_limits_themselves_are_accepted(value: int, served: list[Any], crl_file: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert _server(["--crl", str(crl_file), "--max-frame", str(value)], capsys) == (0, "")
    assert served[0][0].max_frame == value


@pytest.mark.parametrize(("argv", "line"), [
    (["--port", "70000"], "--port must be 0-65535, not 70000"),
    (["--max-per-user", "0"], "--max-connections, --max-handshakes and --max-per-user must be at least 1"),
])
def test_port_and_connection_limits_are_refused(argv: list[str], line: str, served: list[Any], crl_file: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert _server(["--crl", str(crl_file), *argv], capsys) == (2, f"msg-server: error: {line}\n")
    assert served == []


def test_default_crl_is_the_demo_cas_and_its_absence_names_both_fixes(
        served: list[Any], capsys: pytest.CaptureFixture[str]) -> None:
    assert _server([], capsys) == (2, f"msg-server: error: CRL file certs/ca/crl.pem not found: {CRL_HINT}\n")
    Path("certs/ca").mkdir(parents=True)
    Path("certs/ca/crl.pem").write_text("")
    assert _server([], capsys) == (0, "")
    assert served[0][0].crl == "certs/ca/crl.pem" and served[0][0].no_crl is False


def test_missing_crl_file_is_refused(served: list[Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere" / "crl.pem"
    code, err = _server(["--crl", str(missing)], capsys)
    assert (code, err) == (2, f"msg-server: error: CRL file {missing} not found: {CRL_HINT}\n")
    assert served == []


def test_no_crl_warns_and_runs_without_one(served: list[Any], capsys: pytest.CaptureFixture[str]) -> None:
    assert _server(["--no-crl", "--crl-warn-days", "3"], capsys) == (0, NO_CRL_WARNING + "\n")
    config = served[0][0]
    assert (config.crl, config.no_crl, config.crl_warn_days) == (None, True, 3.0)


def test_crl_warn_days_reaches_the_config(served: list[Any], crl_file: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert _server(["--crl", str(crl_file), "--crl-warn-days", "1.5"], capsys) == (0, "")
    config = served[0][0]
    assert (config.crl, config.no_crl, config.crl_warn_days) == (str(crl_file), False, 1.5)


def test_crl_and_no_crl_together_are_refused(served: list[Any], crl_file: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        server_cli.main(["--crl", str(crl_file), "--no-crl"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == \
        "msg-server: error: argument --no-crl: not allowed with argument --crl"
    assert served == []


def test_log_file_it_cannot_open_is_named_before_listening(served: list[Any], crl_file: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "no-such-dir" / "audit.log"
    code, err = _server(["--crl", str(crl_file), "--log-file", str(log)], capsys)
    assert (code, err) == (2, f"msg-server: error: cannot open log file {log} (No such file or directory)\n")
    assert served == []  # refused before the server (and its socket) exists


def test_log_file_is_opened_and_handed_to_the_server(served: list[Any], crl_file: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "audit.log"
    assert _server(["--crl", str(crl_file), "--log-file", str(log)], capsys) == (0, "")
    assert log.exists() and served[0][1] is not None


def test_missing_users_dir_is_refused(served: list[Any], crl_file: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "users"
    code, err = _server(["--crl", str(crl_file), "--users-dir", str(missing)], capsys)
    assert (code, err) == (2, f"msg-server: error: --users-dir {missing}: no such directory\n")
    assert served == []


def test_every_server_option_help_shows_its_default(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # one line per option, so each block below is one option
    with pytest.raises(SystemExit) as exc:
        server_cli.main(["--help"])
    assert exc.value.code == 0
    options = capsys.readouterr().out.split("options:\n", 1)[1]
    blocks = re.split(r"\n(?=  -)", options.strip("\n"))
    assert len(blocks) > 15
    for block in blocks:
        if not block.lstrip().startswith("-h, --help"):
            assert "(default: " in block, block


# ------------------------------------------------------------------ what a command costs (issue 14)
def _fresh_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=ROOT)


def test_a_command_line_start_imports_no_event_loop_no_logging_no_pyopenssl() -> None:
    """asyncio (with concurrent.futures) and logging cost about a fifth of what a one-shot command adds to
    the interpreter, pyOpenSSL more (each is loaded only by what needs it: watch, a due log line, a path
    validation)."""
    done = _fresh_python("import sys, client.cli; "
                         "print(sorted({'asyncio', 'concurrent', 'logging', 'OpenSSL'} & set(sys.modules)))")
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


def test_one_shot_commands_run_without_an_event_loop_or_logging(relay: Any, user: Any) -> None:
    """The same for whole commands, their own paths included (what they import when they run)."""
    report = ("import sys; from client.cli import main; rc = main(sys.argv[1:]); "
              "print(sorted({'asyncio', 'concurrent', 'logging'} & set(sys.modules)), file=sys.stderr); sys.exit(rc)")

    def run(p12: Path, state: Path, *args: str, stdin: bytes = b"") -> None:
        done = subprocess.run([sys.executable, "-c", report, "--server", relay.address, "--p12", str(p12),
                               "--state-dir", str(state), *args], input=stdin, capture_output=True, timeout=60,
                              cwd=ROOT)
        assert done.returncode == 0 and done.stderr.decode().splitlines()[-1] == "[]", (args, done.stderr)

    bob, bob_state = user("MSG_CLI2")
    alice, alice_state = user("MSG_CLI1")
    run(bob, bob_state, "askqueue")  # publishes Bob's key
    run(alice, alice_state, "send", "MSG_CLI2", "no loop", stdin=b"body")
    run(bob, bob_state, "askqueue")
    run(bob, bob_state, "getmsg", "1")


def test_the_command_line_log_drops_what_is_not_due_and_formats_what_is() -> None:
    done = _fresh_python("import sys; from client.log import log; log.for_command_line(False); "
                         "log.debug('hidden %s', 1); log.info('hidden'); print('logging' in sys.modules); "
                         "log.warning('shown %s', 2)")
    assert done.stdout.strip() == "False" and done.stderr == "WARNING msg_relay.client: shown 2\n", done
    verbose = _fresh_python("from client.log import log; log.for_command_line(True); log.debug('seen %s', 3)")
    assert verbose.stderr == "DEBUG msg_relay.client: seen 3\n", verbose
