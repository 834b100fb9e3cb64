"""Every refusal of the sans-IO protocol core, each shown refusing (issue 9 §5).

Requests and responses field by field (protocol/fields.py, protocol/messages.py), strict JSON and
framing (protocol/frames.py), encodings (protocol/encoding.py), HPKE keys (protocol/hpke.py), key
records and envelopes as a sender builds and a reader opens them (protocol/keyrecord.py,
protocol/envelope.py). Each case names the error it expects, so a check that is gone, or that
another check happens to cover, shows up as a failure.
"""

from __future__ import annotations

import datetime as dt
import json
import struct
from typing import Any

import pytest

from pki.keys import generate_key, sign
from pki.keystore import load_keystore
from protocol import hpke
from protocol.encoding import b64e, format_time, pack, parse_time, signing_input, unpack, utc_now
from protocol.envelope import (
    InnerMessage,
    Sealed,
    VerificationError,
    check_subject,
    open_envelope,
    read_subject,
    seal,
)
from protocol.errors import ErrorCode, FrameError, ProtocolError
from protocol.fields import Fields
from protocol.frames import MAX_DEPTH, FrameDecoder, decode_payload, encode_frame, loads_object
from protocol.keyrecord import KeyRecord, KeyRecordError, read_record
from protocol.messages import HelloResult, parse_request, parse_response

NOW = dt.datetime.now(dt.timezone.utc)
SEND = {"v": 1, "id": 1, "op": "send", "to": "BOB", "msg_id": "a" * 32, "envelope_version": 3,
        "header": b64e(b"head"), "envelope": b64e(b"env"), "signature": b64e(b"sig")}


# ============================================================================ requests
@pytest.mark.parametrize(("change", "code", "message"), [
    ({"id": None}, "bad_request", "missing or invalid request 'id' (string or integer)"),
    ({"id": True}, "bad_request", "missing or invalid request 'id' (string or integer)"),
    ({"id": [1]}, "bad_request", "missing or invalid request 'id' (string or integer)"),
    ({"id": "x" * 65}, "bad_request", "request 'id' out of range"),
    ({"id": -1}, "bad_request", "request 'id' out of range"),
    ({"id": 2**53}, "bad_request", "request 'id' out of range"),
    ({"id": "\ud800"}, "bad_request", "request 'id' is not valid Unicode"),  # a lone surrogate: no UTF-8 for it
    ({"v": 2}, "unsupported_version", "protocol version 2 not supported (this relay speaks 1)"),
    ({"v": True}, "unsupported_version", "protocol version True not supported (this relay speaks 1)"),
    ({"op": "fly"}, "bad_request", "unknown operation 'fly'"),
    ({"op": 5}, "bad_request", "unknown operation 5"),
    ({"to": None}, "bad_request", "missing field 'to'"),
    ({"to": 5}, "bad_request", "field 'to' must be a string"),
    ({"to": "A" * 65}, "too_large", "field 'to' longer than 64 characters"),
    ({"to": "../etc"}, "bad_request", "field 'to' is not a valid UID"),
    ({"msg_id": "A" * 32}, "bad_request", "field 'msg_id' must be 32 lowercase hex digits"),
    ({"envelope_version": "3"}, "bad_request", "field 'envelope_version' must be an integer"),
    ({"envelope_version": True}, "bad_request", "field 'envelope_version' must be an integer"),
    ({"envelope_version": 256}, "bad_request", "field 'envelope_version' out of range 1..255"),
    ({"header": "aGVhZA"}, "bad_request", "header is not valid base64"),
    ({"header": "aGVh ZA=="}, "bad_request", "header is not valid base64"),
    ({"header": 5}, "bad_request", "header must be a base64 string"),
    ({"header": "A" * 5468}, "too_large", "field 'header' larger than 4096 bytes"),
])
def test_a_request_field_that_is_not_what_the_protocol_says_is_refused(change, code, message):
    obj = {k: v for k, v in {**SEND, **change}.items() if v is not None}
    with pytest.raises(ProtocolError) as info:
        parse_request(obj)
    assert (info.value.code.value, info.value.message) == (code, message)
    if "id" not in change:
        assert info.value.request_id == 1  # the answer can name the request it refuses


