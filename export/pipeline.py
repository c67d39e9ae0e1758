"""Checkpoint directory -> verified model directory, written atomically.

Everything is built and verified in a hidden temporary directory next to the
target (`.NAME.partial-XXXX`), manifest.json is written last, and only then is
the directory swapped into place (training.atomic_dir, shared with training's
checkpoints). A failure at any point removes the temporary directory, so a
directory named MODEL_DIR only ever holds a verified export.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from export.evaluate import (
    DEFAULT_STREAMS,
    EvalTextError,
    cell_loss,
    load_streams,
    validation_fraction,
)
from export.reference import TorchReference
from export.runtime import CellRunner, make_session
from export.variants import VARIANTS, Tolerance, parse_variants
from export.verify import BATCH_SIZES, GREEDY_LENGTH, Subject, verify_cell
from server.engine.model.model_contract import (
    DEFAULT_VARIANT,
    FP32,
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    MODEL_FILE,
    ManifestKey,
)
from server.engine.model.providers import CPU, CUDA, cuda_available
from server.engine.model.vocabulary import unknown_chars
from training.atomic_dir import discard, make_staging, swap_in
from training.corpus import sha256_file

DEFAULT_PROMPT_LENGTH = 16
# Facts from the checkpoint's config.json worth keeping next to the graphs.
TRAINING_FACTS = ("steps", "tokens_seen", "val_loss", "val_bpc")


class ExportError(RuntimeError):
    """An export that cannot start or finish: bad checkpoint, bad options, unwritable output."""


def _one_line(exc: BaseException) -> str:
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def _looks_like_model_dir(path: Path) -> bool:
    return (path / MANIFEST_FILE).is_file() or (path / MODEL_FILE).is_file()


def _check_target(out_dir: Path, checkpoint_dir: Path, force: bool) -> None:
    """Refuse targets that would destroy something other than an earlier export."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"output path {out_dir} exists and is not a directory")
    resolved_out, resolved_ckpt = out_dir.resolve(), checkpoint_dir.resolve()
    if resolved_out == resolved_ckpt or resolved_out in resolved_ckpt.parents:
        raise ExportError(f"output directory {out_dir} would contain or replace the checkpoint")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not force:
            raise ExportError(f"output directory {out_dir} is not empty; pass --force to replace an earlier export")
        if not _looks_like_model_dir(out_dir):
            raise ExportError(
                f"output directory {out_dir} is not empty and holds no earlier export "
                f"(no {MANIFEST_FILE} or {MODEL_FILE}); --force only replaces model directories"
            )


def _prompt_ids(prompt: str | None, vocab: list[str], seed: int) -> list[int]:
    if prompt is None:
        rng = np.random.default_rng(seed)
        return [int(i) for i in rng.integers(0, len(vocab), size=DEFAULT_PROMPT_LENGTH)]
    index = {ch: i for i, ch in enumerate(vocab)}
    unknown = unknown_chars(prompt, index)
    if not prompt or unknown:
        raise ExportError(f"prompt must be non-empty and use only vocabulary characters; unknown: {unknown!r}")
    return [index[ch] for ch in prompt]


def _providers_for(target: str) -> list[str]:
    """CPU always (verify wherever the export runs); CUDA too for GPU-meant graphs when present."""
    return [CPU, CUDA] if target in ("any", "cuda") and cuda_available() else [CPU]


