"""charstream-loadtest / python -m server.bench.loadtest: a bounded load test that checks every character.

`--streams` workers (loadtest_workers.py) run concurrently over grpc.aio
in this process for `--seconds`, then get at most `--drain-seconds` to finish
the check of the session they are on. Each worker's sessions are cancelled at
random, continued, and compared with a reference session generated in one call.

Against `--target HOST:PORT`, or a server started here on `--model DIR` (a
subprocess on 127.0.0.1, port 0, always stopped; its resident memory is read
from /proc). Prints a table, optionally writes `--json PATH`; exit status 1 on
any mismatch, lost or repeated character, unexpected status or worker stuck
past the drain time, 2 when the server cannot be started or does not answer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence, TextIO

import grpc

from protos.charstream.v1 import generator_pb2 as pb
from protos.charstream.v1 import generator_pb2_grpc as pb_grpc
from server.bench.loadtest_workers import (
    UNARY_TIMEOUT,
    LoadStats,
    WorkerContext,
    bearer,
    stream,
    worker,
)
from server.bench.process import (
    ServerStartError,
    metrics_text,
    running_server,
    vm_rss_bytes,
)

STREAMS_PER_CHANNEL = 32
# Separate channels share one connection unless each has its own subchannel pool.
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]
MiB = 1024 * 1024


class _RssMonitor:
    """The server process's peak resident memory, sampled while the load runs."""

    def __init__(self, pid: int | None):
        self.pid = pid
        self.peak: int | None = None
        self._task: asyncio.Task | None = None

    def sample(self) -> int | None:
        rss = vm_rss_bytes(self.pid) if self.pid is not None else None
        if rss is not None:
            self.peak = max(self.peak or 0, rss)
        return rss

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(0.2)

    def __enter__(self) -> "_RssMonitor":
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._task is not None
        self._task.cancel()


def active_sessions_metric(metrics_url: str | None) -> float | None:
    text = metrics_text(metrics_url)
    for line in (text or "").splitlines():
        if line.startswith("charstream_active_sessions "):
            return float(line.split()[1])
    return None


def _channel(address: str, args: argparse.Namespace) -> grpc.aio.Channel:
    if args.tls_ca:
        credentials = grpc.ssl_channel_credentials(root_certificates=Path(args.tls_ca).read_bytes())
        return grpc.aio.secure_channel(address, credentials, options=CHANNEL_OPTIONS)
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)


async def _drive(ctx: WorkerContext, stubs: list[pb_grpc.GeneratorStub], args: argparse.Namespace) -> float:
    """All workers until --seconds, then at most --drain-seconds to finish their checks; the time taken."""
    started = time.monotonic()
    deadline = started + args.seconds
    tasks = [asyncio.ensure_future(worker(ctx, stubs[i % len(stubs)], args.seed * 1_000_003 + i, deadline))
             for i in range(args.streams)]
    _, pending = await asyncio.wait(tasks, timeout=args.seconds + args.drain_seconds)
    for task in pending:  # bounded: a worker stuck past the drain time is a failure
        task.cancel()
    ctx.stats.unfinished_workers = len(pending)
    await asyncio.gather(*tasks, return_exceptions=True)
    return time.monotonic() - started


async def run_load(args: argparse.Namespace, address: str, pid: int | None, metrics_url: str | None) -> dict[str, Any]:
    """The load test against a running server; the report as a JSON-ready dict."""
    channels = [_channel(address, args) for _ in range(max(1, math.ceil(args.streams / STREAMS_PER_CHANNEL)))]
    try:
        stubs = [pb_grpc.GeneratorStub(channel) for channel in channels]
        metadata = bearer(args.api_key)
        info = await stubs[0].GetModelInfo(pb.GetModelInfoRequest(), timeout=UNARY_TIMEOUT, metadata=metadata)
        ctx = WorkerContext(info, args.api_key, args.call_timeout)
        # Warm-up: every connection and the model's first steps, before the baseline is taken.
        warm = pb.GenerateRequest(prompt=ctx.vocab[0], max_chars=8)
        await asyncio.gather(*(stream(ctx, stubs[i % len(stubs)], warm, None) for i in range(args.streams)))
        monitor = _RssMonitor(pid)
        rss_start = monitor.sample()
        with monitor:
            seconds = await _drive(ctx, stubs, args)
        await asyncio.sleep(args.settle_seconds)  # deleted sessions and finished streams release their memory
        try:
            left: int | None = len((await stubs[0].ListSessions(pb.ListSessionsRequest(), timeout=UNARY_TIMEOUT,
                                                                metadata=metadata)).sessions)
        except grpc.aio.AioRpcError:  # an operator call some deployments refuse
            left = None
        rss_end = monitor.sample()
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))
    return build_report(ctx.stats, target=address, seconds=round(seconds, 2), streams=args.streams, seed=args.seed,
                        model={"file": info.model_file, "variant": info.variant, "provider": info.execution_provider},
                        sessions_left=left, active_sessions_metric=active_sessions_metric(metrics_url),
                        rss_bytes={"start": rss_start, "peak": monitor.peak, "end": rss_end})