def test_the_widest_legal_fields_are_accepted():
    req = parse_request({**SEND, "id": "x" * 64, "header": b64e(bytes(4096)), "to": "A" * 64})
    assert req.id == "x" * 64 and len(req.header) == 4096


# ============================================================================ responses
@pytest.mark.parametrize(("obj", "op", "message"), [
    ({"ok": "yes"}, "queue", "field 'ok' must be true or false"),
    ({"ok": False, "error": "nope"}, "queue", "field 'error' must be an object"),
    ({"ok": True, "messages": "x", "more": False}, "queue", "field 'messages' must be a list"),
    ({"ok": True, "crls": [{}] * 9}, "crls", "field 'crls' has more than 8 items"),
    ({"ok": True, "max_frame": 65536, "ops": [1]}, "hello", "field 'ops' must list operation names"),
    ({"ok": True, "max_frame": 9998, "ops": []}, "hello", "field 'max_frame' out of range 9999..1048576"),
    ({"ok": True, "max_frame": (1 << 20) + 1, "ops": []}, "hello", "field 'max_frame' out of range 9999..1048576"),
])
def test_an_answer_that_is_not_what_the_protocol_says_is_refused(obj, op, message):
    with pytest.raises(ProtocolError) as info:
        parse_response({"v": 1, "id": 1, **obj}, op)
    assert info.value.message == message


def test_the_protocols_bounds_of_a_hello_are_accepted():
    for frame in (9999, 1 << 20):
        assert parse_response({"v": 1, "id": 1, "ok": True, "max_frame": frame, "ops": ["get"]}, "hello") == \
            HelloResult(frame, ("get",))


# ============================================================================ strict JSON and frames
@pytest.mark.parametrize(("data", "message"), [
    (b'{"a":NaN}', "is not valid JSON (ValueError)"),
    (b'{"a":Infinity}', "is not valid JSON (ValueError)"),
    (b'{"a":-Infinity}', "is not valid JSON (ValueError)"),
    (b'{"a":1,"a":2}', "is not valid JSON (ValueError)"),
    (b'{"a":"\xff"}', "is not valid UTF-8"),
    (b"[1]", "is not one JSON object"),
    (b'{"a":' * (MAX_DEPTH + 1) + b"1" + b"}" * (MAX_DEPTH + 1), f"has JSON nested deeper than {MAX_DEPTH} levels"),
])
def test_json_that_is_not_strict_is_refused(data, message):
    with pytest.raises(ValueError) as info:
        loads_object(data)
    assert str(info.value) == message
    with pytest.raises(FrameError) as framed:
        decode_payload(data)
    assert (framed.value.code, framed.value.message) == (ErrorCode.BAD_REQUEST, f"frame {message}")


def test_json_at_the_depth_limit_is_accepted():
    nested = b'{"a":' * (MAX_DEPTH - 1) + b"1" + b"}" * (MAX_DEPTH - 1)
    assert loads_object(nested)["a"]


def test_brackets_inside_strings_do_not_count_as_nesting():
    """Only structure nests: a subject full of brackets (escaped quotes too) is no deeper than its object."""
    text = '{"s":"\\\\\\"' + "[{" * 40 + '", "l":' + "[" * (MAX_DEPTH - 1) + "1" + "]" * (MAX_DEPTH - 1) + "}"
    assert loads_object(text.encode())["s"].endswith("[{" * 40)
    deeper = '{"s":"' + "]}" * 40 + '", "l":' + "[" * MAX_DEPTH + "1" + "]" * MAX_DEPTH + "}"
    with pytest.raises(ValueError, match="nested deeper"):
        loads_object(deeper.encode())


def test_a_frame_over_the_limit_is_neither_written_nor_read():
    with pytest.raises(FrameError) as info:
        encode_frame({"a": "x" * 100}, 50)
    assert info.value.code == ErrorCode.TOO_LARGE
    decoder = FrameDecoder(50)
    with pytest.raises(FrameError, match="declared frame length 51 exceeds the limit of 50"):
        decoder.feed(struct.pack(">I", 51))
    # The stream is out of sync for good: whatever comes next is refused with the same error.
    with pytest.raises(FrameError, match="declared frame length 51"):
        decoder.receive(encode_frame({"ok": 1}))
    with pytest.raises(FrameError, match="declared frame length 51"):
        decoder.next_payload()


