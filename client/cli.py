"""``msg-client``: the original service's command line, on top of :class:`Mailbox`.

    msg-client [--p12 FILE | -user FILE] [--server HOST:PORT] [--ca FILE] send <UID> <SUBJECT>
    msg-client ... askqueue | getmsg <NUM> | receipts | help

Exactly three fixed error lines (DESIGN.md §7); every other failure is one clear line. A command
error names its problem on the line after the fixed one, then shows the usage. Exit code 0 on success,
1 on any error, 130 when interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NoReturn

from pki.errors import MsgRelayError
from pki.files import load_certificate_file, load_crl_file, read_bytes, write_atomic
from pki.identity import cert_fingerprint, is_valid_uid
from pki.keystore import load_keystore
from pki.passwords import PasswordSource
from pki.terminal import visible
from pki.validation import TrustPolicy
from protocol.encoding import format_time
from protocol.envelope import MAX_BODY, NoSuchKey, VerificationError, check_subject
from protocol.errors import ErrorCode
from protocol.keyrecord import DEFAULT_KEM, KEMS
from protocol.messages import RemoteError

from .aliases import Aliases, split_recipients
from .blocking import BlockingRelayClient, run_blocking
from .errors import ClientError
from .keys import Keyring
from .launch import INTERRUPTED, before_terminal_input, wants_verbose
from .log import log
from .mailbox import Mailbox, QueueLine, ReadMessage, Unreadable
from .operations import RelayOperations
from .state import ClientState, default_state_dir

COMMAND_ERROR = "MSG RELAY SERVICE: command error!"
UNKNOWN_MESSAGE = "MSG RELAY SERVICE: unknown message!"
VERIFICATION_ERROR = "MSG RELAY SERVICE: verification error!"

UNVERIFIABLE = "(unverifiable)"  # askqueue's subject for a line whose sender or time does not verify
TERMINAL_PROMPT = "type the message, end with Ctrl-D"

HELP = """usage: msg-client [options] COMMAND

commands:
  send <UID> <SUBJECT>   send a message to UID; the body is read from stdin (at most 1000 bytes;
                         from a terminal, end it with Ctrl-D); UID1,UID2,... (at most 32) or an
                         alias sends one message to several, each seeing the others (Cc:)
  askqueue               list unread messages: <NUM>:<SENDER>:<TIME>:<SUBJECT>
  getmsg <NUM>           print message NUM and mark it read
  watch [--open]         list unread messages, then each new one the moment it arrives (with
                         --open: print each one like getmsg and mark it read); Ctrl-C ends it
  alias set NAME UID1,UID2,...   a name for a group of recipients (kept in the state directory)
  alias list | alias rm NAME
  receipts               list the relay's receipts for messages you sent
  rotate-key             make and publish a new encryption key (old ones kept, decrypt-only)
  keys export FILE       write this device's encryption keys (private halves too) to FILE, 0600
  keys import FILE       use the keys another device exported (its current key becomes ours)
  help                   this text

options:
  --p12 FILE, -user FILE keystore (default userdata.p12)
  --server HOST:PORT     relay address (default 127.0.0.1:7777); HOST:PORT,HOST:PORT,... for the
                         nodes of a cluster, tried in turn
  --ca FILE              trust anchor (default: the CA certificate bundled in the keystore)
  --crl FILE             CA's CRL for checking senders (default: the one the relay publishes)
  --no-crl               go on without revocation checks when no CRL is to be had
  --password-file FILE   keystore password (or MSG_RELAY_PASSWORD, or a prompt)
  --state-dir DIR        local state (default ~/.local/share/msg-relay/<UID>-<CA fingerprint>)
  --kem KEM              encryption key type for new keys: MLKEM768_X25519 (default) or X25519
  --timeout S            seconds to wait for the relay (default 30)
  --verbose, -v          details of errors and debug logging
  --help, -h             this text

