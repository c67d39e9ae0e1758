"""Session records refused: every truncated, altered, malformed or foreign record, and every
record forged by hand under a valid checksum, with a message naming the fault; and encoding
refuses what decoding would."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable

import numpy as np
import pytest

from server.engine.generation import RECENT_CHARS
from server.engine.sampling import SamplingSettings
from server.engine.scheduling.slot_state import SlotSnapshot
from server.sessions.record import (
    FORMAT_VERSION,
    MAGIC,
    MAX_RECORD_BYTES,
    RecordInvalid,
    SessionRecord,
    decode_record,
    encode_record,
)
from tests.session_records import (
    PREFIX,
    assert_same,
    forge,
    invalid_message,
    make_model,
    make_record,
    split,
)


def test_a_forged_copy_of_a_valid_record_decodes() -> None:
    # The forging helper itself must be right, or the refusals below prove nothing.
    header, payload = split(encode_record(make_record()))
    assert_same(decode_record(forge(header, payload)), make_record())


def test_every_single_byte_change_is_refused() -> None:
    data = encode_record(make_record())
    for position in range(len(data)):  # header, payload and checksum alike
        for mask in (0x01, 0x80, 0xFF):
            altered = bytearray(data)
            altered[position] ^= mask
            with pytest.raises(RecordInvalid):
                decode_record(bytes(altered))


def test_every_truncation_and_extension_is_refused() -> None:
    data = encode_record(make_record(with_logits=False))
    for length in range(len(data)):
        with pytest.raises(RecordInvalid):
            decode_record(data[:length])
    with pytest.raises(RecordInvalid, match="checksum"):
        decode_record(data + b"\x00")
    assert "checksum" in invalid_message(data[:-1])


def test_garbage_is_refused() -> None:
    rng = np.random.default_rng(3)
    assert "empty" in invalid_message(b"")
    assert "not a charstream session record" in invalid_message(b"GIF89a" + bytes(100))
    for size in list(range(1, 64)) + [100, 1000, 5000]:
        for prefix in (b"", MAGIC, PREFIX.pack(MAGIC, FORMAT_VERSION, size)):
            invalid_message(prefix + rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    for not_bytes in ("CSREC", None, [1, 2], 3):
        assert "must be bytes" in invalid_message(not_bytes)


def test_input_over_the_size_limit_is_refused_unread() -> None:
    huge = encode_record(make_record()) + bytes(MAX_RECORD_BYTES)
    assert "limit" in invalid_message(huge)


@pytest.mark.parametrize("version", [0, 2, 65535])
def test_unknown_version_is_refused(version: int) -> None:
    header, payload = split(encode_record(make_record()))
    message = invalid_message(forge(header, payload, version=version))
    assert message == f"record format version {version}; this server reads 1"


def test_header_length_past_the_end_is_refused() -> None:
    header, payload = split(encode_record(make_record()))
    header_bytes = json.dumps(header).encode()
    body = PREFIX.pack(MAGIC, FORMAT_VERSION, len(header_bytes) + len(payload) + 1) + header_bytes + payload
    assert "header length" in invalid_message(body + hashlib.sha256(body).digest())


def _set(path: str, value: Any) -> Callable[[dict[str, Any], bytearray], None]:
    def change(header: dict[str, Any], payload: bytearray) -> None:
        *parents, last = path.split(".")
        for key in parents:
            header = header[key]
        if value is _DELETE:
            del header[last]
        else:
            header[last] = value
    return change


def _put_float(offset: int, value: float) -> Callable[[dict[str, Any], bytearray], None]:
    return lambda header, payload: payload.__setitem__(slice(offset, offset + 4), np.array([value], "<f4").tobytes())


_DELETE = object()
# (name, record has logits, change, text the message must contain)
FORGERIES = [
    ("nan in hidden", True, _put_float(12, float("nan")), "hidden has non-finite"),
    ("inf in logits", True, _put_float(64 + 8, float("-inf")), "logits has non-finite"),
    ("hidden shape", True, _set("arrays.hidden.shape", [3, 8]), "arrays.hidden.shape"),
    ("hidden shape transposed", True, _set("arrays.hidden.shape", [8, 2]), "arrays.hidden.shape"),
    ("logits shape", True, _set("arrays.logits.shape", [4]), "arrays.logits.shape"),
    ("dtype", True, _set("arrays.hidden.dtype", "float64"), "arrays.hidden.dtype"),
    ("length", True, _set("arrays.hidden.length", 60), "arrays.hidden.length"),
    ("offset past end", True, _set("arrays.logits.offset", 84), "arrays.logits"),
    ("negative offset", True, _set("arrays.hidden.offset", -4), "arrays.hidden"),
    ("overlap", True, _set("arrays.logits.offset", 0), "payload"),
    ("unused payload", True, lambda header, payload: payload.extend(bytes(4)), "payload"),
    ("hidden null", True, _set("arrays.hidden", None), "arrays.hidden"),
    ("pending too high", False, _set("state.pending", [0, 5]), "state.pending"),
    ("pending negative", False, _set("state.pending", [-1]), "state.pending"),
    ("pending float", False, _set("state.pending", [1.0]), "state.pending"),
    ("logits and pending", True, _set("state.pending", [1]), "state.pending"),
    ("negative position", True, _set("state.position", -1), "state.position"),
    ("position as text", True, _set("state.position", "7"), "state.position"),
    ("position missing", True, _set("state.position", _DELETE), "state.position"),
    ("negative consumed", True, _set("state.consumed_chars", -3), "state.consumed_chars"),
    ("stream key too big", True, _set("state.stream_key", 2**64), "state.stream_key"),
    ("stream key negative", True, _set("state.stream_key", -1), "state.stream_key"),
    ("recent text too long", True, _set("state.recent_text", "x" * (RECENT_CHARS + 1)), "state.recent_text"),
    ("top_p zero", True, _set("settings.top_p", 0), "settings.top_p"),
    ("top_p above one", True, _set("settings.top_p", 1.5), "settings.top_p"),
    ("negative temperature", True, _set("settings.temperature", -0.5), "settings.temperature"),
    ("negative top_k", True, _set("settings.top_k", -1), "settings.top_k"),
    ("fractional top_k", True, _set("settings.top_k", 2.5), "settings.top_k"),
    ("boolean top_k", True, _set("settings.top_k", True), "settings.top_k"),
    ("settings missing", True, _set("settings", _DELETE), "settings"),
    ("duplicate vocab", True, _set("model.vocab", ["a", "a", "b", "c", "d"]), "model.vocab"),
    ("multi-char vocab", True, _set("model.vocab", ["ab", "c", "d", "e", "f"]), "model.vocab"),
    ("nested vocab", True, _set("model.vocab", [[1], "c", "d", "e", "f"]), "model.vocab"),
    ("sha256 not hex", True, _set("model.sha256", "zz" * 32), "model.sha256"),
    ("zero hidden size", True, _set("model.hidden_size", 0), "model.hidden_size"),
    ("negative created", True, _set("created", -1.0), "created"),
    ("owner not text", True, _set("owner", 5), "owner"),
    ("empty header", True, lambda header, payload: header.clear(), "model"),
]


@pytest.mark.parametrize("with_logits, change, expected", [f[1:] for f in FORGERIES], ids=[f[0] for f in FORGERIES])
def test_forged_records_are_refused_naming_the_field(with_logits: bool, change: Callable, expected: str) -> None:
    header, payload = split(encode_record(make_record(with_logits)))
    change(header, payload)
    assert expected in invalid_message(forge(header, payload))


@pytest.mark.parametrize("header_bytes, expected", [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe{}", "not valid UTF-8"),
    (b"[1, 2]", "JSON object"),
    (b'{"owner": NaN}', "NaN"),
    (b'{"owner": "a", "owner": "b"}', "repeats a key"),
    (b"[" * 100_000, "malformed"),
])
def test_unparseable_headers_are_refused(header_bytes: bytes, expected: str) -> None:
    payload = split(encode_record(make_record()))[1]
    assert expected in invalid_message(forge(None, payload, header_bytes=header_bytes))


def test_non_finite_header_number_is_refused() -> None:
    header, payload = split(encode_record(make_record()))
    text = json.dumps(header).replace('"created": 1700000000.125', '"created": 1e999')
    assert "1e999" in text
    assert "created" in invalid_message(forge(None, payload, header_bytes=text.encode()))


def _replace_snapshot(**changes: Any) -> SessionRecord:
    record = make_record(with_logits="pending" not in changes)
    fields = {name: getattr(record.snapshot, name) for name in SlotSnapshot.__dataclass_fields__}
    return SessionRecord(record.model, SlotSnapshot(**{**fields, **changes}), record.settings)


@pytest.mark.parametrize("record, expected", [
    (_replace_snapshot(hidden=np.full((2, 8), np.nan, dtype=np.float32)), "hidden"),
    (_replace_snapshot(hidden=np.zeros((2, 8), dtype=np.float64)), "float32"),
    (_replace_snapshot(hidden=np.zeros((8, 2), dtype=np.float32)), "shape"),
    (_replace_snapshot(pending=(1,), logits=np.zeros(5, dtype=np.float32)), "state.pending"),
    (_replace_snapshot(recent_text="\ud800"), "recent_text must be valid text"),
    (SessionRecord(make_model(hidden=300_000, layers=1), SlotSnapshot(
        np.zeros((1, 300_000), dtype=np.float32), None, (), 0, 0, 0, ""), SamplingSettings()), "limit"),
])
def test_encode_refuses_what_decode_would_refuse(record: SessionRecord, expected: str) -> None:
    with pytest.raises(RecordInvalid, match=expected):
        encode_record(record)
