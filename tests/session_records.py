"""Session records for the record tests: a sample record of every kind of value, bit-exact
comparison, and the documented layout read and forged by hand.

Forged records are built from the documented layout alone (checksum recomputed), so they reach
the header checks that a plain byte flip never gets past.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import numpy as np
import pytest

from server.engine.sampling import SamplingSettings
from server.engine.scheduling.slot_state import SlotSnapshot
from server.sessions.record import (
    FORMAT_VERSION,
    MAGIC,
    ModelFingerprint,
    RecordInvalid,
    SessionRecord,
    decode_record,
)

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