The first command starts a resident starter that runs the next ones faster (it holds no key or
password); MSG_CLIENT_RESIDENT=off runs each command in a process of its own and starts none."""


class CommandError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise CommandError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="msg-client", add_help=False)
    p.add_argument("--p12", "-user", dest="p12", default="userdata.p12")
    p.add_argument("--server", default="127.0.0.1:7777")
    p.add_argument("--ca")
    p.add_argument("--crl")
    p.add_argument("--no-crl", action="store_true")
    p.add_argument("--password-file")
    p.add_argument("--state-dir")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--kem", default=DEFAULT_KEM, choices=KEMS)
    p.add_argument("--verbose", "-v", action="store_true")
    p.add_argument("--help", "-h", action="store_true")
    p.add_argument("command", nargs="?")
    p.add_argument("args", nargs=argparse.REMAINDER)
    return p


def _fail(line: str, detail: str | None = None, verbose: bool = False) -> int:
    """One line on stderr (and the detail with --verbose); text from elsewhere cannot drive the terminal."""
    print(visible(line), file=sys.stderr)
    if detail and verbose:
        print(f"  reason: {visible(detail)}", file=sys.stderr)
    return 1


def printable_body(body: bytes) -> bytes:
    """The body as shown on a terminal: escape sequences and other controls made visible, so a
    message cannot drive the reader's terminal. Piped or redirected output stays byte-exact."""
    return visible(body.decode("utf-8", "replace"), keep="\n\t").encode()


def parse_servers(text: str) -> list[tuple[str, int]]:
    """``HOST:PORT[,HOST:PORT...]``: the nodes of one relay (a cluster), tried in turn."""
    return [parse_server(part.strip()) for part in text.split(",")]


