"""Session records: a serving session's whole state as one versioned, self-describing byte string.

A record holds what it takes to continue a session exactly, on any server, at
any later time: the model state (SlotSnapshot), the sampling defaults, owner and
timestamps, and a fingerprint of the model (a hidden state means nothing to another).

Byte layout; integers and float32 values are all little-endian:

    offset    size  field
    0         5     magic, ASCII "CSREC"
    5         2     format version, uint16 (this module writes and reads 1)
    7         4     N = header length in bytes, uint32
    11        N     header: one UTF-8 JSON object (below)
    11+N      P     payload: the arrays' float32 values, row-major; P = total - 43 - N
    11+N+P    32    SHA-256 digest of everything before it, bytes [0, 11+N+P)

A record is at most MAX_RECORD_BYTES (1 MiB); readers refuse longer input unread.

Header (version 1). Each key appears once, key order is free, unknown keys are
ignored, NaN/Infinity are not allowed. Integers fit int64; stream_key and position uint64.

    "model":    {"sha256": 64 lowercase hex digits (the served .onnx file),
                 "vocab": [distinct single characters; token id = index],
                 "embedding_dim": E >= 0, "hidden_size": H >= 1, "num_layers": L >= 1; all < 2**31}
    "settings": {"temperature": 0 (greedy) or a positive normal float32, "top_k": integer in
                 [0, 2**31) (0 = no limit), "top_p": number in (0, 1]}
    "state":    {"stream_key": [0, 2**64), "position": [0, 2**63) (random numbers drawn),
                 "pending": [token ids in [0, len(vocab)) not yet fed to the model],
                 "consumed_chars": [0, 2**62), "recent_text": at most 256 code points, no lone surrogates}
    "owner": string ("" = none), "created", "updated": unix seconds, finite, >= 0
    "arrays":   {"hidden": {"dtype": "float32", "shape": [L, H], "offset": o, "length": 4*L*H},
                 "logits": null or {"dtype": "float32", "shape": [len(vocab)], "offset": o, "length": 4*len(vocab)}}

Array offset and length are bytes from the payload's start; the arrays cover
the payload exactly without overlap (this writer: hidden at 0, logits next).
Values are finite. A state has logits or pending tokens, never both.

Readers check magic, version, then the checksum before parsing the header: an
altered or truncated record never reaches the JSON parser, and a later version
may change anything after the version field. Every defect is RecordInvalid (a
bad request); a sound record for another model is RecordModelMismatch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from server.engine.sampling import SamplingSettings
from server.engine.scheduling.slot_state import SlotSnapshot
from server.sessions.record_checks import (  # noqa: F401 - the errors are part of this module's API
    RecordError,
    RecordInvalid,
    RecordModelMismatch,
    check_model,
    check_values,
    is_int,
    is_number,
    require,
)

FORMAT_VERSION = 1
MAGIC = b"CSREC"
MAX_RECORD_BYTES = 1 << 20  # real states are a few KiB; the cap bounds work done on hostile input
_PREFIX = struct.Struct("<5sHI")  # magic, version, header length
_CHECKSUM_BYTES = 32
_FLOAT32_LE = np.dtype("<f4")


@dataclass(frozen=True)
class ModelFingerprint:
    """What a session state depends on: the exact model file and its shape."""

    sha256: str  # hex SHA-256 of the served .onnx file
    vocab: tuple[str, ...]  # ordered characters; index = token id
    embedding_dim: int
    hidden_size: int
    num_layers: int

    def describe(self) -> str:
        """Short text for error messages, e.g. "model 14bb92ff… (65 chars, 1 x 1024)"."""
        return f"model {self.sha256[:8]}… ({len(self.vocab)} chars, {self.num_layers} x {self.hidden_size})"


@dataclass(frozen=True)
class SessionRecord:
    """Everything needed to continue a session: its state, the model it is for, its defaults."""

    model: ModelFingerprint
    snapshot: SlotSnapshot
    settings: SamplingSettings  # the session's sampling defaults
    owner: str = ""  # who created the session ("" = none)
    created: float = 0.0  # unix seconds
    updated: float = 0.0  # unix seconds


def fingerprint_of(spec_vocab: Sequence[str], embedding_dim: int, hidden_size: int, num_layers: int,
                   sha256: str) -> ModelFingerprint:
    """A ModelFingerprint from a model's spec and file hash (hex case does not matter)."""
    return ModelFingerprint(sha256=sha256.lower(), vocab=tuple(spec_vocab), embedding_dim=int(embedding_dim),
                            hidden_size=int(hidden_size), num_layers=int(num_layers))


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in chunks so large models need not fit in memory twice."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# The header's fields by section, with their JSON kinds (float also accepts JSON integers).
_MODEL_FIELDS = {"sha256": str, "vocab": list, "embedding_dim": int, "hidden_size": int, "num_layers": int}
_SETTINGS_FIELDS = {"temperature": float, "top_k": int, "top_p": float}
_STATE_FIELDS = {"stream_key": int, "position": int, "pending": list, "consumed_chars": int, "recent_text": str}
_RECORD_FIELDS = {"owner": str, "created": float, "updated": float}
_KIND_NAMES = {int: "an integer", str: "a string", list: "a list", dict: "an object"}
# To plain JSON values; lists hold strings (vocab) or integers (pending), already checked.
_TO_JSON = {int: int, float: float, str: str, list: lambda v: [x if isinstance(x, str) else int(x) for x in v]}


