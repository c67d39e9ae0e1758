"""The training loop: batches -> AdamW steps -> validation -> checkpoint.

`train(settings, limits, out)` starts a run; `train(..., resume_from=DIR)`
continues the run saved in DIR (runstate.load_run_settings(DIR) gives its
settings).
A resumed run takes exactly the steps an uninterrupted one would: the data position,
optimizer moments, RNG states and counters are all in the checkpoint, and the
LR schedule is a function of (step, progress) only (training.optim).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from training.corpus import Corpus, load_corpus
from training.data import Batches, split_ids, validation_windows
from training.model import CharGRU, ModelConfig
from training.optim import lr_at, make_optimizer, progress, set_lr
from training.runstate import LN2, Progress, RunSaver, SavedTrainer, load_progress, restore_run
from training.settings import Limits, Settings
from training.vocab import Vocab


class TrainError(ValueError):
    """Settings or a run directory that cannot be used; the message is for the user."""


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda was asked for but PyTorch sees no CUDA device")
    if name not in ("cpu", "cuda"):
        raise TrainError(f"--device must be cpu, cuda or auto, got {name!r}")
    return torch.device(name)


@torch.no_grad()
def evaluate(
    model: CharGRU, groups: list[tuple[torch.Tensor, torch.Tensor]], batch_windows: int = 256
) -> float:
    """Mean loss in nats/char over all targets of `groups` (see data.validation_windows)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for inputs, targets in groups:
        for i in range(0, len(inputs), batch_windows):
            x = inputs[i : i + batch_windows].to(device)
            y = targets[i : i + batch_windows].to(device)
            logits, _ = model(x)
            total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
            count += y.numel()
    model.train(was_training)
    return total / count


def train_step(
    model: CharGRU, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
    lr: float, grad_clip: float,
) -> float:  # fmt: skip
    """One AdamW step on a batch (inputs x, targets y: int64 [B, T]); the batch's mean loss."""
    set_lr(optimizer, lr)
    logits, _ = model(x)  # [B, T, V]
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.item()


def _planned_steps(limits: Limits, batches: Batches) -> tuple[int | None, str | None]:
    """(planned number of steps, the limit that sets it) from --epochs / --max-steps."""
    options = []
    if limits.epochs is not None:
        options.append((sum(batches.batches_per_epoch(e) for e in range(limits.epochs)), "epochs"))
    if limits.max_steps is not None:
        options.append((limits.max_steps, "max_steps"))
    return min(options) if options else (None, None)