def parse_server(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT``."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ClientError(f"--server must be HOST:PORT, not {text!r}")
    return host, int(port)


@contextlib.contextmanager
def _sigint_interrupts(on_event_loop: bool) -> Iterator[None]:
    """Make Ctrl-C raise KeyboardInterrupt at once during a blocking read on the event loop (``watch``).

    Inside ``asyncio.run`` the first SIGINT only cancels the main task, which a thread blocked in
    ``read()`` never notices: the user had to press Ctrl-C twice. Python's default handler raises
    in the reading thread instead (only the main thread may change signal handlers). Other commands
    run no event loop: Python's handler is in place already.
    """
    if not on_event_loop:
        yield
        return
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _read_body() -> bytes:
    """The body from stdin; on a terminal, first say how to end it (else it looks like a hang)."""
    stream = sys.stdin.buffer if sys.stdin is not None else None
    if stream is None:
        return b""
    if sys.stdin.isatty():  # send runs no event loop: Ctrl-C stops the read at once (see _sigint_interrupts)
        before_terminal_input()
        print(TERMINAL_PROMPT, file=sys.stderr, flush=True)
    body = stream.read(MAX_BODY + 1)
    if len(body) > MAX_BODY:
        raise ClientError(f"message body longer than {MAX_BODY} bytes: nothing sent")
    return body


COMMANDS = ("send", "askqueue", "getmsg", "watch", "receipts", "rotate-key", "keys", "alias", "help")


def _validate_command(command: str | None, args: list[str]) -> None:
    """Refuse a malformed command with a message naming what is wrong (shown under COMMAND_ERROR)."""
    if command is None:
        raise CommandError("no command given")
    if command not in COMMANDS:
        raise CommandError(f"unknown command {command!r}")
    if command == "send":
        if len(args) < 2:
            raise CommandError("send needs <UID> <SUBJECT>")
        if len(args) > 2:
            raise CommandError(f"send needs <UID> <SUBJECT>, got {len(args)} arguments "
                               "(quote a subject with spaces)")
        bad = next((part for part in args[0].split(",") if not is_valid_uid(part.strip())), None)
        if bad is not None:
            raise CommandError(f"send needs a UID (1-64 of A-Z a-z 0-9 _ . @ -), got {bad!r}")
    elif command == "getmsg":
        if not args:
            raise CommandError("getmsg needs a message number")
        if len(args) > 1:
            raise CommandError(f"getmsg needs one message number, got {len(args)} arguments")
        if not (args[0].isdigit() and 0 < int(args[0]) < 2**53):
            raise CommandError(f"getmsg needs a message number, got {args[0]!r}")
    elif command == "keys":
        if len(args) != 2 or args[0] not in ("export", "import"):
            raise CommandError("keys needs export FILE or import FILE")
    elif command == "watch":
        if args not in ([], ["--open"]):
            raise CommandError(f"watch takes only --open, got {' '.join(args)!r}")
    elif command == "alias":
        if not (args == ["list"] or len(args) == 2 and args[0] == "rm" or len(args) == 3 and args[0] == "set"):
            raise CommandError("alias needs set NAME UID1,UID2,... or list or rm NAME")
    elif args:
        raise CommandError(f"{command} takes no arguments, got {' '.join(args)!r}")


async def _run(opts: argparse.Namespace) -> int:
    with _sigint_interrupts(opts.command == "watch"):  # the password prompt blocks too: the first Ctrl-C stops it
        store = load_keystore(opts.p12, PasswordSource(file=opts.password_file, before_prompt=before_terminal_input))
    if store.uid is None:
        raise ClientError(f"{opts.p12}: certificate has no UID (PSEUDONYM)")
    anchors = load_certificate_file(opts.ca) if opts.ca else store.ca_certificates()
    if not anchors:
        raise ClientError(f"{opts.p12} bundles no CA certificate: give --ca ROOT.pem")
    crls = load_crl_file(opts.crl) if opts.crl else []
    (host, port), *others = parse_servers(opts.server)
    ca = cert_fingerprint(anchors[0])
    state = ClientState(Path(opts.state_dir) if opts.state_dir else default_state_dir(store.uid, ca))
    state.bind(store.uid, ca)
    if opts.command == "keys":
        return _keys(Keyring(state, store.uid), *opts.args)
    if opts.command == "alias":
        return _alias(Aliases(state), *opts.args)
    if opts.command == "receipts":
        for r in state.receipts():
            print(f"{r.msg_id} to {r.recipient} at {format_time(r.server_time)} queue number {r.queue_number}")
        return 0
    body = b""
    recipients: list[str] = []
    if opts.command == "send":
        recipients = Aliases(state).expand(split_recipients(opts.args[0]))
        try:
            check_subject(opts.args[1])
        except ValueError as exc:
            raise ClientError(f"bad subject: {exc}") from None
        body = _read_body()
    async with _connection(opts.command)(store, host, port, anchors, crls, timeout=opts.timeout,
                                         other_nodes=others) as client:
        mailbox = Mailbox(client, state, TrustPolicy(anchors, crls), opts.kem, require_crl=not opts.no_crl)
        await mailbox.policy()  # the newest CRL, and the relay's own certificate checked against it
        if opts.command == "rotate-key":
            key = await mailbox.rotate_key()
            print(f"new {key.record.kem} encryption key {key.record.key_id} published")
            return 0
        await mailbox.ensure_published()
        if opts.command == "send":
            for receipt in await mailbox.send_many(recipients, opts.args[1], body):
                print(f"sent {receipt.msg_id} to {receipt.recipient} at {format_time(receipt.server_time)}")
        elif opts.command == "askqueue":
            for line in await mailbox.queue():
                _print_line(line, flush=False)  # one write at the end, not one per line
            sys.stdout.flush()  # here, where a closed pipe is caught, not at the interpreter's exit
        elif opts.command == "getmsg":
            _print_message(await mailbox.read(int(opts.args[0])))
        elif opts.command == "watch":
            await mailbox.watch(_print_line, _print_watched, open_messages=opts.args == ["--open"])
    return 0


def _connection(command: str) -> type[RelayOperations]:
    """``watch`` waits for events on asyncio; every other command is one short conversation, on a
    blocking socket (no event loop to import and start: about a tenth of such a command's time)."""
    if command == "watch":
        from .connection import RelayClient

        return RelayClient
    return BlockingRelayClient


def _print_line(line: QueueLine, flush: bool = True) -> None:
    """One ``askqueue`` line: ``<NUM>:<SENDER>:<TIME>:<SUBJECT>`` (``watch`` shows each one at once)."""
    subject = line.subject if line.subject is not None else UNVERIFIABLE
    print(f"{line.num}:{line.sender}:{line.server_time.strftime('%Y-%m-%dT%H:%M:%SZ')}:{subject}", flush=flush)


def _print_message(msg: ReadMessage) -> None:
    """A message as ``getmsg`` prints it; ``Cc:`` names the other recipients of a message to several."""
    inner = msg.inner
    cc = f"Cc: {', '.join(inner.cc)}\n" if inner.cc else ""
    sys.stdout.write(f"From: {inner.sender}\nTo: {inner.recipient}\n{cc}Subject: {inner.subject}\n"
                     f"Date: {format_time(msg.receipt.server_time)}\nMessage-Id: {inner.msg_id}\n\n")
    sys.stdout.flush()
    body = printable_body(inner.body) if sys.stdout.isatty() else inner.body
    sys.stdout.buffer.write(body)
    if body and not body.endswith(b"\n"):
        sys.stdout.buffer.write(b"\n")
    sys.stdout.flush()


def _print_watched(item: ReadMessage | Unreadable) -> None:
    """``watch --open``: each message as getmsg prints it, a blank line between; one that does not verify
    is named on stderr and stays unread."""
    if isinstance(item, Unreadable):
        print(visible(f"msg-client: message {item.num} not shown ({VERIFICATION_ERROR} {item.error}); it stays "
                      "unread"), file=sys.stderr, flush=True)
        return
    _print_message(item)
    print(flush=True)


def _alias(aliases: Aliases, action: str, *args: str) -> int:
    if action == "list":
        for name, members in sorted(aliases.all().items()):
            print(f"{name}: {','.join(members)}")
    elif action == "rm":
        aliases.remove(args[0])
        print(f"alias {args[0]} removed")
    else:
        members = aliases.set(args[0], split_recipients(args[1]))
        print(f"alias {args[0]}: {','.join(members)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; Ctrl-C anywhere ends it with one line and exit code 130 (128 + SIGINT)."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130
    finally:
        log.for_library()


def _keys(keyring: Keyring, action: str, file: str) -> int:
    """Share one user's encryption keys between two devices (two state directories)."""
    path = Path(file)
    if action == "export":
        if path.exists():
            raise ClientError(f"{file} already exists: choose a new file name")
        write_atomic(path, json.dumps(keyring.export_doc()).encode(), mode=0o600)
        print(f"encryption keys of {keyring.uid} written to {file} (private keys: keep it safe, delete it "
              "once imported)")
        return 0
    try:
        doc = json.loads(read_bytes(path))
    except ValueError:
        raise ClientError(f"{file}: not a key file made by msg-client keys export") from None
    key = keyring.import_doc(doc)
    print(f"encryption key {key.record.key_id} of {keyring.uid} imported; it is now this device's key too")
    return 0


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = wants_verbose(argv)
    try:
        opts = build_parser().parse_args(argv)
        # `msg-client -h`, `msg-client getmsg --help`: help, not an error.
        wants_help = opts.help or opts.args in (["-h"], ["--help"])
        if not wants_help:
            _validate_command(opts.command, opts.args)
    except CommandError as exc:
        print(COMMAND_ERROR, file=sys.stderr)
        print(exc, file=sys.stderr)
        print(HELP, file=sys.stderr)
        return 1
    log.for_command_line(verbose)
    try:
        if wants_help or opts.command == "help":
            if sys.stdout is not None:  # started with stdout closed: nowhere to show it
                print(HELP)
                sys.stdout.flush()  # here, where a closed pipe is caught
            return 0
        if opts.command == "watch":
            import asyncio

            return asyncio.run(_run(opts))
        return run_blocking(_run(opts))
    except KeyboardInterrupt:
        if opts.command == "watch":
            return 0  # Ctrl-C is how a watch ends
        raise
    except NoSuchKey as exc:
        return _fail(f"msg-client: cannot open this message: {exc}; read it where that key is, or copy the "
                     "key here with msg-client keys export/import")
    except VerificationError as exc:
        return _fail(VERIFICATION_ERROR, str(exc), verbose)
    except RemoteError as exc:
        if exc.code == ErrorCode.UNKNOWN_MESSAGE.value:
            return _fail(UNKNOWN_MESSAGE, exc.message, verbose)
        return _fail(f"msg-client: the relay refused: {exc.message}")
    except MsgRelayError as exc:  # every other failure the library names: one line, no traceback
        return _fail(f"msg-client: {exc}")
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:  # what the library does not name: a full disk under stdout (> /dev/full), say
        return _fail(f"msg-client: {exc.strerror or exc}")


if __name__ == "__main__":
    sys.exit(main())
