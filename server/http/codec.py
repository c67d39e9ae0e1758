"""JSON request bodies to protobuf messages and messages back to JSON: the proto's JSON mapping.

Requests take the proto field names (`max_chars`) or their lowerCamelCase JSON names
(`maxChars`); 64-bit integers as numbers or strings (a seed above 2**53 must be a string
in JavaScript); `null` leaves a field unset. Unknown fields are refused, so a misspelt
option fails loudly instead of being ignored. Responses use the proto field names,
print every field (a default value is still a value: `busy: false`), and write 64-bit
integers as numbers where a double holds them exactly.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from server.api.errors import ServiceError

M = TypeVar("M", bound=Message)
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def parse_json_object(body: bytes, what: str) -> dict[str, Any]:
    """The JSON object in `body` ({} for an empty body); INVALID_ARGUMENT saying what is wrong."""
    if not body.strip():
        return {}
    try:
        value = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise ServiceError(INVALID, f"the {what} body is not valid UTF-8") from None
    except json.JSONDecodeError as exc:
        raise ServiceError(INVALID, f"the {what} body is not valid JSON: {exc.msg} at line {exc.lineno} "
                                    f"column {exc.colno}") from None
    except RecursionError:  # nesting deep enough to exhaust the parser: not a request
        raise ServiceError(INVALID, f"the {what} body is nested too deeply to be a request") from None
    if not isinstance(value, dict):
        raise ServiceError(INVALID, f"the {what} body must be a JSON object, got {type(value).__name__}")
    return value


def to_message(fields: dict[str, Any], message: M) -> M:
    """`message` filled from `fields`; INVALID_ARGUMENT naming the field that does not fit."""
    try:
        return json_format.ParseDict(fields, message)
    except json_format.ParseError as exc:
        # The parser's text names the field and the problem ("no field named ...", "Couldn't parse
        # integer ..."); it quotes at most a field value, which the caller sent.
        raise ServiceError(INVALID, f"{message.DESCRIPTOR.name}: {exc}") from None
    except (TypeError, ValueError, RecursionError) as exc:  # odd shapes the parser does not wrap
        raise ServiceError(INVALID, f"{message.DESCRIPTOR.name}: fields do not fit the message ({exc})") from None


def to_json(message: Message) -> dict[str, Any]:
    """Every field of `message` under its proto name (see the module docstring)."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True, unquote_int64_if_possible=True)


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON (characters as they are, not \\u escapes: fewer bytes per message)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
