"""charstream-bench row 12: the server pipeline's ceiling, row 5's measurement on a model that costs next to nothing.

On the served model most of a step is the model call, so row 5 says how close
the server comes to its model, not how fast its own pipeline (scheduler,
sampling, the engine pipe, gRPC, the clients) could go. Row 12 serves a model
whose step costs microseconds instead: a 1-layer GRU, 16 units, embedding 8,
random (untrained) weights, on the served model's vocabulary (read from its
model.onnx metadata), so the prompt and sampled characters are the same set.
The bench builds it the way a real model is made: a checkpoint written with
torch from training.model (training.checkpoint.save_model), exported and
verified by export.pipeline (fp32 only), in a temporary directory removed
afterwards. Needs torch (skipped otherwise, as row 3 is).

For each --ceiling-streams N, a server on it with --variant fp32 --max-batch N
(and the pass-through flags) is started, warmed up (N streams of 8
characters), then measured: the raw ONNX Runtime loop at batch N on the same
file (the model alone), then N streams of --chars characters with the
clients spread over processes as in rows 5 and 6 (spread.py), then the same
streams against the transport's floor (floor_server.py: the Generator service
with no engine, in messages of the server row's mean size), so that each run
says how much of the row gRPC and the clients take on this machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import onnxruntime as ort

from server.bench import clients, spread
from server.bench.context import BenchContext
from server.bench.process import ServerProcess, running_server
from server.bench.raw import load_cell, raw_loop
from server.bench.results import RawResult, StreamsResult, ratio_of
from server.engine.model.model_contract import META_VOCAB, MODEL_FILE

CEILING_ROW = 12
DEFAULT_CEILING_STREAMS = "256"
LAYERS, HIDDEN, EMBEDDING = 1, 16, 8
WEIGHT_SEED = 0  # the same random weights every run, so runs compare
WARM_UP_CHARS = 8
MODEL_WORDS = f"{LAYERS}x{HIDDEN} GRU"

# serve(model dir, N, measure, row ids): run `measure` against a server on that model with --max-batch N.
Serve = Callable[[str, int, Callable[[ServerProcess], None], list[str]], None]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(f"row {CEILING_ROW}: the server pipeline's ceiling, on a tiny model")
    group.add_argument("--ceiling-streams", default=DEFAULT_CEILING_STREAMS, metavar="N[,N...]",
                       help=f"streams (and the server's --max-batch) of each row {CEILING_ROW} run, on a "
                            f"{MODEL_WORDS} built here; 0 skips row {CEILING_ROW} (default: {DEFAULT_CEILING_STREAMS})")


def ceiling_streams(args: argparse.Namespace) -> list[int]:
    """The --ceiling-streams sizes, in order, once each; [] for "0". ValueError when not integers >= 0."""
    sizes = [int(n) for n in str(args.ceiling_streams).split(",")]
    if any(n < 0 for n in sizes):
        raise ValueError(args.ceiling_streams)
    return [n for n in dict.fromkeys(sizes) if n > 0]


def raw_id(streams: int) -> str:
    return f"ceiling_raw_{streams}"


def server_id(streams: int) -> str:
    return f"ceiling_streams_{streams}"


def floor_id(streams: int) -> str:
    return f"ceiling_floor_{streams}"


def floor_flags(message_chars: int) -> list[str]:
    return ["--host", "127.0.0.1", "--port", "0", "--message-chars", str(message_chars)]


def floor_command(message_chars: int) -> list[str]:
    return [sys.executable, "-m", "server.bench.floor_server", *floor_flags(message_chars)]


def ceiling_rows(args: argparse.Namespace) -> dict[str, tuple[int, str]]:
    """id -> (row number, title) of row 12's rows, in order: per N the raw loop, the server, the floor."""
    rows: dict[str, tuple[int, str]] = {}
    for n in ceiling_streams(args):
        rows[raw_id(n)] = (CEILING_ROW, f"ceiling: raw loop, {MODEL_WORDS}, batch {n}")
        rows[server_id(n)] = (CEILING_ROW, f"ceiling: server, {MODEL_WORDS}, {n} streams")
        rows[floor_id(n)] = (CEILING_ROW, f"ceiling: gRPC alone, no engine, {n} streams")
    return rows


def served_vocabulary(model_dir: str | Path) -> list[str]:
    """The served model's characters, from its fp32 file's metadata (every variant carries the same)."""
    path = Path(model_dir) / MODEL_FILE
    metadata = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    if META_VOCAB not in metadata:
        raise ValueError(f"{path} has no {META_VOCAB} metadata: not a charstream model")
    return list(json.loads(metadata[META_VOCAB]))


