"""One /metrics for a server of several front-ends: each front-end's exposition, merged.

Each front-end counts what it serves (streams, messages, errors), and the
engine's own figures (observations, cache size, session count and removals) go
to one of them (child_links.Links.observer), so adding the front-ends' samples
gives the server's figures: counters, histogram buckets and gauges alike. A
`_created` sample (a timestamp) is the earliest. The session count and removals
are taken as their largest value rather than added: a front-end that took over
from one that died starts from the engine's totals.

    MergedMetrics(lambda: [port, ...]).serve(host, port)   # an HTTP server on a thread
"""

from __future__ import annotations

import socket
import threading
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ENGINE_TOTALS = ("charstream_active_sessions", "charstream_sessions_removed")
SCRAPE_TIMEOUT = 5.0
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def merge_expositions(texts: list[str]) -> str:
    """Prometheus text expositions of the same metrics, as one: samples with the same name and
    labels combined (module docstring), comments and order from their first appearance."""
    lines: list[str] = []
    values: dict[str, float] = {}
    seen_comments: set[str] = set()
    for text in texts:
        for line in text.splitlines():
            if not line.strip():
                continue
            if line.startswith("#"):
                if line not in seen_comments:
                    seen_comments.add(line)
                    lines.append(line)
                continue
            key, _, value_text = line.rpartition(" ")
            try:
                value = float(value_text)
            except ValueError:
                continue
            if key not in values:
                lines.append(key)
                values[key] = value
            else:
                values[key] = _combine(key, values[key], value)
    return "\n".join(line if line.startswith("#") else f"{line} {_format(values[line])}" for line in lines) + "\n"


def _combine(key: str, old: float, new: float) -> float:
    name = key.split("{", 1)[0]
    if name.endswith("_created"):
        return min(old, new)
    if name.startswith(ENGINE_TOTALS):
        return max(old, new)
    return old + new


def _format(value: float) -> str:
    return repr(float(value)) if value != int(value) or abs(value) > 2**53 else f"{int(value)}.0"


class MergedMetrics:
    """Serves the merge of the front-ends' metrics (their loopback ports, as `ports()` says now)."""

    def __init__(self, ports: Callable[[], list[int]]):
        self._ports = ports
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    def scrape(self) -> str:
        texts = []
        for port in self._ports():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=SCRAPE_TIMEOUT) as reply:
                    texts.append(reply.read().decode())
            except OSError:  # a front-end exiting or restarting: the others still count
                continue
        return merge_expositions(texts)

    def serve(self, host: str, port: int) -> MergedMetrics:
        merged = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path.split("?", 1)[0] not in ("/metrics", "/"):
                    self.send_error(404, "only /metrics is served here")
                    return
                body = merged.scrape().encode()
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - scrapes are not logged
                return

        address = host.strip("[]")
        family = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)[0][0]

        class Server(ThreadingHTTPServer):
            address_family = family  # IPv6 hosts too (the base class is IPv4 only)

        self._server = Server((address, port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="charstream-metrics", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
