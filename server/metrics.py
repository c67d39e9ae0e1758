"""Prometheus metrics of one server, in a registry of its own (several servers may share a process)."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Callable
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)

if TYPE_CHECKING:
    from server.engine.prefix_cache import PrefixCache

STEP_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.active_sessions = Gauge(
            "charstream_active_sessions", "Live sessions in the store.", registry=self.registry
        )
        self.active_streams = Gauge(
            "charstream_active_streams", "Generate calls and Converse turns streaming now.", registry=self.registry
        )
        self.generated_chars = Counter(
            "charstream_generated_chars", "Characters generated and delivered to clients.", registry=self.registry
        )
        self.finished = Counter(
            "charstream_generations_finished", "Generations ended, by finish reason.", ["reason"], registry=self.registry
        )
        self.sessions_removed = Counter(
            "charstream_sessions_removed", "Sessions removed, by reason.", ["reason"], registry=self.registry
        )
        self.step_seconds = Histogram(
            "charstream_step_seconds", "Wall time of one batched model step (a stretch's call, a lone session's "
            "or a batch's, counts as one).", buckets=STEP_BUCKETS, registry=self.registry
        )
        self.batch_size = Histogram(
            "charstream_batch_size", "Sessions in one batched model step (or stretch call).", buckets=BATCH_BUCKETS,
            registry=self.registry
        )
        self.stream_messages = Counter(
            "charstream_stream_messages", "Streamed messages that carried text (each holds every character ready "
            "for its stream: characters per message grow with load).", registry=self.registry,
        )
        self.undelivered_chars = Gauge(
            "charstream_undelivered_chars", "Characters generated ahead of delivery, all streams together.",
            registry=self.registry,
        )
        self.most_undelivered_chars = Gauge(
            "charstream_most_undelivered_chars", "Characters generated ahead of delivery by the stream furthest "
            "ahead (at most --lookahead).", registry=self.registry,
        )
        self.prefix_cache_lookups = Counter(
            "charstream_prefix_cache_lookups", "Prompts of fresh sessions looked up in the prefix-state cache, by "
            "result (hit: it started after a cached text).", ["result"], registry=self.registry,
        )
        self.prefix_cache_skipped_chars = Counter(
            "charstream_prefix_cache_skipped_chars", "Prompt characters not consumed thanks to the prefix-state cache.",
            registry=self.registry,
        )
        self.prefix_cache_bytes = Gauge(
            "charstream_prefix_cache_bytes", "Bytes held by the prefix-state cache.", registry=self.registry
        )
        self.prefix_cache_entries = Gauge(
            "charstream_prefix_cache_entries", "Texts held by the prefix-state cache.", registry=self.registry
        )
        self.stretch_chars = Counter(
            "charstream_stretch_chars", "Characters a lone stream's stretches sampled in one model call, by result "
            "(kept; discarded: after a disagreement with the server's sampler, or past a stop string).",
            ["result"], registry=self.registry,
        )
        self.rpc_errors = Counter(
            "charstream_rpc_errors", "RPCs that ended with an error status, by method and code.",
            ["method", "code"], registry=self.registry,
        )

    def track_sessions(self, count: Callable[[], int]) -> None:
        """Read the session count at scrape time."""
        self.active_sessions.set_function(lambda: float(count()))

    def observe_step(self, batch_size: int, seconds: float) -> None:
        """Called on the engine thread after every step (prometheus_client is thread-safe)."""
        self.step_seconds.observe(seconds)
        self.batch_size.observe(batch_size)

    def observe_lookahead(self, total: int, most: int) -> None:
        """Called on the engine thread after sampling."""
        self.undelivered_chars.set(total)
        self.most_undelivered_chars.set(most)

    def observe_prefix_cache(self, hit: bool, skipped_chars: int, cache: "PrefixCache") -> None:
        """Called on the engine thread after each prefix-cache lookup."""
        self.prefix_cache_lookups.labels(result="hit" if hit else "miss").inc()
        self.prefix_cache_skipped_chars.inc(skipped_chars)

    def observe_stretch(self, sampled: int, kept: int) -> None:
        """Called on the engine thread after each stretch (stretch.py)."""
        self.stretch_chars.labels(result="kept").inc(kept)
        self.stretch_chars.labels(result="discarded").inc(sampled - kept)

    def track_prefix_cache(self, cache: "PrefixCache") -> None:
        """Read the cache's size at scrape time (plain int reads: safe beside the engine thread)."""
        self.prefix_cache_bytes.set_function(lambda: float(cache.bytes))
        self.prefix_cache_entries.set_function(lambda: float(cache.entries))

    def count_error(self, method: str, code: grpc.StatusCode) -> None:
        self.rpc_errors.labels(method=method, code=code.name).inc()

    def serve(self, host: str, port: int) -> "MetricsEndpoint":
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        return MetricsEndpoint(server, thread)


class MetricsEndpoint:
    """The /metrics HTTP server, running on its own thread."""

    def __init__(self, server: WSGIServer, thread: threading.Thread):
        self._server = server
        self._thread = thread
        self.port: int = server.server_address[1]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