def export_checkpoint(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    variants: Iterable[str] | str = (FP32,),
    *,
    eval_text: str | Path | None = None,
    force: bool = False,
    default: str = DEFAULT_VARIANT,
    prompt: str | None = None,
    greedy_length: int = GREEDY_LENGTH,
    eval_streams: int = DEFAULT_STREAMS,
    seed: int = 0,
    threads: int | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> dict:
    """Export, verify and (when `eval_text` is given) score a checkpoint; returns the manifest.

    `threads` caps PyTorch's and ONNX Runtime's CPU threads (default: their own
    choice); on a busy machine 1 avoids threads spinning against each other.
    Raises ExportError for unusable input and VerificationError (export.verify)
    when a graph does not match PyTorch; in both cases `out_dir` is untouched.
    """
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    names = _check_options(variants, default, greedy_length, eval_streams, threads)
    _limit_torch_threads(threads)
    model, vocab, checkpoint_config = _load_checkpoint(checkpoint_dir)
    _check_target(out_dir, checkpoint_dir, force)
    config = model.config.to_dict()
    weights = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    reference = TorchReference(model)
    prompt_ids = _prompt_ids(prompt, vocab.chars, seed)
    streams = _eval_streams(eval_text, vocab.chars, eval_streams, checkpoint_config)

    staging = _make_staging(out_dir)
    try:
        manifest = _build_all(
            staging, names, weights, config, vocab.chars, reference, prompt_ids,
            greedy_length=greedy_length, seed=seed, threads=threads, streams=streams, log=log,
        )
        _add_export_facts(manifest, default, checkpoint_config, eval_text)
        _write_manifest(staging, manifest)
        swap_in(staging, out_dir)
    except BaseException:
        discard(staging)
        raise
    log(f"wrote {out_dir}")
    return manifest


def _check_options(
    variants: Iterable[str] | str, default: str, greedy_length: int, eval_streams: int, threads: int | None
) -> list[str]:
    """The variant names to export, once every option is known to be usable."""
    try:
        names = parse_variants(variants)
    except ValueError as exc:
        raise ExportError(str(exc)) from exc
    if default not in names:
        raise ExportError(f"default variant {default!r} is not among the exported variants {names}")
    if greedy_length < 1 or eval_streams < 1:
        raise ExportError("greedy length and evaluation streams must be at least 1")
    if threads is not None and threads < 1:
        raise ExportError("threads must be at least 1")
    return names


def _limit_torch_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _load_checkpoint(checkpoint_dir: Path) -> tuple:
    """(model, vocab, checkpoint config) from training.checkpoint.load_model."""
    from training.checkpoint import CheckpointError, load_model

    with _export_error(CheckpointError, lambda exc: f"bad checkpoint: {_one_line(exc)}"):
        return load_model(checkpoint_dir)


@contextlib.contextmanager
def _export_error(kind: type[Exception], message: Callable[[Exception], str]) -> Iterator[None]:
    """`kind` raised inside, as an ExportError saying `message(error)`."""
    try:
        yield
    except kind as exc:
        raise ExportError(message(exc)) from exc


def _eval_streams(
    eval_text: str | Path | None, vocab: list[str], eval_streams: int, checkpoint_config: dict
) -> np.ndarray | None:
    """The evaluation text's validation split as streams, or None without an evaluation text."""
    if eval_text is None:
        return None
    try:  # scored on the split this checkpoint was trained with
        fraction = validation_fraction(checkpoint_config)
        return load_streams(Path(eval_text), vocab, eval_streams, val_fraction=fraction)
    except EvalTextError as exc:
        raise ExportError(str(exc)) from exc


def _make_staging(out_dir: Path) -> Path:
    error = f"output directory {out_dir} is not writable"
    with _export_error(OSError, lambda exc: f"{error}: {getattr(exc, 'strerror', None) or exc}"):
        return make_staging(out_dir)


def _add_export_facts(
    manifest: dict, default: str, checkpoint_config: dict, eval_text: str | Path | None
) -> None:
    """The default variant, the checkpoint's training facts and the evaluation text's name."""
    manifest[ManifestKey.DEFAULT] = default
    training = checkpoint_config.get("training") or {}
    manifest[ManifestKey.TRAINING] = {k: training[k] for k in TRAINING_FACTS if k in training}
    if eval_text is not None:
        manifest[ManifestKey.EVALUATION]["text"] = Path(eval_text).name


def _write_manifest(staging: Path, manifest: dict) -> None:
    text = json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
    (staging / MANIFEST_FILE).write_text(text, encoding="utf-8")


def _build_all(
    staging: Path, names: list[str], weights: dict, config: dict, vocab: list[str],
    reference: TorchReference, prompt_ids: list[int], *,
    greedy_length: int, seed: int, threads: int | None, streams: np.ndarray | None,
    log: Callable[[str], None],
) -> dict:
    check = dict(
        vocab=vocab, config=config, prompt=prompt_ids, greedy_length=greedy_length, seed=seed, threads=threads
    )
    manifest: dict = {
        ManifestKey.FORMAT: MANIFEST_FORMAT, ManifestKey.DEFAULT: DEFAULT_VARIANT,
        ManifestKey.VARIANTS: {}, ManifestKey.CONFIG: config,
    }
    for name in names:
        variant = VARIANTS[name]
        path = staging / variant.file
        try:
            variant.build(weights, config, vocab, path)
        except Exception as exc:  # a builder failure is an export failure, named by variant
            raise ExportError(f"building the {name} variant failed: {_one_line(exc)}") from exc
        entry = {
            ManifestKey.FILE: variant.file, ManifestKey.TARGET: variant.target,
            ManifestKey.BYTES: path.stat().st_size, ManifestKey.SHA256: sha256_file(path),
            ManifestKey.TOLERANCE: variant.tolerance.to_dict(), ManifestKey.VERIFIED: {},
        }
        for provider in _providers_for(variant.target):
            facts = verify_cell(path, reference, variant.tolerance, subject=Subject(name, provider), **check)
            entry[ManifestKey.VERIFIED][provider] = facts
            log(_summary(name, provider, facts, variant.tolerance))
        manifest[ManifestKey.VARIANTS][name] = entry
    manifest[ManifestKey.VERIFICATION] = {
        "batch_sizes": list(BATCH_SIZES), "greedy_chars": greedy_length,
        "prompt": "".join(vocab[i] for i in prompt_ids),
    }
    if streams is not None:
        manifest[ManifestKey.EVALUATION] = _evaluate(staging, manifest, names, reference, streams, threads, log)
    return manifest


def _evaluate(
    staging: Path, manifest: dict, names: list[str], reference: TorchReference,
    streams: np.ndarray, threads: int | None, log: Callable[[str], None],
) -> dict:
    """Teacher-forced validation loss of each variant on the CPU, checked against PyTorch's."""
    from export.verify import VerificationError

    torch_loss = reference.stream_losses(streams)
    log(f"pytorch: val loss {torch_loss:.4f} over {streams.size} characters in {streams.shape[0]} streams")
    for name in names:
        variant = VARIANTS[name]
        runner = CellRunner(make_session(staging / variant.file, CPU, threads))
        loss = cell_loss(runner, streams, reference.num_layers, reference.hidden_size)
        delta = loss - torch_loss
        manifest[ManifestKey.VARIANTS][name][ManifestKey.VAL_LOSS] = loss
        log(f"{name}: val loss {loss:.4f} (Δ vs PyTorch {delta:+.4f}, allowed ±{variant.tolerance.max_loss_delta:g})")
        if not abs(delta) <= variant.tolerance.max_loss_delta:
            raise VerificationError(
                f"{name} variant failed verification on {CPU}: val loss {loss:.4f} differs from "
                f"PyTorch's {torch_loss:.4f} by {delta:+.4f}, more than {variant.tolerance.max_loss_delta:g}"
            )
    return {"pytorch_val_loss": torch_loss, "streams": int(streams.shape[0]), "chars": int(streams.size)}


def _summary(name: str, provider: str, facts: dict, tolerance: Tolerance) -> str:
    batches = facts["batches"].values()
    worst = max(batches, key=lambda d: d["logits"] / d["logits_tolerance"])
    greedy = facts["greedy"]
    line = (
        f"{name}: verified on {provider}: batches {','.join(facts['batches'])} "
        f"max |Δlogits| {worst['logits']:.2g} (tolerance {worst['logits_tolerance']:.2g}), "
        f"max |Δstate| {max(d['hidden'] for d in batches):.2g} (tolerance {tolerance.hidden_absolute:g}); "
        f"greedy {greedy['identical_chars']}/{greedy['chars']} chars identical"
    )
    if "top1_agreement" in greedy:
        line += (
            f", top-1 agreement {greedy['top1_agreement']:.1%}, trajectory max |Δlogits| "
            f"{greedy['max_logits_diff_vs_tolerance']:.0%} of tolerance"
        )
    return line
