"""Runs one batched model step for any set of session slots, states kept in a pool.

    runner = load_runner(model_dir, variant=None, device="auto", num_slots=1024)
    logits = runner.step(token_ids, slots, fresh)   # [B] int64, [B] int64, [B] bool -> [B, V]

Each call feeds token_ids[i] to the session in slots[i] (starting from a zero
state where fresh[i]) and stores the new state back in that slot. On the CPU
provider states are a numpy pool; on CUDA they stay on the device (IOBinding
with a graph that gathers and scatters them itself), so only token ids, slot
ids and logits cross between host and device.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from server.model_dir import ModelFile, ModelSpec, choose_model_file, read_spec
from server.providers import CUDA, create_session
from server.state_pool import DeviceStatePool, HostStatePool
from server.structured_log import log_event

logger = logging.getLogger("charstream.server")


@dataclass(frozen=True)
class RunnerInfo:
    """What the server reports about the model it runs."""

    spec: ModelSpec
    model_file: ModelFile
    provider: str
    num_slots: int
    states_on_device: bool


class ModelRunner:
    """Base: one batched step over pooled session states."""

    info: RunnerInfo

    def step(self, token_ids: np.ndarray, slots: np.ndarray, fresh: np.ndarray) -> np.ndarray:
        """Feed token_ids [B] to slots [B] (zero state where fresh [B]); return logits [B, V] on the host."""
        raise NotImplementedError

    def read_states(self, slots: np.ndarray) -> np.ndarray:
        """The states of `slots` as a host [L, B, H] array (tests and diagnostics)."""
        raise NotImplementedError


class HostStateRunner(ModelRunner):
    """States in host memory; the plain step model."""

    def __init__(self, session: ort.InferenceSession, info: RunnerInfo):
        self.session = session
        self.info = info
        spec = info.spec
        self.pool = HostStatePool(spec.num_layers, info.num_slots, spec.hidden_size)

    def step(self, token_ids: np.ndarray, slots: np.ndarray, fresh: np.ndarray) -> np.ndarray:
        hidden = self.pool.gather(slots, fresh)  # [L, B, H]
        logits, hidden_out = self.session.run(None, {"token_ids": token_ids, "hidden": hidden})
        self.pool.scatter(slots, hidden_out)
        return logits  # [B, V]

    def read_states(self, slots: np.ndarray) -> np.ndarray:
        return self.pool.read(slots)


class DeviceStateRunner(ModelRunner):
    """States in device memory; the pooled step graph run with IOBinding.

    `device_type` is "cuda" in service; "cpu" runs the same code path on the
    CPU provider so that it can be tested on machines without a GPU.
    """

    def __init__(self, session: ort.InferenceSession, info: RunnerInfo, device_type: str = "cuda", device_id: int = 0):
        self.session = session
        self.info = info
        spec = info.spec
        self.pool = DeviceStatePool(spec.num_layers, info.num_slots, spec.hidden_size, device_type, device_id)

    def step(self, token_ids: np.ndarray, slots: np.ndarray, fresh: np.ndarray) -> np.ndarray:
        binding = self.session.io_binding()
        binding.bind_cpu_input("token_ids", np.ascontiguousarray(token_ids, dtype=np.int64))
        binding.bind_cpu_input("slots", np.ascontiguousarray(slots, dtype=np.int64))
        binding.bind_cpu_input("keep", np.logical_not(fresh))  # bool [B]
        binding.bind_ortvalue_input("pool", self.pool.current)
        # Outputs come back in binding order: logits first.
        binding.bind_output("logits", "cpu")  # the only output that crosses to the host
        binding.bind_ortvalue_output("pool_out", self.pool.spare)
        self.session.run_with_iobinding(binding)
        logits = binding.get_outputs()[0].numpy()  # [B, V]
        self.pool.swap()
        return logits

    def read_states(self, slots: np.ndarray) -> np.ndarray:
        return self.pool.read(slots)


def _session_spec(session: ort.InferenceSession, where: str) -> ModelSpec:
    return read_spec(
        session.get_modelmeta().custom_metadata_map,
        [i.name for i in session.get_inputs()],
        [o.name for o in session.get_outputs()],
        where,
    )


def build_device_runner(
    model_file: ModelFile, spec: ModelSpec, num_slots: int, device: str, intra_op_threads: int = 0
) -> DeviceStateRunner:
    """The IOBinding runner: `device` "cuda" in service, "cpu" to test the same path without a GPU."""
    import onnx  # only the device path edits graphs

    from server.pooled_graph import build_pooled_step

    pooled = build_pooled_step(onnx.load(str(model_file.path)), num_slots, spec.num_layers, spec.hidden_size)
    session = create_session(pooled.SerializeToString(), device, intra_op_threads)
    provider = session.get_providers()[0]
    info = RunnerInfo(spec, model_file, provider, num_slots, states_on_device=True)
    return DeviceStateRunner(session, info, device_type="cuda" if provider == CUDA else "cpu")


def load_runner(
    model_dir: Path | str,
    variant: str | None = None,
    device: str = "auto",
    num_slots: int = 1024,
    intra_op_threads: int = 0,
) -> ModelRunner:
    """Load the model directory's chosen variant on the provider `device` selects.

    Raises ModelDirError (bad directory/model) or DeviceError (device unavailable).
    """
    model_file = choose_model_file(model_dir, variant)
    session = create_session(Path(model_file.path), device, intra_op_threads)
    spec = _session_spec(session, str(model_file.path))
    provider = session.get_providers()[0]
    runner: ModelRunner | None = None
    if provider == CUDA:
        try:
            runner = build_device_runner(model_file, spec, num_slots, "cuda", intra_op_threads)
        except Exception as exc:  # noqa: BLE001 - any failure of the optional pooled graph
            # The plain cell already runs on CUDA: serve it with states on the host
            # rather than refuse to start.
            log_event(logger, "device_state_pool_unavailable", logging.WARNING, reason=str(exc).splitlines()[0])
    if runner is None:
        runner = HostStateRunner(session, RunnerInfo(spec, model_file, provider, num_slots, states_on_device=False))
    else:
        del session  # replaced by the pooled graph on the same provider
    log_event(
        logger,
        "model_loaded",
        file=str(model_file.path),
        variant=model_file.variant,
        provider=runner.info.provider,
        states_on_device=runner.info.states_on_device,
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        num_layers=spec.num_layers,
    )
    return runner
