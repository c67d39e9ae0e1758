"""charstream-bench rows 9-11: the prefix-state cache, what the session store costs per call, idle sessions.

  9  time to first character of a --long-prompt one-shot Generate, cold (a prompt never sent before: the
     prefix-state cache misses) and warm (the same prompt again: a full hit), checked on the server's counters
 10  Generate(session, 1 character) one call at a time, and CreateSession, with the in-process store (the first
     server) and with Redis (a third server, --session-store redis://..., against a private redis-server
     started here, or --redis-url)
 11  with --idle-sessions N: N sessions created on the Redis-backed server and left idle; Redis used_memory and
     the server's resident memory before and after

Row 7's prompts come from distinct_prompts too, so that none of its repeats is served by the cache.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import statistics
import time
from contextlib import nullcontext
from typing import Callable, NamedTuple

import grpc

from protos.charstream.v1 import generator_pb2 as pb
from protos.charstream.v1 import generator_pb2_grpc as pb_grpc
from server.bench import clients
from server.bench.context import BenchContext
from server.bench.process import (
    REDIS_SERVER,
    ServerProcess,
    metrics_text,
    private_redis,
    vm_rss_bytes,
)
from server.bench.results import (
    IdleSessionsResult,
    PrefixCacheResult,
    SessionStoreResult,
)

LONG_PROMPT_REPEATS = 3  # row 7 sends prompts 0-2 of distinct_prompts
PREFIX_REPEATS = 3  # row 9 sends prompts 3-5, so nothing row 7 left in the cache serves them
FIRST_CHARS = 1  # row 9's calls ask for one character: the row is about the prompt
CREATES = 10  # CreateSession calls per store in row 10 (the first session takes the timed calls)
IDLE_PROMPT_CHARS = 16
IDLE_IN_FLIGHT = 32
IDLE_SESSIONS_PER_TIMEOUT = 10_000  # row 11 may take --timeout seconds per this many sessions
STORE_MEMORY, STORE_REDIS, IDLE = "session_store_memory", "session_store_redis", "idle_sessions"
REDIS_ROW_IDS = (STORE_REDIS, IDLE)
NO_REDIS = f"{REDIS_SERVER} is not on PATH: install the Debian package redis-server (or give --redis-url)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("rows 9-11: sessions and state")
    group.add_argument("--store-calls", type=int, default=200, metavar="N",
                       help="session calls timed per session store in row 10 (default: 200)")
    group.add_argument("--redis-url", metavar="URL",
                       help="Redis for rows 10 and 11 (redis://HOST:PORT/DB) instead of a private redis-server "
                            "started here; row 11's sessions stay there until they expire")
    group.add_argument("--idle-sessions", type=int, default=0, metavar="N",
                       help="sessions row 11 creates and leaves idle in Redis; 0 skips row 11 (default: 0)")


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.store_calls < 1 or args.idle_sessions < 0:
        parser.error("--store-calls must be >= 1 and --idle-sessions >= 0")
    if args.redis_url is not None and not args.redis_url.startswith("redis://"):
        parser.error(f"--redis-url must be redis://HOST:PORT/DB, got {args.redis_url!r}")


def session_rows(args: argparse.Namespace) -> dict[str, tuple[int, str]]:
    """id -> (row number, title) of rows 9-11, in order."""
    rows = {"prefix_cache": (9, f"server, {args.long_prompt}-char prompt, prefix cache")} if args.long_prompt else {}
    idle = f"{args.idle_sessions:,} idle sessions, Redis store" if args.idle_sessions else "idle sessions, Redis store"
    return rows | {STORE_MEMORY: (10, "session store memory, 1-char session call"),
                   STORE_REDIS: (10, "session store redis, 1-char session call"), IDLE: (11, idle)}


def distinct_prompts(vocabulary: str, length: int, count: int, first: int = 0) -> list[str]:
    """`count` prompts of `length` characters: prompt k is the vocabulary rotated to start at its character
    first + k, repeated. Each starts with a character of its own, so none is a prefix of another, and the
    prefix-state cache (which serves a prompt from any cached text that is a prefix of it) cannot serve one
    from another, nor from the prompts of a disjoint range of `first`."""
    if length < 1 or first < 0 or first + count > len(vocabulary):
        raise ValueError(f"{count} prompts from rotation {first} need length >= 1 and at least {first + count} "
                         f"vocabulary characters (have {len(vocabulary)})")
    prompts = []
    for k in range(first, first + count):
        rotated = vocabulary[k:] + vocabulary[:k]
        prompts.append((rotated * (length // len(vocabulary) + 1))[:length])
    return prompts


class CacheCounts(NamedTuple):
    """The server's prefix-state cache counters."""

    hits: float
    misses: float
    skipped_chars: float