def test_a_frame_declared_at_the_limit_is_read():
    body = b'{"a":"' + b"x" * 42 + b'"}'
    assert FrameDecoder(50).feed(struct.pack(">I", 50) + body) == [body]


# ============================================================================ encodings
def test_a_boolean_is_not_a_signing_field():
    with pytest.raises(TypeError):
        signing_input("label", True)
    assert signing_input("label", 1) != signing_input("label", "1", "")


@pytest.mark.parametrize("text", [
    "2026-01-01T00:00:001",  # no Z (and without its last character it would be a time)
    "2026-01-01T00:00:00+00:00", "2026-01-01T00:00:00." + "0" * 25 + "Z",  # over 40 characters, else a time
    "2026-13-01T00:00:00Z", "yesterdayZ", 5,
    "2026-01-01T00:00:00+05:00Z",  # an offset, then Z: fromisoformat alone took it (and dropped the offset)
    "2026-01-01Z", "2026-01-01 00:00:00Z", "2026-01-01X00:00:00Z", "2026-01-01T00:00Z",
    "2026-01-01T00:00:00.1234567Z", "2026-01-01T00:00:00,5Z", "\u0662026-01-01T00:00:00Z"])
def test_a_time_that_is_not_rfc3339_utc_is_refused(text: Any):
    with pytest.raises(ProtocolError, match="must be an RFC 3339 UTC time"):
        parse_time(text)
    assert parse_time("2026-01-01T00:00:00.5Z") == dt.datetime(2026, 1, 1, 0, 0, 0, 500000, dt.timezone.utc)
    assert parse_time("2026-01-01T00:00:01Z") == dt.datetime(2026, 1, 1, 0, 0, 1, tzinfo=dt.timezone.utc)
    now = utc_now()
    assert parse_time(format_time(now)) == now


