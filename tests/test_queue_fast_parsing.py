"""Reading a queue entry costs less since issue 14, and accepts exactly what it accepted before.

A queue of 10 000 entries decodes 50 000 base64 values, 20 000 times and 30 000 UIDs: ``b64d`` calls
``binascii`` in strict mode instead of ``base64.b64decode(validate=True)``, ``parse_time`` keeps the
text it parsed last (an entry and its receipt carry the same time), and ``Fields.uid`` keeps the UIDs
that passed its check. Each shortcut must give the answer of the check it stands for.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import itertools

import pytest

from protocol import fields
from protocol.encoding import b64d, parse_time
from protocol.errors import ProtocolError
from protocol.fields import Fields


def _as_before(text: str) -> bytes | None:
    """What b64d accepted before issue 14 (None: refused)."""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return None


def _now(text: str) -> bytes | None:
    try:
        return b64d(text, "header")
    except ProtocolError as exc:
        assert exc.message == "header is not valid base64"
        return None


def test_base64_is_exactly_as_strict_as_before_on_every_short_string():
    """Every string of up to five characters over an alphabet with the corner cases: padding anywhere,
    non-zero trailing bits (Q, w), whitespace, the URL-safe alphabet, a NUL and a non-ASCII letter."""
    alphabet = "AQw+/=\n -\x00é"
    accepted = 0
    for length in range(6):
        for chars in itertools.product(alphabet, repeat=length):
            text = "".join(chars)
            before = _as_before(text)
            assert _now(text) == before, repr(text)
            accepted += before is not None
    assert accepted > 1000  # the alphabet does reach valid base64, not only refusals


@pytest.mark.parametrize("value", [None, 5, b"QUFB", ["QUFB"]])
def test_base64_that_is_not_a_string_is_refused(value):
    with pytest.raises(ProtocolError, match="header must be a base64 string"):
        b64d(value, "header")


def test_a_time_parsed_just_before_is_not_taken_for_another():
    first = parse_time("2026-11-24T10:15:02.123456Z")
    second = parse_time("2026-11-24T10:15:02.123457Z")
    assert second - first == dt.timedelta(microseconds=1)
    assert parse_time("2026-11-24T10:15:02.123457Z") == second
    for bad in ("2026-11-24T10:15:02.123457", "2026-11-24T10:15:02.123457Y", 20261124):
        with pytest.raises(ProtocolError, match="must be an RFC 3339 UTC time"):
            parse_time(bad, "server_time")


def test_a_refused_time_is_refused_again_right_after_it_was_parsed():
    """The text kept is only ever one that parsed: a refusal leaves nothing to answer from."""
    with pytest.raises(ProtocolError):
        parse_time("2026-13-01T00:00:00.000000Z")
    with pytest.raises(ProtocolError):
        parse_time("2026-13-01T00:00:00.000000Z")
    assert parse_time("1970-01-01T00:00:00.000000Z") == dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


def test_a_uid_seen_valid_makes_no_other_valid():
    assert Fields({"from": "ALICE"}).uid("from") == "ALICE"
    assert Fields({"from": "ALICE"}).uid("from") == "ALICE"
    for bad in ("ALICE/..", "ALICE ", "", "A" * 65):
        with pytest.raises(ProtocolError):
            Fields({"from": bad}).uid("from")
    with pytest.raises(ProtocolError, match="is not a valid UID"):
        Fields({"from": "ALICE/.."}).uid("from")


def test_the_uids_kept_are_bounded(monkeypatch):
    """A relay chooses the UIDs it lists: what is kept of them stays small, and still answers."""
    monkeypatch.setattr(fields, "_UIDS_KEPT", 8)
    monkeypatch.setattr(fields, "_VALID_UIDS", set())
    for i in range(50):
        assert Fields({"from": f"USER{i}"}).uid("from") == f"USER{i}"
        assert len(fields._VALID_UIDS) <= 8
    assert Fields({"from": "USER0"}).uid("from") == "USER0"
