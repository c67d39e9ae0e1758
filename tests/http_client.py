"""A plain HTTP client for the HTTP front end's tests: the standard library's http.client, and
a server-sent events reader of its own, so that nothing of the server's HTTP stack (aiohttp)
checks the server's own output.

    http = Http(server.running.http.port)
    reply = http.call("POST", "/v1/generate", {"prompt": "To be", "max_chars": 20})
    events = http.events({"prompt": "To be", "max_chars": 20})  # [(event, data), ...]
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import struct
from dataclasses import dataclass
from typing import Any, Iterator

from server.background import BackgroundServer


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> dict[str, str]:
        """The error object of an error reply ({"code": ..., "message": ...})."""
        value = self.json()
        assert set(value) == {"error"} and set(value["error"]) == {"code", "message"}, value
        return value["error"]


class Http:
    def __init__(self, port: int, host: str = "127.0.0.1", context: ssl.SSLContext | None = None,
                 key: str | None = None, timeout: float = 30.0):
        self.port, self.host, self.context, self.key, self.timeout = port, host, context, key, timeout

    @classmethod
    def of(cls, server: BackgroundServer, **options: Any) -> "Http":
        assert server.running is not None and server.running.http is not None, "the server has no HTTP port"
        return cls(server.running.http.port, **options)

    def connection(self) -> http.client.HTTPConnection:
        if self.context is not None:
            return http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout, context=self.context)
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def headers(self, extra: dict[str, str] | None = None, json_body: bool = False) -> dict[str, str]:
        headers = {"Content-Type": "application/json"} if json_body else {}
        if self.key is not None:
            headers["Authorization"] = f"Bearer {self.key}"
        headers.update(extra or {})
        return headers

    def call(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> Reply:
        """One request: `body` is JSON-encoded unless it is bytes (sent as they are) or None."""
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        connection = self.connection()
        try:
            connection.request(method, path, body=data,
                               headers=self.headers(headers, json_body=data is not None and not isinstance(body, bytes)))
            response = connection.getresponse()
            return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
        finally:
            connection.close()

    def open_stream(self, body: dict[str, Any], headers: dict[str, str] | None = None
                    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """POST /v1/generate asking for server-sent events; the caller reads and closes."""
        connection = self.connection()
        connection.request("POST", "/v1/generate", body=json.dumps(body).encode(),
                           headers=self.headers({"Accept": "text/event-stream", **(headers or {})}, json_body=True))
        return connection, connection.getresponse()

    def events(self, body: dict[str, Any]) -> list[tuple[str, Any]]:
        """Every event of one streamed Generate, in order: (event name, parsed data)."""
        connection, response = self.open_stream(body)
        try:
            assert response.status == 200, (response.status, response.read())
            assert response.getheader("Content-Type", "").startswith("text/event-stream")
            return list(read_events(response))
        finally:
            connection.close()


def read_events(response: http.client.HTTPResponse) -> Iterator[tuple[str, Any]]:
    """Server-sent events as the standard defines them: lines up to a blank one make an event;
    `event:` names it (default "message"), `data:` lines are joined by newlines; comments skipped."""
    name, data = "message", []
    while True:
        raw = response.readline()
        if not raw:  # the end of the body
            return
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                yield name, json.loads("\n".join(data))
            name, data = "message", []
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)


def stream_text(events: list[tuple[str, Any]]) -> str:
    """The text of a stream's message events (each must carry text, or be the last one)."""
    return "".join(data["text"] for name, data in events if name == "message")


def abort_connection(connection: http.client.HTTPConnection, response: http.client.HTTPResponse) -> None:
    """Drop the connection the way a killed client does: a reset (SO_LINGER 0), not an orderly close."""
    sock = connection.sock
    assert sock is not None, "the connection is closed already"
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    response.close()
    connection.close()
