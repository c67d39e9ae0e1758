"""Benchmark: N concurrent Generate streams against a server on loopback.

    python -m server.bench --model MODEL_DIR --sessions 1,8,32 --chars 300

Starts `python -m server` on 127.0.0.1 (a separate process, so the clients do
not share its interpreter) unless --target names a running server, then for
each N runs N streams at once, each a one-shot session generating --chars
characters (temperature 1, a seed per stream), and prints aggregate
characters per second, time to first character and the gap between
characters as each stream sees them, and the server's mean batch size.
Bounded: --timeout seconds per level.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from typing import Sequence

import grpc
import numpy as np

from protos.charstream.v1 import generator_pb2 as pb
from protos.charstream.v1 import generator_pb2_grpc as pb_grpc

PROMPT_CHARS = 16


@dataclass
class StreamResult:
    chars: int
    first_char_s: float
    gaps_s: list[float]


async def _one_stream(stub: pb_grpc.GeneratorStub, prompt: str, chars: int, seed: int) -> StreamResult:
    request = pb.GenerateRequest(prompt=prompt, max_chars=chars, temperature=1.0, seed=seed)
    started = time.perf_counter()
    last, first, count, gaps = started, 0.0, 0, []
    async for response in stub.Generate(request):
        now = time.perf_counter()
        if response.text:
            if count == 0:
                first = now - started
            else:
                gaps.append(now - last)
            count += len(response.text)
            last = now
    return StreamResult(count, first, gaps)


async def _level(target: str, prompt: str, streams: int, chars: int) -> tuple[float, list[StreamResult]]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GeneratorStub(channel)
        started = time.perf_counter()
        results = await asyncio.gather(*(_one_stream(stub, prompt, chars, seed) for seed in range(streams)))
        return time.perf_counter() - started, list(results)


def _batch_totals(metrics_url: str | None) -> tuple[float, float]:
    if metrics_url is None:
        return 0.0, 0.0
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    total = re.search(r"^charstream_batch_size_sum (\S+)$", text, re.MULTILINE)
    count = re.search(r"^charstream_batch_size_count (\S+)$", text, re.MULTILINE)
    return (float(total.group(1)) if total else 0.0), (float(count.group(1)) if count else 0.0)


def _start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str, str | None]:
    command = [sys.executable, "-m", "server", "--model", args.model, "--host", "127.0.0.1", "--port", "0",
               "--device", args.device, "--max-batch", str(args.max_batch), "--metrics-port", "0",
               "--max-sessions", str(max(args.sessions) + 8)]
    if args.variant:
        command += ["--variant", args.variant]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline()  # type: ignore[union-attr]
    if not line.startswith("listening on "):
        process.kill()
        raise SystemExit(f"server did not start: {process.stderr.read()}")  # type: ignore[union-attr]
    address = line.split()[-1]
    metrics = None
    for log_line in process.stderr:  # type: ignore[union-attr]
        found = re.search(r"event=listening .* provider=(\S+) metrics=(\S+)", log_line)
        if found:
            print(f"server: {address} provider={found.group(1)}", flush=True)
            metrics = f"http://{found.group(2)}/metrics"
            break
    # Keep reading the server's log so that a full pipe never blocks it.
    threading.Thread(target=lambda: [None for _ in process.stderr], daemon=True).start()  # type: ignore[union-attr]
    return process, address, metrics


def _percentile_ms(values: list[float], q: float) -> float:
    return float(np.percentile(values, q) * 1000) if values else float("nan")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory (starts a local server)")
    parser.add_argument("--target", help="benchmark a running server at HOST:PORT instead")
    parser.add_argument("--sessions", default="1,8,32", help="concurrent streams per level, comma-separated")
    parser.add_argument("--chars", type=int, default=300, help="characters per stream")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--variant", default=None)
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds allowed per level")
    args = parser.parse_args(argv)
    args.sessions = [int(n) for n in args.sessions.split(",")]
    if not (args.model or args.target):
        parser.error("give --model (start a server) or --target (use a running one)")

    process, metrics_url = None, None
    if args.target:
        target = args.target
    else:
        process, target, metrics_url = _start_server(args)
    try:
        with grpc.insecure_channel(target) as channel:
            vocab = list(pb_grpc.GeneratorStub(channel).GetModelInfo(pb.GetModelInfoRequest()).vocabulary)
        prompt = "".join(vocab[(i * 7) % len(vocab)] for i in range(PROMPT_CHARS))
        asyncio.run(_level(target, prompt, 1, 20))  # warm-up
        print(f"{'streams':>7} {'chars/s':>9} {'first_ms_p50':>12} {'first_ms_p99':>12} "
              f"{'gap_ms_p50':>10} {'gap_ms_p99':>10} {'mean_batch':>10} {'wall_s':>7}")
        for streams in args.sessions:
            before = _batch_totals(metrics_url)
            wall, results = asyncio.run(asyncio.wait_for(_level(target, prompt, streams, args.chars), args.timeout))
            after = _batch_totals(metrics_url)
            steps = after[1] - before[1]
            mean_batch = (after[0] - before[0]) / steps if steps else float("nan")
            firsts = [r.first_char_s for r in results]
            gaps = [g for r in results for g in r.gaps_s]
            total = sum(r.chars for r in results)
            print(f"{streams:>7} {total / wall:>9.0f} {_percentile_ms(firsts, 50):>12.2f} "
                  f"{_percentile_ms(firsts, 99):>12.2f} {_percentile_ms(gaps, 50):>10.3f} "
                  f"{_percentile_ms(gaps, 99):>10.3f} {mean_batch:>10.1f} {wall:>7.2f}", flush=True)
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
