"""Server-sent events (the WHATWG HTML standard's text/event-stream) as this API writes them.

Each event is one `data:` line holding one JSON object, then a blank line; an error
event is named (`event: error`), the others are the default `message` events:

    data: {"text":"To be"}

    data: {"text":", or","finish_reason":"FINISH_REASON_LENGTH","generated_chars":9,...}

    event: error
    data: {"error":{"code":"INTERNAL","message":"generation failed; the server log has details"}}

JSON never holds a raw line break (it escapes them in strings), so one `data:` line
always carries the whole object, and a client splits the stream at blank lines.
"""

from __future__ import annotations

from typing import Any

from server.http.codec import dumps

EVENT_STREAM = "text/event-stream"


def sse_event(payload: Any, event: str | None = None) -> bytes:
    """One event carrying `payload` as JSON (`event`: its name; None = a plain message)."""
    head = f"event: {event}\n".encode("ascii") if event else b""
    return head + b"data: " + dumps(payload) + b"\n\n"