def build_report(stats: LoadStats, **fields: Any) -> dict[str, Any]:
    """The JSON report: the counters, the verdict and the run's other `fields`."""
    counters = {**asdict(stats), "finished": dict(stats.finished), "errors": dict(stats.errors)}
    return {"schema": "charstream-loadtest/1", "ok": not stats.failed, **fields, "stats": counters}


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / MiB:.1f} MiB"


def print_table(report: dict[str, Any], out: TextIO | None = None) -> None:
    out = out or sys.stdout  # looked up at call time: callers may have replaced it
    stats, rss = report["stats"], report["rss_bytes"]
    rows = [
        ("target", f"{report['target']} ({report['model']['variant']} on {report['model']['provider']})"),
        ("streams x seconds", f"{report['streams']} x {report['seconds']} s"),
        ("sessions (checked)", f"{stats['sessions']} ({stats['sessions_checked']})"),
        ("streams started", stats["streams_started"]),
        *((f"  finished: {reason}", count) for reason, count in sorted(stats["finished"].items())),
        ("  cancelled by client", stats["cancelled"]),
        ("reference streams", stats["reference_streams"]),
        ("characters received", stats["chars_received"]),
        ("handed over, not received", stats["handed_not_received"]),
        ("rpc errors", ", ".join(f"{k} {v}" for k, v in sorted(stats["errors"].items())) or "none"),
        ("mismatches", stats["mismatches"]),
        ("lost / repeated chars", f"{stats['lost_chars']} / {stats['repeated_chars']}"),
        ("unfinished workers", stats["unfinished_workers"]),
        ("server RSS start / peak / end", f"{_mib(rss['start'])} / {_mib(rss['peak'])} / {_mib(rss['end'])}"),
        ("sessions left (ListSessions)", "n/a" if report["sessions_left"] is None else report["sessions_left"]),
        ("charstream_active_sessions", "n/a" if report["active_sessions_metric"] is None
         else f"{report['active_sessions_metric']:g}"),
        ("result", "OK" if report["ok"] else "FAILED"),
    ]
    for name, value in rows:
        print(f"  {name:<31} {value}", file=out)
    for text in stats["problems"]:
        print(f"  problem: {text}", file=out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="charstream-loadtest", description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--target", help="HOST:PORT of a running server (this or --model is required)")
    where.add_argument("--model", help="model directory: start a server on 127.0.0.1, port 0 (always stopped; "
                                       "this or --target is required)")
    parser.add_argument("--api-key", help="sent as 'authorization: Bearer KEY'")
    parser.add_argument("--tls-ca", help="PEM CA bundle: connect to --target over TLS")
    parser.add_argument("--metrics-port", type=int, help="the --target server's metrics port (its host)")
    parser.add_argument("--streams", type=int, default=200, help="concurrent workers (default 200)")
    parser.add_argument("--seconds", type=float, default=60.0, help="seconds workers start new calls (default 60)")
    parser.add_argument("--drain-seconds", type=float, default=120.0, help="then most seconds to finish checks")
    parser.add_argument("--call-timeout", type=float, default=300.0, help="deadline of each Generate call")
    parser.add_argument("--settle-seconds", type=float, default=2.0, help="wait before the final memory reading")
    parser.add_argument("--seed", type=int, default=1, help="seed of the workers' random choices")
    parser.add_argument("--device", help="--model only: passed to the server")
    parser.add_argument("--variant", help="--model only: passed to the server")
    parser.add_argument("--frontends", type=int, help="--model only: passed to the server (gRPC front-end processes)")
    parser.add_argument("--json", help="write the report here as JSON")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.streams < 1 or args.seconds <= 0:
        parser.error("--streams must be >= 1 and --seconds > 0")
    if args.frontends is not None and (not args.model or args.frontends < 1):
        parser.error("--frontends goes with --model and is >= 1")
    if args.model and (args.api_key or args.tls_ca or args.metrics_port is not None):
        parser.error("--api-key, --tls-ca and --metrics-port go with --target")
    return args


def _server_flags(args: argparse.Namespace) -> list[str]:
    # Two sessions per worker at most (its own and its reference), plus room for the warm-up.
    flags = ["--max-sessions", str(max(1024, 2 * args.streams + 64))]
    for name in ("device", "variant", "frontends"):
        if getattr(args, name):
            flags += [f"--{name}", str(getattr(args, name))]
    return flags


def load_report(args: argparse.Namespace) -> dict[str, Any]:
    """Run the load test as `args` say: on a server started here (always stopped) or against --target."""
    if args.model:
        with running_server(args.model, _server_flags(args), timeout=120.0) as server:
            return asyncio.run(run_load(args, server.address, server.process.pid, server.metrics_url()))
    host = args.target.rsplit(":", 1)[0]
    url = f"http://{host}:{args.metrics_port}/metrics" if args.metrics_port is not None else None
    return asyncio.run(run_load(args, args.target, None, url))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = load_report(args)
    except ServerStartError as exc:
        print(f"charstream-loadtest: error: {exc}", file=sys.stderr)
        return 2
    except grpc.aio.AioRpcError as exc:  # the server did not answer GetModelInfo or the warm-up
        print(f"charstream-loadtest: error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print_table(report)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