def cache_counts(server: ServerProcess) -> CacheCounts | None:
    """The counters now, or None where the metrics endpoint is off, silent or has no prefix cache."""
    text = metrics_text(server.metrics_url())
    if text is None or "charstream_prefix_cache_lookups" not in text:
        return None

    def value(pattern: str) -> float:
        # A labelled counter appears only once it has counted something: absent means 0.
        found = re.search(pattern, text, re.MULTILINE)  # type: ignore[arg-type]
        return float(found.group(1)) if found else 0.0

    lookups = r'^charstream_prefix_cache_lookups_total\{{result="{}"\}} (\S+)$'
    return CacheCounts(value(lookups.format("hit")), value(lookups.format("miss")),
                       value(r"^charstream_prefix_cache_skipped_chars_total (\S+)$"))


def hits_between(before: CacheCounts | None, after: CacheCounts | None) -> tuple[int | None, int | None]:
    """(cache hits, characters skipped) between two readings; (None, None) where either is unknown."""
    if before is None or after is None:
        return None, None
    return round(after.hits - before.hits), round(after.skipped_chars - before.skipped_chars)


def remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError()
    return left


def first_char_s(address: str, prompt: str, seed: int, deadline: float) -> float:
    """Seconds to the first character of one one-shot Generate call."""
    run = clients.bounded(clients.run_streams(address, prompt, 1, FIRST_CHARS, seed), remaining(deadline))
    return run.streams[0].first_char_s


def prefix_cache_row(bench: BenchContext, server: ServerProcess) -> None:
    """Row 9: every cold prompt is new to the server; every warm call re-sends one of them."""
    def measure(row: int, row_id: str, title: str) -> PrefixCacheResult:
        length, deadline = bench.args.long_prompt, bench.deadline()
        prompts = distinct_prompts("".join(bench.info.vocabulary), length, PREFIX_REPEATS,  # type: ignore[union-attr]
                                   first=LONG_PROMPT_REPEATS)
        counts = [cache_counts(server)]
        cold = [first_char_s(server.address, prompt, 2000 + i, deadline) for i, prompt in enumerate(prompts)]
        counts.append(cache_counts(server))
        warm = [first_char_s(server.address, prompt, 3000 + i, deadline) for i, prompt in enumerate(prompts)]
        counts.append(cache_counts(server))
        cold_hits, _ = hits_between(counts[0], counts[1])
        warm_hits, skipped = hits_between(counts[1], counts[2])
        cold_ms, warm_ms = statistics.median(cold) * 1000, statistics.median(warm) * 1000
        runs = f"medians of {PREFIX_REPEATS}"
        status, note = "ok", f"{runs}; warm hits {warm_hits}/{PREFIX_REPEATS}, {skipped} chars skipped"
        if warm_hits is None:
            note = f"{runs}; the cache counters were not readable, hits unconfirmed"
        elif warm_hits < PREFIX_REPEATS:
            status, note = "failed", f"warm calls hit the prefix cache {warm_hits}/{PREFIX_REPEATS} times"
        elif cold_hits:
            status, note = "failed", f"cold calls hit the prefix cache {cold_hits}/{PREFIX_REPEATS} times: not cold"
        return PrefixCacheResult(row=row, id=row_id, title=title, status=status, note=note, prompt_chars=length,
                                 cold_first_char_ms=cold_ms, warm_first_char_ms=warm_ms,
                                 cold_over_warm=cold_ms / warm_ms if warm_ms > 0 else None, repeats=PREFIX_REPEATS,
                                 cold_hits=cold_hits, warm_hits=warm_hits, skipped_chars=skipped)
    bench.attempt("prefix_cache", measure)


