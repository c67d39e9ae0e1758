"""charstream-bench's command line: its flags, the ones passed on to the servers, and the rows a run makes."""

from __future__ import annotations

import argparse
from typing import Any

from server.bench import ceiling, http_rows, sessions
from server.bench.turns import add_repeats_arguments

DESCRIPTION = "charstream-bench: the server against the raw model it serves, every row in one run."

DEFAULT_JSON = "charstream-bench.json"
# Flags handed to the server processes only when given here, so the server's own defaults apply otherwise.
PASS_THROUGH = ("device", "variant", "intra_op_threads", "allow_spinning", "lookahead", "max_batch", "coalesce_streams",
                "engine_process", "stretch", "batch_stretch", "frontends")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="charstream-bench", description=DESCRIPTION)
    add = parser.add_argument
    add("--model", required=True, metavar="DIR", help="model directory to serve (from charstream-export)")
    add("--checkpoint", metavar="DIR", help="training checkpoint of the same model, for row 3 (default: skip row 3)")
    add("--json", default=DEFAULT_JSON, metavar="PATH", help=f"results file, overwritten (default: ./{DEFAULT_JSON})")
    add("--streams", type=int, default=64, metavar="N", help="concurrent streams in rows 5 and 6 (default: 64)")
    add("--chars", type=int, default=400, metavar="N",
        help="characters per stream, and steps of each raw loop (default: 400)")
    add("--batch", default="64", metavar="B[,B...]", help="raw-loop batch sizes of row 2 (default: 64)")
    add("--long-prompt", type=int, default=2000, metavar="N", help="prompt of rows 7 and 9; 0: skip (default: 2000)")
    add("--timeout", type=float, default=120.0, metavar="S", help="seconds allowed per row (default: 120)")
    add("--client-processes", type=int, metavar="N",
        help="processes the clients of rows 5, 6 and 12 run in, started together (default: 1 for up to "
             "64 streams, else min(4, CPUs))")
    add("--skip-standard-rows", action="store_true",
        help=f"measure only row {ceiling.CEILING_ROW} (the ceiling model), not rows 1-11")
    add_repeats_arguments(parser)
    server = parser.add_argument_group("passed to both server processes only when given (else the server's defaults)")
    same = "charstream-serve's flag of this name (docs/configuration.md)"
    server.add_argument("--device", choices=("auto", "cuda", "cpu"), help=same)
    server.add_argument("--variant", metavar="NAME", help="model variant: fp32, fp16, int8, auto, ...")
    server.add_argument("--intra-op-threads", type=int, metavar="N", help=same)
    server.add_argument("--allow-spinning", action=argparse.BooleanOptionalAction, default=None, help=same)
    server.add_argument("--lookahead", type=int, metavar="N", help=same)
    server.add_argument("--coalesce-streams", type=int, metavar="N", help=same)
    server.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=None, help=same)
    server.add_argument("--stretch", action=argparse.BooleanOptionalAction, default=None, help=same)
    server.add_argument("--batch-stretch", type=int, metavar="N", help=same)
    server.add_argument("--frontends", type=int, metavar="N", help=same)
    server.add_argument("--max-batch", type=int, metavar="N", help="for rows 4, 5, 7; row 6's server always gets 1")
    sessions.add_arguments(parser)
    ceiling.add_arguments(parser)
    http_rows.add_arguments(parser)
    return parser


def server_flags(args: argparse.Namespace, **overrides: Any) -> list[str]:
    """The pass-through flags the user set (plus overrides), as server arguments."""
    values = {name: getattr(args, name) for name in PASS_THROUGH} | overrides
    flags: list[str] = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif value is not None:
            flags += [flag, str(value)]
    return flags


def batches(args: argparse.Namespace) -> list[int]:
    """Row 1's batch 1, then the --batch sizes (row 2)."""
    return [1] + [b for b in dict.fromkeys(int(b) for b in args.batch.split(",")) if b != 1]


def paired_batch(args: argparse.Namespace) -> int | None:
    """The raw batch row 5 is read against (row 2): --streams when it is one of --batch, else the first."""
    sizes = batches(args)[1:]
    return (args.streams if args.streams in sizes else sizes[0]) if sizes else None


def expected_rows(args: argparse.Namespace) -> dict[str, tuple[int, str]]:
    """id -> (row number, title) of every row this run should produce, in order."""
    if args.skip_standard_rows:
        return ceiling.ceiling_rows(args)
    rows = {f"raw_batch_{b}": (1 if b == 1 else 2, f"raw ONNX Runtime loop, batch {b}") for b in batches(args)}
    rows |= {"torch_eager": (3, "PyTorch eager loop, 1 stream"),
             "server_1_stream": (4, "server, 1 stream"),
             "server_streams": (5, f"server, {args.streams} streams"),
             "server_streams_max_batch_1": (6, f"server --max-batch 1, {args.streams} streams")}
    if args.long_prompt > 0:
        rows["long_prompt"] = (7, f"server, {args.long_prompt}-char prompt, 1st char")
    return rows | sessions.session_rows(args) | ceiling.ceiling_rows(args) | http_rows.http_rows(args)
