"""Session records: exact round trips, a layout readable from the documentation alone, and
refusal of every truncated, altered, malformed or foreign record with a message naming the fault.

Forged records below are built by hand from the documented layout (checksum recomputed), so
they reach the header checks that a plain byte flip never gets past.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any, Callable

import numpy as np
import pytest
from hypothesis import given, settings as hypothesis_settings, strategies as st
from hypothesis.extra import numpy as hnp

from server.engine.generation import RECENT_CHARS
from server.engine.sampling import SamplingSettings
from server.sessions.record import (
    FORMAT_VERSION,
    MAGIC,
    MAX_RECORD_BYTES,
    ModelFingerprint,
    RecordError,
    RecordInvalid,
    RecordModelMismatch,
    SessionRecord,
    decode_record,
    encode_record,
    file_sha256,
    fingerprint_of,
)
from server.engine.slot_state import SlotSnapshot

VOCAB = ("a", "é", "—", "😀", "\n")
SHA = hashlib.sha256(b"model one").hexdigest()
PREFIX = struct.Struct("<5sHI")  # as documented: magic, uint16 version, uint32 header length


def make_model(vocab: tuple[str, ...] = VOCAB, hidden: int = 8, layers: int = 2, sha: str = SHA) -> ModelFingerprint:
    return ModelFingerprint(sha256=sha, vocab=vocab, embedding_dim=4, hidden_size=hidden, num_layers=layers)


def make_record(with_logits: bool = True, model: ModelFingerprint | None = None) -> SessionRecord:
    model = model or make_model()
    rng = np.random.default_rng(7)
    hidden = rng.standard_normal((model.num_layers, model.hidden_size)).astype(np.float32)
    hidden[0, 0] = -0.0  # equal to 0.0 under ==, so only a bit comparison notices a lost sign
    hidden[-1, -1] = np.finfo(np.float32).smallest_subnormal
    logits = None
    if with_logits:
        logits = rng.standard_normal(len(model.vocab)).astype(np.float32)
        logits[1] = -0.0
    snapshot = SlotSnapshot(hidden=hidden, logits=logits, pending=() if with_logits else (3, 0, 4),
                            stream_key=2**64 - 1, position=12345, consumed_chars=42,
                            recent_text="naïve — café 😀\nend")
    return SessionRecord(model=model, snapshot=snapshot, settings=SamplingSettings(0.7, 40, 0.9),
                         owner="ops-ünit", created=1_700_000_000.125, updated=1_700_000_123.5)


def same_bits(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.dtype == b.dtype == np.float32 and a.shape == b.shape and np.array_equal(
        a.view(np.uint32), b.view(np.uint32))


def assert_same(got: SessionRecord, want: SessionRecord) -> None:
    assert same_bits(got.snapshot.hidden, want.snapshot.hidden)
    assert same_bits(got.snapshot.logits, want.snapshot.logits)
    for name in ("pending", "stream_key", "position", "consumed_chars", "recent_text"):
        assert getattr(got.snapshot, name) == getattr(want.snapshot, name), name
    assert (got.model, got.settings, got.owner, got.created, got.updated) == (
        want.model, want.settings, want.owner, want.created, want.updated)


def split(data: bytes) -> tuple[dict[str, Any], bytearray]:
    """(header, payload) read by the documented layout alone."""
    magic, version, length = PREFIX.unpack_from(data)
    assert (magic, version) == (MAGIC, FORMAT_VERSION)
    return json.loads(data[PREFIX.size:PREFIX.size + length]), bytearray(data[PREFIX.size + length:-32])


def forge(header: dict[str, Any] | None, payload: bytes, version: int = FORMAT_VERSION,
          header_bytes: bytes | None = None) -> bytes:
    """A record with a valid checksum around whatever header and payload it is given."""
    if header_bytes is None:
        header_bytes = json.dumps(header, ensure_ascii=False).encode("utf-8")
    body = PREFIX.pack(MAGIC, version, len(header_bytes)) + header_bytes + bytes(payload)
    return body + hashlib.sha256(body).digest()


def invalid_message(data: Any) -> str:
    with pytest.raises(RecordInvalid) as caught:
        decode_record(data)
    return str(caught.value)


@pytest.mark.parametrize("with_logits", [True, False])
@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview])
def test_round_trip_is_exact(with_logits: bool, wrap: type) -> None:
    record = make_record(with_logits)
    decoded = decode_record(wrap(encode_record(record)))
    assert_same(decoded, record)
    assert np.signbit(decoded.snapshot.hidden[0, 0])


def test_decoded_arrays_are_fresh_writeable_native_float32() -> None:
    data = encode_record(make_record())
    decoded = decode_record(data)
    for array in (decoded.snapshot.hidden, decoded.snapshot.logits):
        assert array.dtype == np.float32 and array.flags.writeable and array.flags.c_contiguous
        assert array.flags.owndata
    decoded.snapshot.hidden[:] = 1.0
    assert same_bits(decode_record(data).snapshot.hidden, make_record().snapshot.hidden)
    pending = decode_record(encode_record(make_record(with_logits=False))).snapshot.pending
    assert isinstance(pending, tuple) and all(type(token) is int for token in pending)


def test_encoding_is_deterministic() -> None:
    data = encode_record(make_record())
    assert encode_record(make_record()) == data
    assert encode_record(decode_record(data)) == data


def test_layout_matches_the_documentation() -> None:
    record = make_record()
    data = encode_record(record)
    assert data[:5] == MAGIC and data[5:7] == b"\x01\x00"
    assert data[-32:] == hashlib.sha256(data[:-32]).digest()
    header, payload = split(data)
    assert header["state"]["stream_key"] == 2**64 - 1 and header["model"]["vocab"] == list(VOCAB)
    hidden, logits = header["arrays"]["hidden"], header["arrays"]["logits"]
    assert hidden == {"dtype": "float32", "shape": [2, 8], "offset": 0, "length": 64}
    assert logits == {"dtype": "float32", "shape": [5], "offset": 64, "length": 20}
    assert bytes(payload) == record.snapshot.hidden.astype("<f4").tobytes() + record.snapshot.logits.astype(
        "<f4").tobytes()
    assert split(encode_record(make_record(with_logits=False)))[0]["arrays"]["logits"] is None


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


@pytest.mark.parametrize("expected, differs", [
    (make_model(sha=hashlib.sha256(b"model two").hexdigest()), "sha256"),
    (make_model(vocab=("é", "a", "—", "😀", "\n")), "vocabulary"),
    (make_model(hidden=16), "sizes"),
    (make_model(layers=1), "sizes"),
])
def test_a_record_for_another_model_is_a_mismatch(expected: ModelFingerprint, differs: str) -> None:
    data = encode_record(make_record())
    with pytest.raises(RecordModelMismatch) as caught:
        decode_record(data, expected=expected)
    message = str(caught.value)
    assert make_model().describe() in message and expected.describe() in message and differs in message
    assert not isinstance(caught.value, RecordInvalid) and isinstance(caught.value, (RecordError, ValueError))
    assert_same(decode_record(data), make_record())
    assert_same(decode_record(data, expected=make_model()), make_record())


def test_a_mismatched_record_of_another_shape_still_decodes_alone() -> None:
    other = make_record(model=make_model(hidden=3, layers=1, vocab=("x", "y")))
    data = encode_record(other)
    with pytest.raises(RecordModelMismatch):
        decode_record(data, expected=make_model())
    assert_same(decode_record(data), other)


def test_describe() -> None:
    model = make_model(vocab=tuple(chr(32 + i) for i in range(65)), hidden=1024, layers=1,
                       sha="14bb92ff" + "0" * 56)
    assert model.describe() == "model 14bb92ff… (65 chars, 1 x 1024)"


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


def test_fingerprint_of_and_file_sha256(tmp_path: Any) -> None:
    content = np.random.default_rng(1).integers(0, 256, 2_500_000, dtype=np.uint8).tobytes()  # several chunks
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    digest = file_sha256(path)
    assert digest == hashlib.sha256(content).hexdigest() == file_sha256(str(path))
    model = fingerprint_of(list(VOCAB), 4, 8, 2, digest.upper())
    assert model == make_model(sha=digest)


_TEXT = st.characters(exclude_categories=("Cs",))  # lone surrogates are not Unicode text
_FLOAT32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@st.composite
def records(draw: st.DrawFn) -> SessionRecord:
    vocab = tuple(draw(st.lists(_TEXT, min_size=1, max_size=6, unique=True)))
    layers, hidden_size = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    model = ModelFingerprint(draw(st.binary(min_size=32, max_size=32)).hex(), vocab,
                             draw(st.integers(0, 64)), hidden_size, layers)
    with_logits = draw(st.booleans())
    logits = draw(hnp.arrays(np.float32, (len(vocab),), elements=_FLOAT32)) if with_logits else None
    pending = () if with_logits else tuple(draw(st.lists(st.integers(0, len(vocab) - 1), max_size=4)))
    snapshot = SlotSnapshot(
        hidden=draw(hnp.arrays(np.float32, (layers, hidden_size), elements=_FLOAT32)), logits=logits,
        pending=pending, stream_key=draw(st.integers(0, 2**64 - 1)), position=draw(st.integers(0, 2**63 - 1)),
        consumed_chars=draw(st.integers(0, 2**62 - 1)), recent_text=draw(st.text(_TEXT, max_size=RECENT_CHARS)))
    temperature = draw(st.one_of(st.just(0.0), st.floats(1e-30, 1e6)))  # 0 or a normal float32
    settings = SamplingSettings(temperature, draw(st.integers(0, 10**6)),
                                draw(st.floats(0, 1, exclude_min=True)))
    times = st.floats(0, 1e12)
    return SessionRecord(model, snapshot, settings, draw(st.text(_TEXT, max_size=20)), draw(times), draw(times))


@hypothesis_settings(max_examples=200, deadline=None, database=None)
@given(record=records())
def test_property_random_records_round_trip_exactly(record: SessionRecord) -> None:
    data = encode_record(record)
    decoded = decode_record(data, expected=record.model)
    assert_same(decoded, record)
    assert encode_record(decoded) == data