@contextlib.contextmanager
def ceiling_model(vocabulary: list[str]) -> Iterator[Path]:
    """A verified model directory of the tiny random GRU on `vocabulary`, removed on the way out."""
    import torch

    from export.pipeline import export_checkpoint
    from training.checkpoint import save_model
    from training.model import CharGRU, ModelConfig
    from training.vocab import Vocab

    with tempfile.TemporaryDirectory(prefix="charstream-bench-ceiling-") as directory:
        # Seeded without touching the caller's generator: the same weights each run.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(WEIGHT_SEED)
            model = CharGRU(ModelConfig(vocab_size=len(vocabulary), embedding_dim=EMBEDDING, hidden_size=HIDDEN,
                                        num_layers=LAYERS))
        checkpoint, model_dir = Path(directory) / "checkpoint", Path(directory) / "model"
        save_model(checkpoint, model, Vocab(vocabulary), {"steps": 0, "note": "charstream-bench ceiling: untrained"})
        export_checkpoint(checkpoint, model_dir, variants=("fp32",))
        yield model_dir


def measure_ceiling(bench: BenchContext, server: ServerProcess, model_dir: Path, streams: int, prompt: str) -> None:
    """Row 12 for one N against its server: warm-up, the raw loop at batch N, N streams, then the floor."""
    args = bench.args
    clients.bounded(clients.run_streams(server.address, prompt, streams, WARM_UP_CHARS, 10**6), args.timeout)
    info = clients.model_info(server.address, args.timeout)
    # The file, provider and thread settings the ceiling server runs, as rows 1 and 2 do for the served model.
    cell = load_cell(model_dir / info.model_file, info.execution_provider, server.settings())
    raws: list[RawResult] = []
    served_rows: list[StreamsResult] = []

    def raw(row: int, row_id: str, title: str) -> RawResult:
        raws.append(raw_loop(cell, streams, args.chars, bench.deadline(), row=row, row_id=row_id, title=title))
        return raws[-1]

    def served(row: int, row_id: str, title: str) -> StreamsResult:
        processes = spread.client_processes(args.client_processes, streams)
        result = spread.measure_streams(server, prompt, streams, args.chars, processes, args.timeout,
                                        row=row, row_id=row_id, title=title)
        over = ratio_of(result.chars_per_s, raws[0].chars_per_s) if raws else None
        result.note = (f"{result.client_processes} client process{'es' if result.client_processes > 1 else ''}"
                       + (f"; {over:.3f} of the raw loop at batch {streams}" if over is not None else ""))
        served_rows.append(result)
        return result

    def floor(row: int, row_id: str, title: str) -> StreamsResult:
        # The server row's mean message, so both rows write about as many messages a stream.
        size = max(1, round(served_rows[0].chars_per_message)) if served_rows else clients.PROMPT_CHARS
        with running_server("", floor_flags(size), args.timeout, command=floor_command(size)) as floor_server:
            processes = spread.client_processes(args.client_processes, streams)
            result = spread.measure_streams(floor_server, prompt, streams, args.chars, processes, args.timeout,
                                            row=row, row_id=row_id, title=title)  # server_flags: floor_flags
        share = ratio_of(served_rows[0].chars_per_s, result.chars_per_s) if served_rows else None
        result.note = (f"{size} characters a message"
                       + (" (the server row's mean)" if served_rows else "")
                       + (f"; the server row is {share:.3f} of this" if share is not None else ""))
        return result

    bench.attempt(raw_id(streams), raw)
    bench.attempt(server_id(streams), served)
    bench.attempt(floor_id(streams), floor)


def run_ceiling_rows(bench: BenchContext, serve: Serve) -> None:
    """Every row 12 run, each N on a server of its own; skipped without torch, failed (saying why) when the
    tiny model cannot be built."""
    sizes = ceiling_streams(bench.args)
    if not sizes:
        return
    wanted = list(ceiling_rows(bench.args))
    try:
        import torch  # noqa: F401
    except ImportError:
        for row_id in wanted:
            bench.note(row_id, "skipped", "torch is not installed: the ceiling model is built with it")
        return
    try:
        vocabulary = served_vocabulary(bench.args.model)
        prompt = clients.bench_prompt(vocabulary)
        print(f"row {CEILING_ROW}: building the {MODEL_WORDS} ceiling model ...", file=bench.log, flush=True)
        with ceiling_model(vocabulary) as model_dir:
            for n in sizes:
                serve(str(model_dir), n, lambda server, n=n: measure_ceiling(bench, server, model_dir, n, prompt),
                      [raw_id(n), server_id(n), floor_id(n)])
    except Exception as exc:  # noqa: BLE001 - a model that cannot be built fails its rows, not the run
        bench.fail_unmeasured(wanted, exc)
