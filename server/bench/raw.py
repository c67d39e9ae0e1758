"""charstream-bench rows 1-3 and row 7's baseline: the model stepped in the bench process, no server.

The raw loop is the ceiling the server is measured against: `steps` calls of
the ONNX cell on token_ids [B] and hidden [L, B, H], each call's argmax tokens
and hidden_out fed back; nothing else (no sampling, no Python per stream).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnxruntime as ort

from server.bench.results import RawResult, TorchResult
from server.engine.model.model_contract import (
    CPU,
    CUDA,
    INPUT_HIDDEN,
    INPUT_TOKENS,
    OUTPUT_HIDDEN,
    OUTPUT_LOGITS,
)
from server.engine.model.providers import provider_entry

WARMUP_STEPS = 5


class RowTimeout(RuntimeError):
    """A row ran past --timeout."""


def session_options(settings: dict[str, Any]) -> ort.SessionOptions:
    """ONNX Runtime options with the thread settings the server logged (`intra_op_threads`, `allow_spinning`)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    threads = int(settings.get("intra_op_threads") or 0)
    if threads > 0:
        options.intra_op_num_threads = threads
    spinning = settings.get("allow_spinning")
    if spinning is not None:
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return options


def load_cell(path: Path, provider: str, settings: dict[str, Any]) -> ort.InferenceSession:
    """The .onnx cell on `provider` (the one the server reported), with the server's thread settings."""
    # The server's provider options (fp32 without TF32 on CUDA): the raw loop runs the same maths.
    providers = [provider_entry(CUDA), CPU] if provider == CUDA else [provider]
    if provider == CUDA:
        try:
            ort.preload_dlls()
        except Exception:  # noqa: BLE001 - best effort, as in the server; session creation decides
            pass
    session = ort.InferenceSession(str(path), session_options(settings), providers=providers)
    if session.get_providers()[0] != provider:
        raise RuntimeError(f"ONNX Runtime gave {session.get_providers()[0]} for {path}, not {provider}")
    return session


class Stepper:
    """One cell call per step: (tokens [B] int64) -> argmax tokens; keeps hidden between calls.

    On the CUDA provider the state stays on the device (IOBinding), as in the server;
    elsewhere it is a numpy array.
    """

    def __init__(self, session: ort.InferenceSession, batch: int):
        hidden_input = session.get_inputs()[1]
        layers, hidden_size = hidden_input.shape[0], hidden_input.shape[2]
        dtype = np.float16 if hidden_input.type == "tensor(float16)" else np.float32
        self.session = session
        self.hidden: Any = np.zeros((layers, batch, hidden_size), dtype=dtype)
        self.binding = session.io_binding() if session.get_providers()[0] == CUDA else None
        if self.binding is not None:
            self.hidden = ort.OrtValue.ortvalue_from_numpy(self.hidden, "cuda", 0)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        if self.binding is None:
            logits, self.hidden = self.session.run(None, {INPUT_TOKENS: tokens, INPUT_HIDDEN: self.hidden})
            return logits.argmax(axis=1)
        binding = self.binding
        binding.bind_cpu_input(INPUT_TOKENS, tokens)
        binding.bind_ortvalue_input(INPUT_HIDDEN, self.hidden)
        binding.bind_output(OUTPUT_LOGITS, "cpu")
        binding.bind_output(OUTPUT_HIDDEN, "cuda", 0)
        self.session.run_with_iobinding(binding)
        logits, self.hidden = binding.get_outputs()
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        return logits.numpy().argmax(axis=1)


def _timed_loop(step: Callable[[int], None], steps: int, deadline: float) -> float:
    """Seconds for steps x step(i), checking the deadline every step."""
    started = time.perf_counter()
    for i in range(steps):
        step(i)
        if time.monotonic() > deadline:
            raise RowTimeout(f"after {i + 1} of {steps} steps")
    return time.perf_counter() - started


def raw_loop(session: ort.InferenceSession, batch: int, steps: int, deadline: float, *,
             row: int, row_id: str, title: str) -> RawResult:
    """Rows 1 and 2: `steps` greedy steps of `batch` streams, argmax and hidden_out fed back."""
    stepper = Stepper(session, batch)
    vocab_size = session.get_outputs()[0].shape[1]
    tokens = (np.arange(batch) % (vocab_size if isinstance(vocab_size, int) else 1)).astype(np.int64)
    holder = {"tokens": tokens}

    def one(_: int) -> None:
        holder["tokens"] = stepper.step(holder["tokens"]).astype(np.int64, copy=False)

    _timed_loop(one, WARMUP_STEPS, deadline)
    seconds = _timed_loop(one, steps, deadline)
    return RawResult(row=row, id=row_id, title=title, batch=batch, steps=steps, seconds=seconds, chars_per_s=steps * batch / seconds,
                     step_ms=seconds / steps * 1000, provider=session.get_providers()[0])


def raw_ingest_seconds(session: ort.InferenceSession, token_ids: list[int], deadline: float) -> float:
    """Row 7's baseline: a batch-1 loop over a prompt's tokens (teacher-forced, nothing sampled)."""
    stepper = Stepper(session, 1)
    prompt = [np.array([token], dtype=np.int64) for token in token_ids]
    return _timed_loop(lambda i: stepper.step(prompt[i]), len(prompt), deadline)


def torch_loop(checkpoint: str, steps: int, deadline: float, use_cuda: bool, *,
               row: int, row_id: str, title: str) -> TorchResult:
    """Row 3: a naive PyTorch eager loop, one stream, one model call per character (greedy, CPU
    unless the server runs on CUDA and torch has CUDA)."""
    import torch

    from training.checkpoint import load_model

    device = "cuda" if use_cuda and torch.cuda.is_available() else "cpu"
    model, _vocab, _config = load_model(Path(checkpoint), device)
    holder = {"token": torch.zeros(1, 1, dtype=torch.long, device=device), "hidden": model.initial_state(1, device)}

    def one(_: int) -> None:
        logits, holder["hidden"] = model(holder["token"], holder["hidden"])
        holder["token"] = logits[:, -1].argmax(dim=-1, keepdim=True)
        holder["token"].item()  # the character reaches the host, as a generator's would (syncs a GPU)

    with torch.inference_mode():
        _timed_loop(one, WARMUP_STEPS, deadline)
        seconds = _timed_loop(one, steps, deadline)
    return TorchResult(row=row, id=row_id, title=title, steps=steps,
                       seconds=seconds, chars_per_s=steps / seconds, step_ms=seconds / steps * 1000,
                       device=device, torch_threads=torch.get_num_threads())
