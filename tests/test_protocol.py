"""The sans-IO protocol core: framing in any chunking, request validation, envelopes."""

from __future__ import annotations

import datetime as dt
import json
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.encoding import signing_input
from protocol.envelope import (
    InnerMessage,
    Sealed,
    VerificationError,
    ciphertext_digest,
    open_envelope,
    seal,
    sign_submission,
    verify_submission,
)
from protocol.errors import ErrorCode, FrameError, ProtocolError
from protocol.frames import MAX_FRAME, FrameDecoder, decode_payload, encode_frame
from protocol.messages import (
    QueueEntry,
    QueuePage,
    QueueRequest,
    QueueResult,
    SendRequest,
    parse_request,
    request_to_wire,
)
from protocol.receipts import Receipt


def frames_of(objs):
    return b"".join(encode_frame(o) for o in objs)


@given(st.lists(st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=20), max_size=4), max_size=6),
       st.lists(st.integers(min_value=1, max_value=50), max_size=30))
def test_decoder_accepts_any_chunking(objs, cuts):
    data = frames_of(objs)
    dec = FrameDecoder()
    out, pos = [], 0
    for c in cuts:
        out += dec.feed(data[pos:pos + c])
        pos += c
    out += dec.feed(data[pos:])
    assert [json.loads(p) for p in out] == objs
    assert dec.buffered == 0


def test_oversize_declared_length_refused_before_body():
    dec = FrameDecoder()
    with pytest.raises(FrameError) as info:
        dec.feed(struct.pack(">I", 2**32 - 1))  # no body at all: refused on the header alone
    assert info.value.code == ErrorCode.TOO_LARGE
    with pytest.raises(FrameError):
        dec.feed(b"more")


def test_limit_is_exact():
    exact = b'{"a":"' + b"x" * (MAX_FRAME - 8) + b'"}'
    assert len(exact) == MAX_FRAME
    assert FrameDecoder().feed(struct.pack(">I", MAX_FRAME) + exact) == [exact]
    with pytest.raises(FrameError):
        FrameDecoder().feed(struct.pack(">I", MAX_FRAME + 1))
    with pytest.raises(FrameError):
        encode_frame({"a": "x" * MAX_FRAME})


@pytest.mark.parametrize("payload, fragment", [
    (b"\xff\xfe", "UTF-8"), (b"[1,2]", "object"), (b"nope", "JSON"), (b'{"a":NaN}', "JSON"),
    (b"[" * 5000 + b"]" * 5000, "nested"), (b'{"a":1,"a":2}', "JSON"), (b"1" * 5000, "JSON"),
])
def test_bad_payloads(payload, fragment):
    with pytest.raises(FrameError) as info:
        decode_payload(payload)
    assert fragment in info.value.message


def test_request_round_trip_and_unknown_fields_ignored():
    req = SendRequest(7, "BOB", "a" * 32, 1, b"h", b"e", b"s")
    wire = request_to_wire(req) | {"extra": {"ignored": True}}
    assert parse_request(json.loads(json.dumps(wire))) == req
    assert parse_request({"id": "x", "op": "queue"}) == QueueRequest("x", 0)


@pytest.mark.parametrize("obj, code", [
    ({"op": "queue"}, ErrorCode.BAD_REQUEST),
    ({"id": True, "op": "queue"}, ErrorCode.BAD_REQUEST),
    ({"id": 1, "op": "fly"}, ErrorCode.BAD_REQUEST),
    ({"id": 1, "op": "get"}, ErrorCode.BAD_REQUEST),
    ({"id": 1, "op": "get", "num": "3"}, ErrorCode.BAD_REQUEST),
    ({"id": 1, "op": "get", "num": 0}, ErrorCode.BAD_REQUEST),
    ({"id": 1, "op": "get", "num": 2**80}, ErrorCode.BAD_REQUEST),
    ({"id": 1, "op": "directory", "uid": "../etc"}, ErrorCode.BAD_REQUEST),
    ({"id": 1, "op": "send", "to": "BOB", "msg_id": "XYZ", "envelope_version": 1, "header": "", "envelope": "",
      "signature": ""}, ErrorCode.BAD_REQUEST),
    ({"id": 1, "op": "send", "to": "BOB", "msg_id": "a" * 32, "envelope_version": 1, "header": "!!",
      "envelope": "", "signature": ""}, ErrorCode.BAD_REQUEST),
    ({"id": 1, "op": "send", "to": "BOB", "msg_id": "a" * 32, "envelope_version": 1, "header": "A" * 9000,
      "envelope": "", "signature": ""}, ErrorCode.TOO_LARGE),
    ({"v": 9, "id": 1, "op": "queue"}, ErrorCode.UNSUPPORTED_VERSION),
])
def test_request_validation(obj, code):
    with pytest.raises(ProtocolError) as info:
        parse_request(obj)
    assert info.value.code == code
    if isinstance(obj.get("id"), int) and not isinstance(obj.get("id"), bool):
        assert info.value.request_id == obj["id"]


