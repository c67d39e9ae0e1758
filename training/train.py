"""The training loop: batches -> AdamW steps -> validation -> checkpoint.

`train(settings, limits, out)` starts a run; `train(..., resume_from=DIR)`
continues the run saved in DIR (runstate.load_run_settings(DIR) gives its
settings). training.run_setup builds what the loop works on; this module
runs the steps, the metrics lines, the validation passes and the saves.
A resumed run takes exactly the steps an uninterrupted one would: the data position,
optimizer moments, RNG states and counters are all in the checkpoint, and the
LR schedule is a function of (step, progress) only (training.optim).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from training.corpus import Corpus
from training.model import CharGRU
from training.optim import lr_at, progress, set_lr
from training.run_setup import Run, pick_device, set_up
from training.runstate import LN2, Progress
from training.settings import Limits, Settings


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


@dataclass
class _Throughput:
    """Characters and step time since the last metrics line, and a smoothed rate for the bar."""

    tokens: int = 0
    seconds: float = 0.0
    speed: float | None = None

    def add(self, tokens: int, seconds: float) -> None:
        self.tokens += tokens
        self.seconds += seconds
        rate = tokens / seconds
        self.speed = rate if self.speed is None else 0.9 * self.speed + 0.1 * rate

    def reset(self) -> None:
        self.tokens, self.seconds = 0, 0.0


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
    run = set_up(settings, limits, out, resume_from, pick_device(device), corpus)
    from tqdm import tqdm

    bar = tqdm(
        total=run.planned, initial=run.prog.step, disable=not show_progress, unit="step",
        dynamic_ncols=True, mininterval=1.0,
    )  # fmt: skip
    say = bar.write if show_progress else log  # bar.write keeps the bar below the messages
    try:
        _run_steps(run, bar, say, should_stop)
    finally:
        bar.close()
    prog = run.prog
    log(
        f"stopped after {prog.step} steps ({prog.stop_reason}); "
        f"best val loss {prog.best_val_loss:.4f} nats/char "
        f"({prog.best_val_loss / LN2:.4f} bits/char) at step {prog.best_step}; "
        f"checkpoint in {out}"
    )
    return prog


def _run_steps(
    run: Run, bar: Any, say: Callable[[str], None], should_stop: Callable[[Progress], bool] | None
) -> None:
    """Step until a limit (or `should_stop`) says stop; validate and save on schedule and at the end."""
    prog = run.prog
    window = _Throughput()
    # The clock counts training time only, so it starts where a resumed run left off.
    start = time.perf_counter() - prog.train_seconds
    while True:
        prog.train_seconds = time.perf_counter() - start
        prog.stop_reason = _stop_reason(run, should_stop)
        if prog.stop_reason:
            break
        loss, lr = _step(run, window)
        _show_step(run, bar, window, loss, lr, start)
        if prog.step % run.limits.log_every == 0:
            _log_train(run, window, lr, start)
        if prog.step % run.limits.eval_every == 0:
            prog.train_seconds = time.perf_counter() - start
            _validate(run, say)
            run.saver.save(prog)
    if prog.last_eval_step != prog.step:
        _validate(run, say)
    prog.train_seconds = time.perf_counter() - start
    run.saver.save(prog)


def _stop_reason(run: Run, should_stop: Callable[[Progress], bool] | None) -> str | None:
    """Which limit ends the run now, if any: planned steps, the time budget, or an interrupt."""
    prog = run.prog
    if run.planned is not None and prog.step >= run.planned:
        return run.planned_by
    if run.budget is not None and prog.train_seconds >= run.budget:
        return "max_minutes"
    if should_stop is not None and should_stop(prog):
        return "interrupted"
    return None


def _step(run: Run, window: _Throughput) -> tuple[float, float]:
    """Take the next batch's training step and count it; returns (its mean loss, its learning rate)."""
    prog, settings = run.prog, run.settings
    t0 = time.perf_counter()
    x, y = run.batches.batch(prog.epoch, prog.batch_index)
    p = progress(prog.step, run.planned, prog.train_seconds, run.budget)
    lr = lr_at(prog.step, p, settings.lr, run.warmup, settings.min_lr_ratio)
    loss_value = train_step(run.model, run.optimizer, x.to(run.device), y.to(run.device), lr, settings.grad_clip)
    window.add(y.numel(), time.perf_counter() - t0)

    prog.step += 1
    prog.tokens_seen += y.numel()
    prog.epoch, prog.batch_index = run.batches.next_position(prog.epoch, prog.batch_index)
    prog.log_loss_sum += loss_value
    prog.log_steps += 1
    return loss_value, lr


def _show_step(run: Run, bar: Any, window: _Throughput, loss: float, lr: float, start: float) -> None:
    """Advance the progress bar by a step and show its loss, speed, LR (and time left)."""
    postfix = {"loss": f"{loss:.3f}", "chars/s": f"{window.speed:,.0f}", "lr": f"{lr:.2e}"}
    if run.planned is None and run.budget is not None:
        left = max(0, run.budget - (time.perf_counter() - start))
        postfix["left"] = f"{int(left // 60)}:{int(left % 60):02d}"
    bar.set_postfix(postfix, refresh=False)
    bar.update(1)


def _log_train(run: Run, window: _Throughput, lr: float, start: float) -> None:
    """Add a metrics line of the train loss and speed since the previous one."""
    prog = run.prog
    prog.metrics.append(
        {
            "step": prog.step,
            "epoch": round(prog.tokens_seen / run.tokens_per_epoch, 4),
            "tokens": prog.tokens_seen,
            "train_loss": round(prog.log_loss_sum / prog.log_steps, 5),
            "lr": lr,
            "chars_per_s": round(window.tokens / window.seconds),
            "elapsed_s": round(time.perf_counter() - start, 1),
        }
    )
    prog.log_loss_sum, prog.log_steps = 0.0, 0
    window.reset()


def _validate(run: Run, say: Callable[[str], None]) -> None:
    """Score the whole validation split, keep track of the best loss, and report it."""
    prog = run.prog
    loss = evaluate(run.model, run.val_groups)
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
