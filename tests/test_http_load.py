"""64 server-sent-event streams over HTTP beside 64 gRPC streams on one server, all at once:
every stream's text is exactly its seed's text (nothing lost, repeated or mixed up between
the two front ends), within a time bound."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from server.background import BackgroundServer
from server.clients.client import CharstreamClient
from server.config import ServerConfig
from tests.http_client import Http, stream_text

STREAMS, CHARS, PROMPT = 64, 400, "To be"
BOUND_SECONDS = 120


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[BackgroundServer]:
    config = ServerConfig(model=str(tiny_model_dir), port=0, http_port=0, device="cpu", max_sessions=2 * STREAMS + 8)
    with BackgroundServer(config) as running:
        yield running


def run_all(jobs: list[Callable[[], None]]) -> None:
    """Start every job at once (a barrier), wait for all within the bound; re-raise the first failure."""
    barrier = threading.Barrier(len(jobs))
    failures: list[BaseException] = []

    def worker(job: Callable[[], None]) -> None:
        try:
            barrier.wait(timeout=30)
            job()
        except BaseException as exc:  # noqa: BLE001 - reported on the test's thread
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(job,), daemon=True) for job in jobs]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + BOUND_SECONDS
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    assert not any(thread.is_alive() for thread in threads), f"streams still running after {BOUND_SECONDS} s"
    if failures:
        raise failures[0]


@pytest.mark.slow
def test_64_sse_streams_beside_64_grpc_streams_lose_and_repeat_nothing(server: BackgroundServer) -> None:
    with CharstreamClient(server.address, timeout=60) as client:
        expected = [client.generate(PROMPT, CHARS, temperature=1.0, seed=seed).text() for seed in range(STREAMS)]
        assert len(set(expected)) > STREAMS // 2  # the seeds give different texts: a mix-up would show
        http = Http.of(server, timeout=60)
        http_texts: dict[int, str] = {}
        grpc_texts: dict[int, str] = {}

        def over_http(seed: int) -> None:
            events = http.events({"prompt": PROMPT, "max_chars": CHARS, "temperature": 1.0, "seed": seed})
            last = events[-1][1]
            assert (last["finish_reason"], last["generated_chars"]) == ("FINISH_REASON_LENGTH", CHARS)
            http_texts[seed] = stream_text(events)

        def over_grpc(seed: int) -> None:
            grpc_texts[seed] = client.generate(PROMPT, CHARS, temperature=1.0, seed=seed).text()

        started = time.monotonic()
        run_all([lambda s=seed: over_http(s) for seed in range(STREAMS)]
                + [lambda s=seed: over_grpc(s) for seed in range(STREAMS)])
        elapsed = time.monotonic() - started

    assert [http_texts[seed] for seed in range(STREAMS)] == expected
    assert [grpc_texts[seed] for seed in range(STREAMS)] == expected
    assert elapsed < BOUND_SECONDS
