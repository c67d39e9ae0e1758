"""charstream-bench rows 5, 6 and 12 (client side): one row's streams spread over several client processes.

A few hundred grpc.aio streams in one Python process keep that process's
interpreter busy: past some load the row measures how fast one core can run
the clients, not how fast the server streams. So a row's streams can be split
over --client-processes child processes (multiprocessing, 'spawn': a fresh
interpreter each, no forked gRPC state), each running its contiguous share of
clients.run_streams on its own event loop. Stream i keeps seed
first_seed + i whichever process runs it, so the text is that of a run in
one process.

They start together: each child connects its channels and says so; once
every child has, the parent hands all of them one start time a little ahead
(time.monotonic(): CLOCK_MONOTONIC, the same clock in every process on the
machine) and each waits for it. The merged run's time runs from that common
start to the end of the last stream in any child, so chars/s is every
child's characters over that span. Children are terminated whatever happens
(an error, --timeout, Ctrl-C).

    run = run_spread("127.0.0.1:50051", "To be", streams=256, chars=400, first_seed=1, processes=2, timeout=60)
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
from multiprocessing.connection import Connection, wait
from typing import Any

from server.bench import clients
from server.bench.clients import StreamsRun
from server.bench.process import ServerProcess, batch_totals
from server.bench.results import StreamsResult

# The common start is handed out this far ahead, so that it reaches every child before it passes.
START_LEAD_S = 0.05
# A child polls its pipe for the start time this often: far below START_LEAD_S.
GATE_POLL_S = 0.002
ONE_PROCESS_UP_TO = 64  # streams that one client process runs by default (rows 5 and 6's default --streams)
MOST_DEFAULT_PROCESSES = 4
STOP_GRACE_S = 2.0


def default_client_processes(streams: int) -> int:
    """Client processes for `streams` streams when --client-processes is not given."""
    return 1 if streams <= ONE_PROCESS_UP_TO else min(MOST_DEFAULT_PROCESSES, os.cpu_count() or 1)


def client_processes(wanted: int | None, streams: int) -> int:
    """The processes a row of `streams` streams runs on: --client-processes (or its default), never more
    than there are streams."""
    return max(1, min(default_client_processes(streams) if wanted is None else wanted, streams))


def shares(streams: int, processes: int) -> list[tuple[int, int]]:
    """(first stream index, count) per process: contiguous, in stream order, sizes differing by at most one."""
    processes = max(1, min(processes, streams))
    base, extra = divmod(streams, processes)
    found, first = [], 0
    for k in range(processes):
        count = base + (1 if k < extra else 0)
        found.append((first, count))
        first += count
    return found


def merge_runs(parts: list[StreamsRun], start: float) -> StreamsRun:
    """Children's runs, in stream order, as one: their streams in order, timed from the common `start`
    (time.monotonic()) to the latest end of any of them."""
    end = max(part.started_at + part.seconds for part in parts)
    return StreamsRun(end - start, [stream for part in parts for stream in part.streams], start)


def _child(conn: Connection, address: str, prompt: str, first: int, count: int, chars: int, first_seed: int,
           keep_text: bool, timeout: float) -> None:
    """A client process: connect, say "ready", wait for the common start, run the share, send the run."""
    async def gate() -> None:
        conn.send(("ready", None))
        # Polled rather than waited on in a thread: a thread blocked on recv() would hold up the event
        # loop's shutdown after a timeout.
        while not conn.poll():
            await asyncio.sleep(GATE_POLL_S)
        await asyncio.sleep(max(0.0, conn.recv() - time.monotonic()))

    try:
        run = clients.bounded(clients.run_streams(address, prompt, count, chars, first_seed + first,
                                                  keep_text=keep_text, gate=gate), timeout)
        conn.send(("done", run))
    except BaseException as exc:  # noqa: BLE001 - said to the parent, which raises it
        try:
            conn.send(("error", f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__))
        except OSError:
            pass
    finally:
        conn.close()


def _collect(children: list[tuple[Any, Connection]], kind: str, deadline: float) -> list[Any]:
    """One `kind` message from every child, in child order; a child's error, its exit or the deadline raises."""
    pending = {conn: k for k, (_, conn) in enumerate(children)}
    found: dict[int, Any] = {}
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{len(pending)} of {len(children)} client processes not {kind} within --timeout")
        for conn in wait(list(pending), timeout=left):
            k = pending.pop(conn)  # type: ignore[call-overload]
            try:
                what, value = conn.recv()  # type: ignore[union-attr]
            except EOFError:
                children[k][0].join(STOP_GRACE_S)
                raise RuntimeError(f"client process {k} exited (code {children[k][0].exitcode}) before {kind}") \
                    from None
            if what == "error":
                raise RuntimeError(f"client process {k}: {value}")
            found[k] = value
    return [found[k] for k in range(len(children))]


def _stop(process: Any) -> None:
    """Terminate (then kill) a child that is still running; always reaped."""
    if process.is_alive():
        process.terminate()
        process.join(STOP_GRACE_S)
        if process.is_alive():
            process.kill()
    process.join()


def run_spread(address: str, prompt: str, streams: int, chars: int, first_seed: int, processes: int,
               timeout: float, keep_text: bool = False) -> StreamsRun:
    """`streams` one-shot streams (seeds first_seed + i) over `processes` client processes, started
    together, at most `timeout` seconds in all; in this process (clients.bounded) when 1."""
    if processes <= 1 or streams <= 1:
        return clients.bounded(clients.run_streams(address, prompt, streams, chars, first_seed,
                                                   keep_text=keep_text), timeout)
    context = multiprocessing.get_context("spawn")
    deadline = time.monotonic() + timeout
    children: list[tuple[Any, Connection]] = []
    try:
        for k, (first, count) in enumerate(shares(streams, processes)):
            mine, theirs = context.Pipe()
            process = context.Process(target=_child, name=f"charstream-bench-clients-{k}", daemon=True,
                                      args=(theirs, address, prompt, first, count, chars, first_seed, keep_text,
                                            timeout))
            children.append((process, mine))
            process.start()
            theirs.close()  # the child's end lives in the child now: its exit shows here as EOF
        _collect(children, "ready", deadline)
        start = time.monotonic() + START_LEAD_S
        for _, conn in children:
            conn.send(start)
        return merge_runs(_collect(children, "done", deadline), start)
    finally:
        for process, conn in children:
            _stop(process)
            conn.close()


def measure_streams(server: ServerProcess, prompt: str, streams: int, chars: int, processes: int, timeout: float,
                    *, row: int, row_id: str, title: str) -> StreamsResult:
    """`streams` one-shot streams of `chars` characters (seeds 1, 2, ...) over `processes` client processes,
    measured once, with the server's mean batch over them."""
    before = batch_totals(server.metrics_url())
    run = run_spread(server.address, prompt, streams, chars, 1, processes, timeout)
    after = batch_totals(server.metrics_url())
    steps = after[1] - before[1] if before and after else 0
    return StreamsResult(
        row=row, id=row_id, title=title, streams=streams, chars_per_stream=chars,
        total_chars=run.total_chars, messages=run.messages, seconds=run.seconds,
        chars_per_s=run.total_chars / run.seconds, chars_per_message=run.total_chars / max(1, run.messages),
        first_char_ms_p50=run.first_char_ms(50), first_char_ms_p99=run.first_char_ms(99),
        gap_ms_p50=run.gap_ms(50), gap_ms_p99=run.gap_ms(99),
        mean_batch=(after[0] - before[0]) / steps if steps else None,  # type: ignore[index]
        server_flags=server.flags, client_processes=len(shares(streams, processes)))