def _plain(obj: Any, fields: dict[str, type]) -> dict[str, Any]:
    return {key: _TO_JSON[kind](getattr(obj, key)) for key, kind in fields.items()}


def encode_record(record: SessionRecord) -> bytes:
    """The record's bytes; raises RecordInvalid for a record decode_record would refuse."""
    _check_record(record)
    snapshot = record.snapshot
    arrays: dict[str, Any] = {"hidden": None, "logits": None}
    chunks: list[bytes] = []
    for name in arrays:
        array = getattr(snapshot, name)
        if array is not None:
            raw = np.ascontiguousarray(array, dtype=_FLOAT32_LE).tobytes()
            offset = sum(map(len, chunks))
            arrays[name] = {"dtype": "float32", "shape": list(array.shape), "offset": offset, "length": len(raw)}
            chunks.append(raw)
    header = {"model": _plain(record.model, _MODEL_FIELDS), "settings": _plain(record.settings, _SETTINGS_FIELDS),
              "state": _plain(snapshot, _STATE_FIELDS), **_plain(record, _RECORD_FIELDS), "arrays": arrays}
    try:
        # Fixed key order and separators: one record always gives the same bytes.
        header_bytes = json.dumps(header, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    except UnicodeEncodeError as exc:
        raise RecordInvalid("record text fields must be valid Unicode (no lone surrogates)") from exc
    body = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header_bytes)) + header_bytes + b"".join(chunks)
    data = body + hashlib.sha256(body).digest()
    require(len(data) <= MAX_RECORD_BYTES, f"record would be {len(data)} bytes; the limit is {MAX_RECORD_BYTES}")
    return data


def decode_record(data: bytes, expected: ModelFingerprint | None = None) -> SessionRecord:
    """The record in `data`, checked; with `expected`, it must also be for that model.

    Raises RecordInvalid for anything that is not a sound record (whatever the
    input), RecordModelMismatch for a sound record made for another model.
    """
    header_bytes, payload = _unframe(data)
    try:
        record = _read_record(header_bytes, payload)
        _check_record(record)
    except RecordError:
        raise
    except Exception as exc:  # whatever a crafted header trips on, callers see one error type
        raise RecordInvalid(f"session record is malformed ({type(exc).__name__})") from exc
    if expected is None:
        return record
    mine, theirs = record.model, expected
    differ = [name for name, same in (
        ("sha256", mine.sha256 == theirs.sha256.lower()), ("vocabulary", mine.vocab == tuple(theirs.vocab)),
        ("sizes", (mine.embedding_dim, mine.hidden_size, mine.num_layers)
         == (theirs.embedding_dim, theirs.hidden_size, theirs.num_layers))) if not same]
    if differ:
        raise RecordModelMismatch(
            f"session record is for {mine.describe()}, but this server serves {theirs.describe()} "
            f"(they differ in {', '.join(differ)}); restore it on a server with the model it was saved from")
    return record


