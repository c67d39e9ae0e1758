"""Session records that decode: exact round trips (fixed and random records), a layout readable
from the documentation alone, and model fingerprints (a record for another model is a mismatch,
not damage). Refusals of damaged and forged records: tests/test_session_record_refusals.py."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from server.engine.generation import RECENT_CHARS
from server.engine.sampling import SamplingSettings
from server.engine.scheduling.slot_state import SlotSnapshot
from server.sessions.record import (
    MAGIC,
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
from tests.session_records import (
    VOCAB,
    assert_same,
    make_model,
    make_record,
    same_bits,
    split,
)


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
    assert not isinstance(caught.value, RecordInvalid) and isinstance(caught.value, RecordError)
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
