"""The runner whose session states stay on the device: graphs that gather and scatter them, IOBinding.

ONNX Runtime has no Python API to gather or scatter rows of a device buffer,
so every read and write of the pool is a graph of its own or part of one
(pooled_graph.py for an ordinary step, pooled_stretch_graph.py for the steady
lane's stretch and for writing states in), and only token ids, slot ids,
random numbers, logits and the undo window's states cross to the host. On
"cpu" the same code runs on the CPU provider, which is how it is tested on
machines without a GPU.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from server.engine.graphs.pooled_graph import (
    INPUT_KEEP,
    INPUT_POOL,
    INPUT_SLOTS,
    INPUT_START,
    OUTPUT_POOL,
    OUTPUT_START_STATE,
    build_pooled_step,
)
from server.engine.graphs.pooled_stretch_graph import (
    INPUT_KEEP_AT as STRETCH_KEEP_AT,
)
from server.engine.graphs.pooled_stretch_graph import (
    INPUT_POOL as STRETCH_POOL,
)
from server.engine.graphs.pooled_stretch_graph import (
    INPUT_SLOTS as STRETCH_SLOTS,
)
from server.engine.graphs.pooled_stretch_graph import (
    OUTPUT_POOL as STRETCH_POOL_OUT,
)
from server.engine.graphs.pooled_stretch_graph import (
    WRITE_POOL,
    WRITE_POOL_OUT,
    WRITE_SLOTS,
    WRITE_STATES,
    build_pool_write,
)
from server.engine.graphs.stretch_graph import (
    INPUT_FORCED,
    INPUT_STRETCH_LOGITS,
    INPUT_TEMPERATURE,
    INPUT_UNIFORMS,
    OUTPUT_DRAWN,
    OUTPUT_FINAL_LOGITS,
    OUTPUT_FORCED_INPUTS,
    OUTPUT_INPUTS,
    OUTPUT_TOKENS,
)
from server.engine.model.model_contract import INPUT_TOKENS, OUTPUT_LOGITS
from server.engine.model.model_dir import ModelFile, ModelSpec
from server.engine.model.providers import CUDA, ThreadSettings, create_session
from server.engine.runner.model_runner import (
    ModelRunner,
    RowStretch,
    RunnerInfo,
    StepOutput,
)
from server.engine.runner.state_pool import DeviceStatePool

# The stretch outputs that come to the host, in the order they are bound (and returned).
_STRETCH_OUTPUTS = (OUTPUT_FORCED_INPUTS, OUTPUT_TOKENS, OUTPUT_INPUTS, OUTPUT_DRAWN, OUTPUT_FINAL_LOGITS)


class DeviceStateRunner(ModelRunner):
    """States in device memory; the pooled step graph run with IOBinding.

    `device_type` is "cuda" in service; "cpu" runs the same code path on the
    CPU provider so that it can be tested on machines without a GPU.
    """

    # The stretch graph over the pool (pooled_stretch_graph.py); None: not built, and the steady
    # lane takes ordinary steps only.
    pooled_stretch_session: ort.InferenceSession | None = None

    def __init__(self, session: ort.InferenceSession, info: RunnerInfo, pool_write: ort.InferenceSession,
                 device_type: str = "cuda", device_id: int = 0):
        self.session = session
        self.info = info
        self._pool_write = pool_write
        spec = info.spec
        self.pool = DeviceStatePool(spec.num_layers, info.num_slots, spec.hidden_size, device_type, device_id)

    def step(
        self, token_ids: np.ndarray, slots: np.ndarray, start_mask: np.ndarray, start_states: np.ndarray | None = None
    ) -> StepOutput:
        spec = self.info.spec
        if start_states is None:
            start_states = np.zeros((spec.num_layers, len(slots), spec.hidden_size), np.float32)
        binding = self.session.io_binding()
        binding.bind_cpu_input(INPUT_TOKENS, np.ascontiguousarray(token_ids, dtype=np.int64))
        binding.bind_cpu_input(INPUT_SLOTS, np.ascontiguousarray(slots, dtype=np.int64))
        binding.bind_cpu_input(INPUT_KEEP, np.logical_not(start_mask))  # bool [B]
        binding.bind_cpu_input(INPUT_START, np.ascontiguousarray(start_states, dtype=np.float32))  # [L, B, H]
        binding.bind_ortvalue_input(INPUT_POOL, self.pool.current)
        # Outputs come back in binding order. Only logits and the step's input
        # states cross to the host; the pool stays on the device.
        binding.bind_output(OUTPUT_LOGITS, "cpu")
        binding.bind_output(OUTPUT_START_STATE, "cpu")
        binding.bind_ortvalue_output(OUTPUT_POOL, self.pool.spare)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        self.pool.swap()
        return StepOutput(outputs[0].numpy(), outputs[1].numpy())  # [B, V], [L, B, H]

    def read_states(self, slots: np.ndarray) -> np.ndarray:
        return self.pool.read(slots)

    def stretches_rows(self) -> bool:
        return self.pooled_stretch_session is not None

    def stretch_rows(self, slots: np.ndarray, forced: np.ndarray, uniforms: np.ndarray, temperature: np.ndarray,
                     keep: np.ndarray) -> RowStretch:
        assert self.pooled_stretch_session is not None, "stretch_rows() without a pooled stretch graph"
        rows = len(slots)
        binding = self.pooled_stretch_session.io_binding()
        binding.bind_cpu_input(INPUT_FORCED, np.ascontiguousarray(forced, dtype=np.int64))  # [1, R]
        binding.bind_cpu_input(INPUT_STRETCH_LOGITS, np.zeros((rows, self.info.spec.vocab_size), np.float32))  # unread
        binding.bind_cpu_input(INPUT_UNIFORMS, np.ascontiguousarray(uniforms, dtype=np.float64))  # [K, R]
        binding.bind_cpu_input(INPUT_TEMPERATURE, np.ascontiguousarray(temperature, dtype=np.float64))  # [R]
        binding.bind_cpu_input(STRETCH_SLOTS, np.ascontiguousarray(slots, dtype=np.int64))  # [R]
        keep_at = np.stack([np.asarray(keep, np.int64), np.arange(rows, dtype=np.int64)], axis=1)  # [R, 2]
        binding.bind_cpu_input(STRETCH_KEEP_AT, keep_at)
        binding.bind_ortvalue_input(STRETCH_POOL, self.pool.current)
        for name in _STRETCH_OUTPUTS:
            binding.bind_output(name, "cpu")
        binding.bind_ortvalue_output(STRETCH_POOL_OUT, self.pool.spare)
        self.pooled_stretch_session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        self.pool.swap()
        return RowStretch(*(value.numpy() for value in outputs[: len(_STRETCH_OUTPUTS)]))

    def put_states(self, slots: np.ndarray, states: np.ndarray) -> None:
        binding = self._pool_write.io_binding()
        binding.bind_ortvalue_input(WRITE_POOL, self.pool.current)
        binding.bind_cpu_input(WRITE_SLOTS, np.ascontiguousarray(slots, dtype=np.int64))  # [B]
        binding.bind_cpu_input(WRITE_STATES, np.ascontiguousarray(states, dtype=np.float32))  # [L, B, H]
        binding.bind_ortvalue_output(WRITE_POOL_OUT, self.pool.spare)
        self._pool_write.run_with_iobinding(binding)
        self.pool.swap()


def build_device_runner(
    model_file: ModelFile, spec: ModelSpec, num_slots: int, device: str, threads: ThreadSettings | None = None
) -> DeviceStateRunner:
    """The IOBinding runner: `device` "cuda" in service, "cpu" to test the same path without a GPU.
    Its pooled stretch graph is the caller's to build (load_runner: an optional speed-up)."""
    import onnx  # only the device path edits graphs

    cell = onnx.load(str(model_file.path))
    pooled = build_pooled_step(cell, num_slots, spec.num_layers, spec.hidden_size)
    session = create_session(pooled.SerializeToString(), device, threads)
    provider = session.get_providers()[0]
    # On the provider the step landed on: writing states in must not move the pool elsewhere.
    write = create_session(build_pool_write(num_slots, spec.num_layers, spec.hidden_size, cell).SerializeToString(),
                           "cuda" if provider == CUDA else "cpu", threads)
    info = RunnerInfo(spec, model_file, provider, num_slots, states_on_device=True)
    return DeviceStateRunner(session, info, write, device_type="cuda" if provider == CUDA else "cpu")
