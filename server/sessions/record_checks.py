"""The rules a session record's values obey, and the errors for breaking them: shared by
encoding and decoding (record.py), so neither accepts what the other refuses."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from server.engine.generation import RECENT_CHARS

HEX = frozenset("0123456789abcdef")


class RecordError(ValueError):
    """A session record that cannot be used; the message says what is wrong."""


class RecordInvalid(RecordError):
    """Truncated, altered, malformed or out-of-range record."""


class RecordModelMismatch(RecordError):
    """A sound record, but made for a different model than the one expected."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise RecordInvalid(message)


FLOAT32_TINY = float(np.finfo(np.float32).tiny)
FLOAT32_MAX = float(np.finfo(np.float32).max)


def is_utf8(text: str) -> bool:
    """No lone surrogates: the text can go out in a protobuf string field."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def is_number(value: Any) -> bool:
    if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)):
        return False
    # math.isfinite would overflow on a huge integer, which no float64 can hold anyway.
    return abs(value) < 2**1000 if is_int(value) else math.isfinite(value)


def check_array(array: Any, shape: tuple[int, ...], name: str, why: str) -> None:
    require(isinstance(array, np.ndarray) and array.dtype.kind == "f" and array.dtype.itemsize == 4,
             f"{name} must be a float32 array")
    require(array.shape == shape, f"{name} has shape {list(array.shape)}; the model needs {why} = {list(shape)}")
    require(bool(np.isfinite(array).all()), f"{name} has non-finite values (NaN or infinity)")


def check_model(model: Any) -> None:
    """The model fingerprint's rules (`model` is a ModelFingerprint)."""
    sha, vocab = model.sha256, model.vocab
    rules = [
        ("model.sha256", isinstance(sha, str) and len(sha) == 64 and set(sha) <= HEX, "64 lowercase hex digits"),
        ("model.vocab", isinstance(vocab, tuple) and len(vocab) > 0 and all(isinstance(c, str) and len(c) == 1
         for c in vocab) and len(set(vocab)) == len(vocab), "non-empty, distinct single characters"),
        ("model.embedding_dim", is_int(model.embedding_dim) and 0 <= model.embedding_dim < 2**31, "an integer >= 0"),
        ("model.hidden_size", is_int(model.hidden_size) and 0 < model.hidden_size < 2**31, "an integer >= 1"),
        ("model.num_layers", is_int(model.num_layers) and 0 < model.num_layers < 2**31, "an integer >= 1"),
    ]
    for path, ok, rule in rules:
        require(ok, f"record field {path} must be {rule}")


def check_values(record: Any) -> None:
    """Every value rule of the format (`record` is a SessionRecord of a ModelFingerprint, a
    SlotSnapshot and SamplingSettings: record.py checks the types first)."""
    model, settings, snap = record.model, record.settings, record.snapshot
    check_model(model)
    check_array(snap.hidden, (model.num_layers, model.hidden_size), "hidden", "[num_layers, hidden_size]")
    if snap.logits is not None:
        check_array(snap.logits, (len(model.vocab),), "logits", "[vocab size]")
    t, k, p, vocab_size = settings.temperature, settings.top_k, settings.top_p, len(model.vocab)
    pending_ok = isinstance(snap.pending, (tuple, list)) and all(is_int(i) and 0 <= i < vocab_size
                                                                 for i in snap.pending)
    rules = [
        # The API's types bound these (temperature a float32, top_k an int32): a record holds
        # only what a session created through the API can hold, so describing it never fails.
        ("settings.temperature", is_number(t) and (t == 0 or FLOAT32_TINY <= t <= FLOAT32_MAX),
         "0 (greedy) or a positive normal float32"),
        ("settings.top_k", is_int(k) and 0 <= k < 2**31, "an integer in [0, 2**31) (0 = no limit)"),
        ("settings.top_p", is_number(p) and 0 < p <= 1, "in (0, 1]"),
        ("state.pending", pending_ok, f"a list of token ids in [0, {vocab_size})"),
        ("state.pending", snap.logits is None or not snap.pending, "empty when the state has logits"),
        ("state.stream_key", is_int(snap.stream_key) and 0 <= snap.stream_key < 2**64, "an integer in [0, 2**64)"),
        # Headroom below the uint64 / int64 counters they feed: a session keeps counting.
        ("state.position", is_int(snap.position) and 0 <= snap.position < 2**63, "an integer in [0, 2**63)"),
        ("state.consumed_chars", is_int(snap.consumed_chars) and 0 <= snap.consumed_chars < 2**62,
         "an integer in [0, 2**62)"),
        ("state.recent_text", isinstance(snap.recent_text, str) and len(snap.recent_text) <= RECENT_CHARS
         and is_utf8(snap.recent_text), f"valid text of at most {RECENT_CHARS} characters"),
        ("owner", isinstance(record.owner, str), "a string"),
        ("created", is_number(record.created) and record.created >= 0, "finite unix seconds >= 0"),
        ("updated", is_number(record.updated) and record.updated >= 0, "finite unix seconds >= 0"),
    ]
    for path, ok, rule in rules:
        require(ok, f"record field {path} must be {rule}")
