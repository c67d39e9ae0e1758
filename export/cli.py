"""charstream-export: checkpoint directory -> verified ONNX model directory."""

from __future__ import annotations

import argparse
import sys

from export.evaluate import DEFAULT_STREAMS
from export.verify import GREEDY_LENGTH
from server.engine.model.model_contract import (
    DEFAULT_VARIANT,
    MANIFEST_FILE,
    MODEL_FILE,
    VARIANT_FILES,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="charstream-export",
        description=(
            f"Export a charstream checkpoint to a model directory ({MODEL_FILE}, variants, "
            f"{MANIFEST_FILE}), verified against PyTorch. Nothing is written unless every "
            "check passes."
        ),
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT_DIR", help="directory with config.json, vocab.json, model.safetensors")
    parser.add_argument("--out", required=True, metavar="MODEL_DIR", help="model directory to create")
    parser.add_argument(
        "--variants", default=",".join(VARIANT_FILES), metavar="LIST",
        help=f"comma-separated variants from {', '.join(VARIANT_FILES)} "
        f"({DEFAULT_VARIANT} is always written; default: %(default)s)",
    )
    parser.add_argument("--default", default=DEFAULT_VARIANT, help="variant the manifest names as default (default: %(default)s)")
    parser.add_argument(
        "--eval-text", metavar="PATH",
        help="text file whose last 10%% scores each variant's teacher-forced validation loss",
    )
    parser.add_argument("--eval-streams", type=int, default=DEFAULT_STREAMS, metavar="N", help="parallel streams for the loss (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="replace MODEL_DIR if it holds an earlier export")
    parser.add_argument("--prompt", help="prompt for the greedy check (default: random characters, fixed seed)")
    parser.add_argument("--greedy-chars", type=int, default=GREEDY_LENGTH, metavar="N", help="greedy characters compared (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed for random states, tokens and prompt (default: %(default)s)")
    parser.add_argument("--threads", type=int, metavar="N", help="CPU threads for PyTorch and ONNX Runtime (default: theirs)")
    parser.add_argument("--quiet", action="store_true", help="print only errors")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Imported after parsing so that --help stays fast (torch is heavy).
    from export.pipeline import ExportError, export_checkpoint
    from export.verify import VerificationError

    log = (lambda message: None) if args.quiet else (lambda message: print(message, flush=True))
    try:
        export_checkpoint(
            args.checkpoint, args.out, args.variants,
            eval_text=args.eval_text, force=args.force,
            default=args.default, prompt=args.prompt, greedy_length=args.greedy_chars,
            eval_streams=args.eval_streams, seed=args.seed, threads=args.threads, log=log,
        )
    except (ExportError, VerificationError) as exc:
        print(f"charstream-export: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ExportError) else 1
    except KeyboardInterrupt:
        print("charstream-export: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