@pytest.mark.parametrize(("data", "count", "message"), [
    (b"\x00\x00\x00", 1, "truncated field"),
    (b"\x00\x00\x00\x05abc", 1, "truncated field"),
    (pack(b"a", b"b"), 3, "truncated field"),
    (pack(b"a") + b"x", 1, "trailing bytes"),
])
def test_packed_fields_must_be_exact(data, count, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        unpack(data, count)
    assert unpack(pack(b"a", b""), 2) == [b"a", b""]


# ============================================================================ HPKE keys
def test_an_unknown_kem_is_refused():
    with pytest.raises(hpke.HpkeError, match="^unsupported KEM RSA$"):
        hpke.seal("RSA", bytes(32), b"x", b"info")
    with pytest.raises(hpke.HpkeError, match="^unsupported KEM RSA$"):
        hpke.generate("RSA")


@pytest.mark.parametrize(("kem", "key", "message"), [
    ("X25519", bytes(31), "malformed X25519 public key"),
    ("MLKEM768_X25519", bytes(100), "malformed MLKEM768_X25519 public key"),
    ("X25519", bytes(32), "malformed X25519 public key (unusable X25519 point)"),
    ("MLKEM768_X25519", None, "malformed MLKEM768_X25519 public key (unusable X25519 point)"),
])
def test_a_public_key_nobody_can_seal_to_is_refused(kem, key, message):
    if key is None:  # a good ML-KEM half, an all-zero X25519 half
        key = hpke.generate(kem)[1][:-32] + bytes(32)
    with pytest.raises(hpke.HpkeError) as info:
        hpke.check_public(kem, key)
    assert str(info.value) == message
    hpke.check_public(kem, hpke.generate(kem)[1])


def test_a_private_key_of_the_wrong_shape_opens_nothing():
    private, public = hpke.generate("X25519")
    sealed = hpke.seal("X25519", public, b"secret", b"info")
    with pytest.raises(hpke.HpkeError, match="^malformed X25519 private key$"):
        hpke.open_sealed("X25519", private[:-1], sealed, b"info")
    with pytest.raises(hpke.HpkeError, match="^cannot open: wrong key, wrong context or tampered ciphertext$"):
        hpke.open_sealed("X25519", private, sealed, b"other info")
    assert hpke.open_sealed("X25519", private, sealed, b"info") == b"secret"


# ============================================================================ key records
@pytest.mark.parametrize("record", [b"{}", b"not json", json.dumps({"uid": "BOB", "kem": "X25519"}).encode()])
def test_a_key_record_that_does_not_parse_is_refused(record):
    with pytest.raises(KeyRecordError, match="^malformed key record"):
        read_record(record)


# ============================================================================ envelopes
@pytest.fixture(scope="module")
def keys(demo_dir):
    return {u: load_keystore(demo_dir / f"{u}.p12") for u in ("MSG_CLI1", "MSG_CLI2", "MSG_CLI3")}


def _inner(**kw: Any) -> InnerMessage:
    return InnerMessage(**{"sender": "MSG_CLI1", "recipient": "MSG_CLI2", "msg_id": "b" * 32, "sent_at": NOW,
                           "subject": "hi", "body": b"body", **kw})


def test_a_sender_never_seals_to_another_users_key():
    _, public = hpke.generate("X25519")
    carols = KeyRecord("MSG_CLI3", "X25519", public, NOW, NOW + dt.timedelta(days=1))
    with pytest.raises(ValueError, match="^key record belongs to another user$"):
        seal(_inner(), generate_key(), carols)


def test_a_subject_of_200_characters_is_the_longest():
    assert check_subject("s" * 200) == "s" * 200
    with pytest.raises(ValueError, match="^subject longer than 200 characters$"):
        check_subject("s" * 201)


def _v1(keys, *, inner: bytes | None = None, signature: bytes | None = None, envelope: bytes | None = None,
        header: bytes | None = None) -> Sealed:
    """A version-1 envelope with any part replaced; the inner bytes are signed by MSG_CLI1 unless
    ``signature`` is given."""
    genuine = seal(_inner(), keys["MSG_CLI1"].key)
    if inner is not None:
        signature = signature or sign(keys["MSG_CLI1"].key, signing_input("inner/v1", inner))
        envelope = json.dumps({"inner": b64e(inner), "signature": b64e(signature)}).encode()
    return Sealed(1, header or genuine.header, envelope or genuine.envelope)


@pytest.mark.parametrize(("part", "reason"), [
    ({"envelope": b"not json"}, "envelope is not valid JSON (JSONDecodeError)"),
    ({"envelope": b'{"inner": "!!", "signature": ""}'}, "inner is not valid base64"),
    ({"inner": b'{"from": "MSG_CLI1"}'}, "inner message malformed: missing field 'body'"),
    ({"header": b'{"subject": 5}'}, "header malformed: field 'subject' must be a string"),
    ({"header": b"not json"}, "header is not valid JSON (JSONDecodeError)"),
], ids=["envelope not JSON", "inner not base64", "signed but malformed inner", "subject not a string",
        "header not JSON"])
def test_a_version_1_envelope_that_does_not_parse_is_a_verification_error(keys, part, reason):
    sealed = _v1(keys, **part)
    with pytest.raises(VerificationError) as info:
        open_envelope(sealed, reader="MSG_CLI2", sender="MSG_CLI1", msg_id="b" * 32,
                      sender_key=keys["MSG_CLI1"].cert.public_key())
    assert str(info.value) == reason
    assert open_envelope(_v1(keys), reader="MSG_CLI2", sender="MSG_CLI1", msg_id="b" * 32,
                         sender_key=keys["MSG_CLI1"].cert.public_key()).inner.body == b"body"


def test_a_subject_of_an_unknown_envelope_version_is_not_read():
    with pytest.raises(VerificationError, match="^unsupported envelope version 9$"):
        read_subject(9, json.dumps({"subject": "looks like version 1"}).encode())


def test_fields_bound_what_they_read():
    f = Fields({"n": 5, "s": "abc", "l": [1, 2]}, 3)
    assert (f.int("n", 5, 5), f.str("s", 3), f.list("l", 2)) == (5, "abc", [1, 2])
    with pytest.raises(ProtocolError) as info:
        f.list("l", 1)
    assert (info.value.code, info.value.request_id) == (ErrorCode.TOO_LARGE, 3)