def _unframe(data: Any) -> tuple[bytes, bytes]:
    """(header bytes, payload bytes) after checking magic, version, lengths and checksum."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise RecordInvalid(f"a session record must be bytes, not {type(data).__name__}")
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    require(size <= MAX_RECORD_BYTES, f"session record is {size} bytes; the limit is {MAX_RECORD_BYTES}")
    data = bytes(data)
    require(len(data) > 0, "session record is empty")
    require(data.startswith(MAGIC), "not a charstream session record")
    require(len(data) >= _PREFIX.size, "record is truncated (too short for its header)")
    _, version, header_length = _PREFIX.unpack_from(data)
    require(version == FORMAT_VERSION, f"record format version {version}; this server reads {FORMAT_VERSION}")
    require(len(data) >= _PREFIX.size + _CHECKSUM_BYTES, "record is truncated (too short for its checksum)")
    body, checksum = data[:-_CHECKSUM_BYTES], data[-_CHECKSUM_BYTES:]
    require(hashlib.sha256(body).digest() == checksum, "record is truncated or altered (checksum mismatch)")
    end = _PREFIX.size + header_length
    require(end <= len(body), f"record header length {header_length} runs past the end of the record")
    return body[_PREFIX.size:end], body[end:]


def _parse_header(header_bytes: bytes) -> dict[str, Any]:
    def no_constants(name: str) -> Any:
        raise RecordInvalid(f"record header contains {name}; numbers must be finite")

    def no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        # Parsers disagree on which of a repeated key wins, so a repeat is ambiguous.
        require(len(dict(pairs)) == len(pairs), "record header repeats a key")
        return dict(pairs)

    try:
        text = header_bytes.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecordInvalid(f"record header is not valid UTF-8 (at header byte {exc.start})") from exc
    try:
        header = json.loads(text, parse_constant=no_constants, object_pairs_hook=no_repeats)
    except json.JSONDecodeError as exc:
        raise RecordInvalid(f"record header is not valid JSON ({exc.msg} at character {exc.pos})") from exc
    require(isinstance(header, dict), "record header must be a JSON object")
    return header


def _field(obj: dict[str, Any], key: str, kind: type, where: str) -> Any:
    """obj[key], which must be a JSON value of `kind`."""
    path = f"{where}.{key}" if where else key
    require(key in obj, f"record field {path} is missing")
    value = obj[key]
    if kind is float:
        require(is_number(value), f"record field {path} must be a finite number")
        return float(value)
    require(isinstance(value, kind) and not (kind is int and isinstance(value, bool)),
             f"record field {path} must be {_KIND_NAMES[kind]}")
    return value


def _section(header: dict[str, Any], name: str, fields: dict[str, type]) -> dict[str, Any]:
    section = _field(header, name, dict, "") if name else header
    return {key: _field(section, key, kind, name) for key, kind in fields.items()}


def _read_record(header_bytes: bytes, payload: bytes) -> SessionRecord:
    header = _parse_header(header_bytes)
    model = _section(header, "model", _MODEL_FIELDS)
    model = ModelFingerprint(**{**model, "vocab": tuple(model["vocab"])})
    check_model(model)  # the arrays are read against its sizes
    arrays = _field(header, "arrays", dict, "")
    hidden, hidden_span = _read_array(arrays, "hidden", (model.num_layers, model.hidden_size), payload)
    require(hidden is not None, "record field arrays.hidden must not be null")
    logits, logits_span = _read_array(arrays, "logits", (len(model.vocab),), payload)
    spans = sorted(span for span in (hidden_span, logits_span) if span is not None)
    apart = all(earlier[1] <= later[0] for earlier, later in zip(spans, spans[1:]))
    require(apart and sum(stop - start for start, stop in spans) == len(payload),
             f"record arrays must cover the {len(payload)}-byte payload exactly, without overlap")
    state = _section(header, "state", _STATE_FIELDS)
    snapshot = SlotSnapshot(hidden=hidden, logits=logits, **{**state, "pending": tuple(state["pending"])})
    settings = SamplingSettings(**_section(header, "settings", _SETTINGS_FIELDS))
    return SessionRecord(model=model, snapshot=snapshot, settings=settings, **_section(header, "", _RECORD_FIELDS))


def _read_array(arrays: dict[str, Any], name: str, shape: tuple[int, ...],
                payload: bytes) -> tuple[np.ndarray | None, tuple[int, int] | None]:
    """(a fresh float32 array, its byte span in the payload), or (None, None) for null."""
    path = f"arrays.{name}"
    require(name in arrays, f"record field {path} is missing")
    if arrays[name] is None:
        return None, None
    entry = _field(arrays, name, dict, "")
    require(_field(entry, "dtype", str, path) == "float32", f"record field {path}.dtype must be \"float32\"")
    got = _field(entry, "shape", list, path)
    require(len(got) <= 8 and all(is_int(n) and 0 <= n < 2**31 for n in got),
             f"record field {path}.shape must be a short list of integers")
    require(tuple(got) == shape, f"record field {path}.shape is {got}; the record's model needs {list(shape)}")
    offset, length = _field(entry, "offset", int, path), _field(entry, "length", int, path)
    require(length == 4 * math.prod(shape), f"record field {path}.length must be {4 * math.prod(shape)} bytes")
    require(0 <= offset <= len(payload) - length,
             f"record field {path} (offset {offset}, length {length}) lies outside the {len(payload)}-byte payload")
    values = np.frombuffer(payload, dtype=_FLOAT32_LE, count=math.prod(shape), offset=offset)
    # astype copies: the result owns writeable, C-contiguous, native float32 memory.
    return values.reshape(shape).astype(np.float32), (offset, offset + length)


def _check_record(record: Any) -> None:
    require(isinstance(record, SessionRecord) and isinstance(record.model, ModelFingerprint), "not a SessionRecord")
    require(isinstance(record.settings, SamplingSettings) and isinstance(record.snapshot, SlotSnapshot),
            "record settings and snapshot must be SamplingSettings and SlotSnapshot")
    check_values(record)