def _timed(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def session_call_times(address: str, prompt: str, calls: int, deadline: float) -> tuple[list[float], list[float]]:
    """(seconds of each CreateSession, of each Generate(session, 1 character)), one call at a time."""
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GeneratorStub(channel)
        grpc.channel_ready_future(channel).result(timeout=remaining(deadline))
        ids: list[str] = []
        creates = [_timed(lambda: ids.append(stub.CreateSession(pb.CreateSessionRequest(prompt=prompt, seed=seed),
                                                                timeout=remaining(deadline)).session_id))
                   for seed in range(CREATES)]
        request = pb.GenerateRequest(session_id=ids[0], max_chars=1)

        def generate() -> None:
            for _ in stub.Generate(request, timeout=remaining(deadline)):
                pass

        generate()  # not timed: the first call also consumes the prompt
        times = [_timed(generate) for _ in range(calls)]
        for session_id in ids:
            stub.DeleteSession(pb.DeleteSessionRequest(session_id=session_id), timeout=remaining(deadline))
    return creates, times


def store_row(bench: BenchContext, server: ServerProcess, row_id: str, store: str) -> None:
    """Row 10 for one store: the per-call latency of a session call, and of creating a session."""
    def measure(row: int, row_id: str, title: str) -> SessionStoreResult:
        calls = bench.args.store_calls
        creates, times = session_call_times(server.address, bench.prompt, calls, bench.deadline())
        return SessionStoreResult(row=row, id=row_id, title=title, note=f"{calls} calls; {CREATES} creates",
                                  store=store, calls=calls, call_ms_p50=clients.percentile_ms(times, 50),
                                  call_ms_p99=clients.percentile_ms(times, 99), creates=CREATES,
                                  create_ms_p50=clients.percentile_ms(creates, 50))
    bench.attempt(row_id, measure)


async def create_sessions(address: str, prompt: str, count: int) -> None:
    """`count` CreateSession calls, IDLE_IN_FLIGHT at a time, on one channel."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GeneratorStub(channel)
        await channel.channel_ready()
        indices = iter(range(count))  # shared by the workers: each index is taken once

        async def worker() -> None:
            for _ in indices:
                await stub.CreateSession(pb.CreateSessionRequest(prompt=prompt))

        await asyncio.gather(*(worker() for _ in range(min(IDLE_IN_FLIGHT, count))))


def idle_row(bench: BenchContext, server: ServerProcess, url: str) -> None:
    """Row 11: sessions created and left; they expire with the session TTL (or with the private Redis)."""
    def measure(row: int, row_id: str, title: str) -> IdleSessionsResult:
        import redis  # the server's Redis extra; only this row needs it

        count = bench.args.idle_sessions
        timeout = bench.args.timeout * max(1.0, count / IDLE_SESSIONS_PER_TIMEOUT)
        client = redis.Redis.from_url(url)
        try:
            used_before, rss_before = int(client.info("memory")["used_memory"]), vm_rss_bytes(server.process.pid)
            started = time.monotonic()
            try:
                clients.bounded(create_sessions(server.address, bench.prompt[:IDLE_PROMPT_CHARS], count), timeout)
            except TimeoutError:
                raise TimeoutError(f"not done within {timeout:g} s (--timeout per {IDLE_SESSIONS_PER_TIMEOUT:,} "
                                   "sessions)") from None
            seconds = time.monotonic() - started
            used_after, rss_after = int(client.info("memory")["used_memory"]), vm_rss_bytes(server.process.pid)
        finally:
            client.close()
        per_session = (used_after - used_before) / count
        rss = "unknown" if rss_before is None or rss_after is None else \
            f"{rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MB"
        note = (f"created in {seconds:.1f} s ({count / seconds:,.0f}/s); Redis used_memory "
                f"{used_before / 2**20:.1f} -> {used_after / 2**20:.1f} MB; server RSS {rss}")
        return IdleSessionsResult(row=row, id=row_id, title=title, note=note, sessions=count, seconds=seconds,
                                  redis_used_memory_before=used_before, redis_used_memory_after=used_after,
                                  redis_bytes_per_session=per_session, server_rss_before=rss_before,
                                  server_rss_after=rss_after)
    bench.attempt(IDLE, measure)


def first_server_rows(bench: BenchContext, server: ServerProcess) -> None:
    """Rows 9 and 10 (in-process store) against the first server, after its other rows."""
    if bench.args.long_prompt > 0:
        prefix_cache_row(bench, server)
    store_row(bench, server, STORE_MEMORY, "memory")


Serve = Callable[[str, Callable[[ServerProcess], None], list[str]], None]


def redis_rows(bench: BenchContext, serve: Serve) -> None:
    """Rows 10 (Redis) and 11 against a server using Redis: serve(url, measure, row ids) runs that server.
    A private redis-server is always stopped on the way out, Ctrl-C included."""
    args = bench.args
    wanted = [STORE_REDIS] + ([IDLE] if args.idle_sessions > 0 else [])
    if args.idle_sessions <= 0:
        bench.note(IDLE, "skipped", "give --idle-sessions N to measure")
    if args.redis_url is None and shutil.which(REDIS_SERVER) is None:
        for row_id in wanted:
            bench.note(row_id, "skipped", NO_REDIS)
        return

    def measure(url: str, server: ServerProcess) -> None:
        bench.info = bench.info or clients.model_info(server.address, args.timeout)
        store_row(bench, server, STORE_REDIS, url)
        if args.idle_sessions > 0:
            idle_row(bench, server, url)

    try:
        with nullcontext(args.redis_url) if args.redis_url else private_redis() as url:
            print(f"redis: {url}{'' if args.redis_url else ' (private)'}", file=bench.log, flush=True)
            serve(url, lambda server: measure(url, server), wanted)
    except Exception as exc:  # noqa: BLE001 - a Redis that will not start fails its rows, not the run
        bench.fail_unmeasured(wanted, exc)