def test_queue_page_fits_a_frame():
    now = dt.datetime.now(dt.timezone.utc)
    receipt = Receipt("a" * 32, "ALICE", "BOB", bytes(32), now, 1, bytes(32), bytes(72))
    entries = [QueueEntry(i, "ALICE", "a" * 32, now, 1, b"x" * 1500, receipt, bytes(32)) for i in range(1, 30)]

    def queue_page(entries: list[QueueEntry], rid: int, max_frame: int) -> tuple[QueuePage, QueueResult]:
        """As the relay fills a page: entries' texts while they fit; ``more`` when one did not."""
        page = QueuePage(rid, max_frame)
        return page, page.result(more=not all(page.add_encoded(QueuePage.encode(e)) for e in entries))

    page, result = queue_page(entries, 1, MAX_FRAME)
    assert result.more and 0 < len(page.texts) < len(entries)
    from protocol.messages import encode_response, ok_response

    frame, overflow = encode_response(ok_response(1, result), MAX_FRAME)
    assert overflow is None and len(frame) <= MAX_FRAME + 4
    assert queue_page(entries[:2], 1, MAX_FRAME)[1].more is False


def test_signing_input_is_unambiguous():
    assert signing_input("l", "ab", "c") != signing_input("l", "a", "bc")
    assert signing_input("x", "a") != signing_input("y", "a")


@pytest.fixture(scope="module")
def keys(demo_dir):
    from pki.keystore import load_keystore

    return {u: load_keystore(demo_dir / f"{u}.p12") for u in ("MSG_CLI1", "MSG_CLI2", "MSG_CLI3")}


def inner(**kw):
    base = dict(sender="MSG_CLI1", recipient="MSG_CLI2", msg_id="b" * 32,
                sent_at=dt.datetime.now(dt.timezone.utc), subject="hi", body=b"body")
    base.update(kw)
    return InnerMessage(**base)


def test_envelope_v1_round_trip_and_checks(keys):
    a = keys["MSG_CLI1"]
    sealed = seal(inner(), a.key)
    opened = open_envelope(sealed, reader="MSG_CLI2", sender="MSG_CLI1", msg_id="b" * 32, sender_key=a.cert.public_key())
    assert opened.inner.body == b"body"
    with pytest.raises(VerificationError, match="addressed"):
        open_envelope(sealed, reader="MSG_CLI3", sender="MSG_CLI1", msg_id="b" * 32, sender_key=a.cert.public_key())
    with pytest.raises(VerificationError, match="signature"):
        open_envelope(sealed, reader="MSG_CLI2", sender="MSG_CLI3", msg_id="b" * 32,
                      sender_key=keys["MSG_CLI3"].cert.public_key())
    with pytest.raises(VerificationError, match="claims sender"):
        forged = seal(inner(sender="MSG_CLI3"), a.key)
        open_envelope(forged, reader="MSG_CLI2", sender="MSG_CLI1", msg_id="b" * 32, sender_key=a.cert.public_key())
    with pytest.raises(VerificationError, match="message id"):
        open_envelope(sealed, reader="MSG_CLI2", sender="MSG_CLI1", msg_id="c" * 32, sender_key=a.cert.public_key())
    other_header = Sealed(sealed.version, json.dumps({"subject": "changed"}).encode(), sealed.envelope)
    with pytest.raises(VerificationError, match="subject"):
        open_envelope(other_header, reader="MSG_CLI2", sender="MSG_CLI1", msg_id="b" * 32,
                      sender_key=a.cert.public_key())


def test_envelope_refuses_long_body_and_control_characters(keys):
    with pytest.raises(ValueError):
        seal(inner(body=b"x" * 1001), keys["MSG_CLI1"].key)
    with pytest.raises(ValueError):
        seal(inner(subject="evil\x1b[2J"), keys["MSG_CLI1"].key)


def test_submission_signature(keys):
    a, c = keys["MSG_CLI1"], keys["MSG_CLI3"]
    sealed = seal(inner(), a.key)
    sig = sign_submission(a.key, "MSG_CLI2", "b" * 32, sealed)
    assert verify_submission(a.cert.public_key(), sig, "MSG_CLI2", "b" * 32, sealed)
    assert not verify_submission(c.cert.public_key(), sig, "MSG_CLI2", "b" * 32, sealed)
    assert not verify_submission(a.cert.public_key(), sig, "MSG_CLI3", "b" * 32, sealed)
    moved = Sealed(sealed.version, sealed.header, sealed.envelope + b" ")
    assert not verify_submission(a.cert.public_key(), sig, "MSG_CLI2", "b" * 32, moved)
    assert ciphertext_digest(sealed) != ciphertext_digest(moved)


@pytest.mark.parametrize("subject", ["\x1b[2Jclear", "right\u202eto-left", "two\u2028lines", "tab\there", "nul\x00"])
def test_subjects_that_could_rewrite_a_terminal_are_refused(subject):
    from protocol.envelope import check_subject

    with pytest.raises(ValueError):
        check_subject(subject)
    assert check_subject("Grüße, 日本 ✓") == "Grüße, 日本 ✓"


def test_body_shown_on_a_terminal_is_defanged():
    from client.cli import printable_body

    assert printable_body(b"hi\x1b[2J\n\tok") == b"hi\\x1b[2J\n\tok"
    assert printable_body("Grüße\n".encode()) == "Grüße\n".encode()
