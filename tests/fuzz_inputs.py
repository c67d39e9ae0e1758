"""What tests/test_fuzz.py draws: request fields (mostly usable, sometimes odd) and session records,
damaged where the checksum catches it or changed under a valid checksum so that the header checks
see it."""

from __future__ import annotations

import hashlib
import json
import math
import struct
from typing import Any

from hypothesis import strategies as st

from tests.conftest import TINY_TEXT


def mostly(usual: st.SearchStrategy[Any], odd: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`usual` most of the time: most calls should get past the checks and do real work."""
    return st.integers(0, 15).flatmap(lambda pick: odd if 5 <= pick <= 7 else usual)


VOCABULARY = "".join(sorted(set(TINY_TEXT)))  # the test model's (checked against GetModelInfo)
VOCAB_TEXT = st.text(alphabet=VOCABULARY, max_size=30)
PROMPTS = mostly(VOCAB_TEXT, st.one_of(st.just(""), st.text(max_size=10),
                                       st.text(alphabet=VOCABULARY, min_size=195, max_size=210)))
STOP = st.text(alphabet=VOCABULARY, min_size=1, max_size=2)
STOPS = mostly(st.lists(STOP, max_size=2), st.one_of(st.lists(STOP, min_size=16, max_size=18), st.lists(
    st.one_of(STOP, st.text(max_size=4), st.text(alphabet=VOCABULARY, min_size=60, max_size=70)), max_size=3)))
INDEX = st.integers(0, 2**20)
HEX_IDS = st.text(alphabet="0123456789abcdef", min_size=32, max_size=32)
GARBAGE_IDS = st.one_of(st.just(""), st.text(max_size=40), HEX_IDS.map(str.upper),
                        st.text(alphabet="0123456789abcdef", min_size=31, max_size=33))
MAX_CHARS_VALUES = mostly(st.integers(1, 40), st.one_of(st.integers(-5, 300), st.just(0)))
ODD_FLOATS = st.one_of(st.floats(width=32), st.sampled_from([-0.0, -1.0, math.nan, math.inf, -math.inf, 3e38, 1e-45]))
SEEDS = st.one_of(st.none(), st.integers(0, 2**64 - 1))
SAMPLING = {"temperature": mostly(st.one_of(st.none(), st.floats(0, 2, width=32), st.just(0.0)), ODD_FLOATS),
            "top_k": mostly(st.one_of(st.none(), st.integers(0, 70)), st.integers(-2**31, 2**31 - 1)),
            "top_p": mostly(st.one_of(st.none(), st.floats(0.0625, 1, width=32), st.just(1.0)), ODD_FLOATS),
            "seed": SEEDS}
TURN = {"text": PROMPTS, "max_chars": MAX_CHARS_VALUES, "stop": STOPS, **SAMPLING}

# Session records: damage that the checksum catches, and changes under a valid checksum that reach
# the header checks: any JSON value anywhere, or a value at the edge of a field's documented range.
DAMAGE = st.sampled_from(["as-is", "flip", "cut", "extend", "header", "header", "payload", "edge", "edge", "edge"])
JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 70), st.integers(-2**70, 2**70), st.floats(),
                        st.text(max_size=6), st.lists(st.integers(-2, 70), max_size=4),
                        st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
EDGES = [  # tried in turn, not drawn: each is met a few times in every run
    (("settings", "top_k"), 2**63 - 1), (("settings", "top_k"), 2**31), (("settings", "temperature"), 5e-324),
    (("settings", "temperature"), 1e308), (("settings", "top_p"), 5e-324), (("state", "position"), 2**64 - 1),
    (("state", "position"), 2**63 - 1), (("state", "stream_key"), 2**64 - 1), (("state", "consumed_chars"), 2**63 - 1),
    (("state", "recent_text"), "\ud800"), (("state", "recent_text"), "\U0001f600" * 256), (("created",), 1e308),
    (("owner",), "x" * 1000)]
FLOAT32_VALUES, TAILS = st.sampled_from([math.nan, math.inf, -3e38, 3e38, 1e-42]), st.binary(min_size=1, max_size=16)


def damaged(data: st.DataObject, record: bytes | None, edge: int) -> tuple[bytes, str]:
    """`record` as is, flipped, cut, extended, or changed under a valid checksum; and what was done.

    Every draw is made whatever the record (even None): the search engine needs the same draws,
    with the same bounds, after the same earlier choices, and records come from the server."""
    kind, at, bits, tail = data.draw(DAMAGE), data.draw(INDEX), data.draw(st.integers(1, 255)), data.draw(TAILS)
    value, float_value, delete = data.draw(JSON_VALUES), data.draw(FLOAT32_VALUES), data.draw(st.booleans())
    if record is None:
        return b"", ""
    if kind in ("as-is", "flip", "cut", "extend"):
        at %= len(record)
        return {"as-is": record, "flip": record[:at] + bytes([record[at] ^ bits]) + record[at + 1:],
                "cut": record[:at], "extend": record + tail}[kind], f"a record, {kind} at {at}"
    (size,) = struct.unpack_from("<I", record, 7)
    header, payload = json.loads(record[11:11 + size]), bytearray(record[11 + size:-32])
    # Every field, every section, and the array descriptions' fields.
    choices = [(key,) for key in header] + [(key, inner) for key, section in header.items()
                                            if isinstance(section, dict) for inner in section]
    choices += [("arrays", name, key) for name, array in header["arrays"].items() if array for key in array]
    path, value = EDGES[edge % len(EDGES)] if kind == "edge" else (choices[at % len(choices)], value)
    parent = header
    for key in path[:-1]:
        parent = parent[key]
    if kind == "payload":
        at = 4 * (at % (len(payload) // 4))
        payload[at:at + 4] = struct.pack("<f", float_value)
        done = f"payload float at byte {at} set to {float_value}"
    elif kind == "header" and delete:
        del parent[path[-1]]
        done = f"header field {path} deleted"
    else:
        parent[path[-1]] = value
        done = f"header field {path} set to {'the edge value ' if kind == 'edge' else ''}{value!r:.80}"
    text = json.dumps(header).encode()
    body = record[:7] + struct.pack("<I", len(text)) + text + bytes(payload)
    return body + hashlib.sha256(body).digest(), f"a record with its {done} (checksum updated)"
