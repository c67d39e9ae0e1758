"""ONNX Runtime sessions over exported graphs: provider choice and typed calls.

Torch-free: verification, evaluation and the benchmark all step the graphs
through these helpers, the same way the server does.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from export.gru_op import INPUT_LENGTHS
from export.onnx_cell import INPUT_HIDDEN, INPUT_TOKENS, OUTPUT_HIDDEN, OUTPUT_LOGITS

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


@functools.lru_cache(maxsize=1)
def cuda_available() -> bool:
    """True when ONNX Runtime can actually run on a CUDA device here.

    A GPU build lists the CUDA provider even on machines with no GPU or no CUDA
    libraries, and silently falls back to the CPU; so try a one-node session.
    """
    if CUDA not in ort.get_available_providers():
        return False
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    probe.ir_version = 9
    options = ort.SessionOptions()
    options.log_severity_level = 4
    # The failed provider load is logged through the default logger: silence it for the probe.
    ort.set_default_logger_severity(4)
    try:
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=[CUDA])
        return session.get_providers()[0] == CUDA
    except Exception:  # any failure to start CUDA means "not available"
        return False
    finally:
        ort.set_default_logger_severity(2)


def make_session(
    model: str | Path | onnx.ModelProto, provider: str = CPU, threads: int | None = None
) -> ort.InferenceSession:
    """An InferenceSession pinned to one provider; raises if that provider cannot run it."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, options, providers=[provider])
    if session.get_providers()[0] != provider:
        raise RuntimeError(f"ONNX Runtime could not start the {provider}")
    return session


class CellRunner:
    """Calls a single-step cell (and optionally a prefill graph) with numpy arrays."""

    def __init__(self, step: ort.InferenceSession, prefill: ort.InferenceSession | None = None):
        self.step_session = step
        self.prefill_session = prefill

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

    def prefill(
        self, tokens: np.ndarray, lengths: np.ndarray, hidden: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """tokens int64 [B, T] (right-padded), lengths [B] in 1..T, hidden [L, B, H]."""
        if self.prefill_session is None:
            raise RuntimeError("no prefill graph loaded")
        logits, new_hidden = self.prefill_session.run(
            [OUTPUT_LOGITS, OUTPUT_HIDDEN],
            {
                INPUT_TOKENS: np.ascontiguousarray(tokens, dtype=np.int64),
                INPUT_LENGTHS: np.ascontiguousarray(lengths, dtype=np.int64),
                INPUT_HIDDEN: np.ascontiguousarray(hidden, dtype=np.float32),
            },
        )
        return logits, new_hidden

    def ingest(self, prompt: list[int], hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Consume a prompt for one stream (batch 1): via prefill when loaded, else step by step."""
        if self.prefill_session is not None:
            tokens = np.asarray([prompt], dtype=np.int64)  # [1, T]
            return self.prefill(tokens, np.asarray([len(prompt)], dtype=np.int64), hidden)
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
