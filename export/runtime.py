"""ONNX Runtime sessions over exported graphs: pinned to one provider, typed calls.

Torch-free: verification, evaluation and the benchmark all step the graphs
through these helpers, the same way the server does. Whether CUDA can run
here is the server's probe (server.engine.model.providers.cuda_available), so that
export verifies on CUDA exactly where the server would serve on it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from server.engine.model.model_contract import (
    CPU,
    INPUT_HIDDEN,
    INPUT_TOKENS,
    OUTPUT_HIDDEN,
    OUTPUT_LOGITS,
)
from server.engine.model.providers import provider_entry


def make_session(
    model: str | Path | onnx.ModelProto, provider: str = CPU, threads: int | None = None
) -> ort.InferenceSession:
    """An InferenceSession pinned to one provider; raises if that provider cannot run it."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, options, providers=[provider_entry(provider)])
    if session.get_providers()[0] != provider:
        raise RuntimeError(f"ONNX Runtime could not start the {provider}")
    return session


class CellRunner:
    """Calls a single-step cell with numpy arrays."""

    def __init__(self, step: ort.InferenceSession):
        self.step_session = step

    def step(self, tokens: np.ndarray, hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """tokens int64 [B], hidden float32 [L, B, H] -> logits [B, V], hidden [L, B, H]."""
        logits, new_hidden = self.step_session.run(
            [OUTPUT_LOGITS, OUTPUT_HIDDEN],
            {
                INPUT_TOKENS: np.ascontiguousarray(tokens, dtype=np.int64),
                INPUT_HIDDEN: np.ascontiguousarray(hidden, dtype=np.float32),
            },
        )
        return logits, new_hidden

    def ingest(self, prompt: list[int], hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Consume a prompt for one stream (batch 1), one step per character as the server does."""
        logits = None
        for token in prompt:
            logits, hidden = self.step(np.asarray([token], dtype=np.int64), hidden)
        return logits, hidden

    def greedy(self, prompt: list[int], length: int, hidden: np.ndarray) -> list[int]:
        """The `length` tokens that always picking the top logit generates after `prompt`."""
        logits, hidden = self.ingest(prompt, hidden)
        generated: list[int] = []
        for _ in range(length):
            token = int(np.argmax(logits[0]))
            generated.append(token)
            logits, hidden = self.step(np.asarray([token], dtype=np.int64), hidden)
        return generated