def train(
    settings: Settings,
    limits: Limits,
    out: Path,
    *,
    resume_from: Path | None = None,
    device: str = "auto",
    corpus: Corpus | None = None,
    show_progress: bool = True,
    should_stop: Callable[[Progress], bool] | None = None,
    log: Callable[[str], None] = print,
) -> Progress:
    """Train (or resume) the run in `out`; returns its final counters.

    With `resume_from`, continue the run saved there (writing to `out`, which
    may be the same directory). `should_stop(progress)` is asked before every
    step; True stops the run like a limit would (the CLI wires Ctrl-C to it).
    """
    out = Path(out)
    dev = pick_device(device)
    prog = Progress()
    saved: SavedTrainer | None = None
    if resume_from is not None:
        prog, saved = load_progress(resume_from)

    corpus = corpus or load_corpus(settings.corpus)
    if saved and corpus.sha256 != saved[0]["corpus"]["sha256"]:
        raise TrainError(
            f"the corpus ({corpus.source}, sha256 {corpus.sha256[:12]}…) is not the one this "
            f"run was trained on (sha256 {saved[0]['corpus']['sha256'][:12]}…)"
        )
    vocab = Vocab.from_text(corpus.text)
    ids = torch.tensor(vocab.encode(corpus.text), dtype=torch.long)
    split = split_ids(ids, settings.seq_len, settings.val_fraction)
    batches = Batches(split.train, settings.seq_len, settings.batch_size, settings.seed)
    val_groups = validation_windows(split.val, settings.seq_len)

    torch.manual_seed(settings.seed)
    model_config = ModelConfig(
        vocab_size=len(vocab),
        embedding_dim=settings.embedding_dim,
        hidden_size=settings.hidden_size,
        num_layers=settings.num_layers,
        dropout=settings.dropout,
    )
    model = CharGRU(model_config).to(dev).train()
    optimizer = make_optimizer(model, settings.lr, settings.weight_decay)
    best_weights = None
    if saved:
        best_weights = restore_run(saved, resume_from, model, optimizer, dev)
        prog.stop_reason = None

    planned, planned_by = _planned_steps(limits, batches)
    budget = limits.max_minutes * 60 if limits.max_minutes is not None else None
    if planned is None and budget is None:
        raise TrainError("give at least one of --epochs, --max-steps, --max-minutes")
    warmup = settings.warmup_steps if planned is None else min(settings.warmup_steps, max(1, planned // 10))
    tokens_per_epoch = len(split.train)

    saver = RunSaver(
        out, settings=settings, limits=limits, corpus=corpus,
        train_chars=len(split.train), val_chars=len(split.val), vocab=vocab,
        model_config=model_config, model=model, optimizer=optimizer, device=dev,
        best_weights=best_weights,
    )  # fmt: skip

    def run_eval() -> None:
        loss = evaluate(model, val_groups)
        prog.last_val_loss, prog.last_eval_step = loss, prog.step
        if prog.best_val_loss is None or loss < prog.best_val_loss:
            prog.best_val_loss, prog.best_step = loss, prog.step
        prog.metrics.append(
            {
                "step": prog.step,
                "tokens": prog.tokens_seen,
                "val_loss": round(loss, 5),
                "val_bpc": round(loss / LN2, 5),
                "elapsed_s": round(prog.train_seconds, 1),
            }
        )
        say(
            f"step {prog.step}: val loss {loss:.4f} nats/char ({loss / LN2:.4f} bits/char)"
            + (" (best)" if prog.best_step == prog.step else "")
        )

    from tqdm import tqdm

    bar = tqdm(
        total=planned, initial=prog.step, disable=not show_progress, unit="step",
        dynamic_ncols=True, mininterval=1.0,
    )  # fmt: skip
    say = bar.write if show_progress else log  # bar.write keeps the bar below the messages
    window_tokens, window_time = 0, 0.0
    speed = None
    start = time.perf_counter() - prog.train_seconds
    try:
        while True:
            prog.train_seconds = time.perf_counter() - start
            if planned is not None and prog.step >= planned:
                prog.stop_reason = planned_by
            elif budget is not None and prog.train_seconds >= budget:
                prog.stop_reason = "max_minutes"
            elif should_stop is not None and should_stop(prog):
                prog.stop_reason = "interrupted"
            if prog.stop_reason:
                break

            t0 = time.perf_counter()
            x, y = batches.batch(prog.epoch, prog.batch_index)
            p = progress(prog.step, planned, prog.train_seconds, budget)
            lr = lr_at(prog.step, p, settings.lr, warmup, settings.min_lr_ratio)
            loss_value = train_step(model, optimizer, x.to(dev), y.to(dev), lr, settings.grad_clip)
            dt = time.perf_counter() - t0

            prog.step += 1
            prog.tokens_seen += y.numel()
            prog.epoch, prog.batch_index = batches.next_position(prog.epoch, prog.batch_index)
            prog.log_loss_sum += loss_value
            prog.log_steps += 1
            window_tokens += y.numel()
            window_time += dt
            rate = y.numel() / dt
            speed = rate if speed is None else 0.9 * speed + 0.1 * rate
            postfix = {"loss": f"{loss_value:.3f}", "chars/s": f"{speed:,.0f}", "lr": f"{lr:.2e}"}
            if planned is None and budget is not None:
                left = max(0, budget - (time.perf_counter() - start))
                postfix["left"] = f"{int(left // 60)}:{int(left % 60):02d}"
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)

            if prog.step % limits.log_every == 0:
                prog.metrics.append(
                    {
                        "step": prog.step,
                        "epoch": round(prog.tokens_seen / tokens_per_epoch, 4),
                        "tokens": prog.tokens_seen,
                        "train_loss": round(prog.log_loss_sum / prog.log_steps, 5),
                        "lr": lr,
                        "chars_per_s": round(window_tokens / window_time),
                        "elapsed_s": round(time.perf_counter() - start, 1),
                    }
                )
                prog.log_loss_sum, prog.log_steps = 0.0, 0
                window_tokens, window_time = 0, 0.0
            if prog.step % limits.eval_every == 0:
                prog.train_seconds = time.perf_counter() - start
                run_eval()
                saver.save(prog)
        if prog.last_eval_step != prog.step:
            run_eval()
        prog.train_seconds = time.perf_counter() - start
        saver.save(prog)
    finally:
        bar.close()
    log(
        f"stopped after {prog.step} steps ({prog.stop_reason}); "
        f"best val loss {prog.best_val_loss:.4f} nats/char "
        f"({prog.best_val_loss / LN2:.4f} bits/char) at step {prog.best_step}; "
        f"checkpoint in {out}"
    )
    return prog
