"""Runs one batched model step for any set of session slots, states kept in a pool.

    runner = load_runner(model_dir, variant="auto", device="auto", num_slots=1024)
    out = runner.step(token_ids, slots, start_mask)   # [B] int64, [B] int64, [B] bool
    out.logits                                         # [B, V]
    out.inputs                                         # [L, B, H]: the states each row started from
    runner.prefill(tokens, start, slot)                # [T] int64 -> [L, H]: the state after T known characters
    runner.stretch_session                             # samples and steps K characters per call (stretch.py)

Each call feeds token_ids[i] to the session in slots[i] and stores the new
state back in that slot. A row starts from the slot's pooled state, or, where
start_mask[i], from start_states[:, i] (zeros when start_states is None: a
fresh session). The scheduler keeps `inputs` rows to undo characters that
were generated ahead but never delivered. On the CPU
provider states are a numpy pool; on CUDA they stay on the device (IOBinding
with graphs that gather and scatter them themselves: device_runner.py), so
only token ids, slot ids, logits and the undo window's states cross between
host and device.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NamedTuple

import numpy as np
import onnxruntime as ort

from server.engine.graphs.pooled_stretch_graph import build_pooled_stretch
from server.engine.graphs.prefill_graph import (
    INPUT_CHUNK,
    INPUT_CHUNK_START,
    build_prefill,
)
from server.engine.graphs.stretch_graph import (
    INPUT_FORCED,
    INPUT_STRETCH_LOGITS,
    INPUT_STRETCH_START,
    INPUT_TEMPERATURE,
    INPUT_UNIFORMS,
    build_stretch,
)
from server.engine.model.model_contract import INPUT_HIDDEN, INPUT_TOKENS
from server.engine.model.model_dir import (
    AUTO,
    ModelDirError,
    ModelFile,
    ModelSpec,
    choose_model_file,
    read_spec,
)
from server.engine.model.providers import (
    CPU,
    CUDA,
    MODEL_LOAD_ERRORS,
    ThreadSettings,
    create_session,
    expected_provider,
)
from server.engine.runner.state_pool import HostStatePool
from server.structured_log import log_event

if TYPE_CHECKING:
    import onnx

logger = logging.getLogger("charstream.server")


@dataclass(frozen=True)
class RunnerInfo:
    """What the server reports about the model it runs."""

    spec: ModelSpec
    model_file: ModelFile
    provider: str
    num_slots: int
    states_on_device: bool


class StepOutput(NamedTuple):
    logits: np.ndarray  # [B, V] on the host
    inputs: np.ndarray  # [L, B, H] on the host: the state each row started from


class RowStretch(NamedTuple):
    """A stretch call over pooled rows, as the host sees it: the stretch graph's outputs
    (stretch_graph.py) less the states after the call, which stay in the pool."""

    forced_inputs: np.ndarray  # [F, L, R, H]: the state before each forced character
    tokens: np.ndarray  # [K, R]: the characters drawn
    inputs: np.ndarray  # [K, L, R, H]: the state before each drawn character (undo window)
    drawn: np.ndarray  # [K, R, V]: the logits each was drawn from
    final_logits: np.ndarray  # [R, V]: the logits after the last drawn character


class ModelRunner:
    """Base: one batched step over pooled session states."""

    info: RunnerInfo
    # The Loop graph that consumes known characters in one call (prefill_graph.py); None: not built.
    prefill_session: ort.InferenceSession | None = None
    # The Loop graph that samples and consumes a lone stream's characters (stretch_graph.py); None: not built.
    stretch_session: ort.InferenceSession | None = None

    def prefill(self, tokens: np.ndarray, start: np.ndarray | None, slot: int) -> np.ndarray:
        """The state [L, H] after feeding tokens [T] to the session in `slot`, starting from `start`
        [L, H] (None: the slot's pooled state). The pool is left as it was: the caller makes the
        result the slot's next start state."""
        assert self.prefill_session is not None, "prefill() without a prefill graph"
        hidden = self.read_states(np.array([slot]))[:, 0, :] if start is None else start  # [L, H]
        (final,) = self.prefill_session.run(None, {INPUT_CHUNK: np.ascontiguousarray(tokens, dtype=np.int64),
                                                   INPUT_CHUNK_START: np.ascontiguousarray(hidden[:, None, :])})
        return final[:, 0, :]  # [L, 1, H] -> [L, H]

    def step(
        self, token_ids: np.ndarray, slots: np.ndarray, start_mask: np.ndarray, start_states: np.ndarray | None = None
    ) -> StepOutput:
        """Feed token_ids [B] to slots [B]; rows where start_mask [B] start from start_states [L, B, H] (or zeros)."""
        raise NotImplementedError

    def read_states(self, slots: np.ndarray) -> np.ndarray:
        """The states of `slots` as a host [L, B, H] array (tests and diagnostics)."""
        raise NotImplementedError

    def stretches_rows(self) -> bool:
        """Whether stretch_rows can run (the steady lane's stretches: lane_stretch.py)."""
        return False

    def stretch_rows(self, slots: np.ndarray, forced: np.ndarray, uniforms: np.ndarray, temperature: np.ndarray,
                     keep: np.ndarray) -> RowStretch:
        """One stretch-graph call from the pooled states of `slots` [R]: each row consumes its
        forced character (forced [1, R]), then draws and consumes K more with its random numbers
        uniforms [K, R] at its temperature [R]. Afterwards the pool holds each row's state after
        its forced character and its first keep[r] (<= K) drawn ones."""
        raise NotImplementedError

    def put_states(self, slots: np.ndarray, states: np.ndarray) -> None:
        """`states` [L, B, H] (never written to afterwards) are the newest states of `slots` [B]."""
        raise NotImplementedError


class HostStateRunner(ModelRunner):
    """States in host memory; the plain step model."""

    def __init__(self, session: ort.InferenceSession, info: RunnerInfo):
        self.session = session
        self.info = info
        spec = info.spec
        self.pool = HostStatePool(spec.num_layers, info.num_slots, spec.hidden_size)

    def step(
        self, token_ids: np.ndarray, slots: np.ndarray, start_mask: np.ndarray, start_states: np.ndarray | None = None
    ) -> StepOutput:
        hidden = self.pool.gather(slots, start_mask, start_states)  # [L, B, H]
        logits, hidden_out = self.session.run(None, {INPUT_TOKENS: token_ids, INPUT_HIDDEN: hidden})
        self.pool.scatter(slots, hidden_out)
        return StepOutput(logits, hidden)  # [B, V], [L, B, H]

    def read_states(self, slots: np.ndarray) -> np.ndarray:
        return self.pool.read(slots)

    def stretches_rows(self) -> bool:
        return self.stretch_session is not None

    def stretch_rows(self, slots: np.ndarray, forced: np.ndarray, uniforms: np.ndarray, temperature: np.ndarray,
                     keep: np.ndarray) -> RowStretch:
        assert self.stretch_session is not None, "stretch_rows() without a stretch graph"
        forced_inputs, tokens, inputs, drawn, final_logits, final = self.stretch_session.run(None, {
            INPUT_FORCED: forced,  # [1, R]
            INPUT_STRETCH_LOGITS: np.zeros((len(slots), self.info.spec.vocab_size), np.float32),  # unread: F = 1
            # The last call's own output when it was over the same slots: no gather, no copy.
            INPUT_STRETCH_START: self.pool.gather(slots, np.zeros(len(slots), bool)),  # [L, R, H]
            INPUT_UNIFORMS: uniforms,  # [K, R] float64
            INPUT_TEMPERATURE: temperature,  # [R]
        })  # [1, L, R, H], [K, R], [K, L, R, H], [K, R, V], [R, V], [L, R, H]
        short = (keep < len(tokens)).nonzero()[0]  # rows whose state is the one after their keep[r]-th
        states = final
        if short.size:
            states = final.copy()
            states[:, short, :] = inputs[keep[short], :, short, :].transpose(1, 0, 2)  # [S, L, H] -> [L, S, H]
        self.pool.scatter(slots, states)  # kept resident: the next call over the same rows starts from it
        return RowStretch(forced_inputs, tokens, inputs, drawn, final_logits)

    def put_states(self, slots: np.ndarray, states: np.ndarray) -> None:
        self.pool.scatter(slots, states)


def _session_spec(session: ort.InferenceSession, where: str) -> ModelSpec:
    return read_spec(
        session.get_modelmeta().custom_metadata_map,
        [i.name for i in session.get_inputs()],
        [o.name for o in session.get_outputs()],
        where,
    )


def _loop_session(what: str, build: Callable[[onnx.ModelProto], onnx.ModelProto], model_file: ModelFile,
                  device: str, threads: ThreadSettings) -> ort.InferenceSession | None:
    """A Loop graph around the served cell (prefill or stretch) on the same provider, or None: both
    are optional speed-ups, and without them every character takes an ordinary step."""
    import onnx  # only graph building needs it

    try:
        graph = build(onnx.load(str(model_file.path)))
        return create_session(graph.SerializeToString(), device, threads)
    except Exception as exc:  # noqa: BLE001 - an optional speed-up: serve without it
        log_event(logger, f"{what}_unavailable", logging.WARNING, reason=str(exc).splitlines()[0])
        return None


def warn_if_rows_share_a_scale(model_file: ModelFile) -> bool:
    """Log a warning, and return True, when the served file quantizes each step's activations with
    one scale for the whole batch (DynamicQuantizeLinear: int8 files exported before their states
    were quantized with a fixed scale). A row's logits then move with the rows beside it, so a
    seeded session's text can depend on the other sessions; the file still serves, and exporting
    it again fixes it."""
    import onnx  # only this check and graph building need it

    cell = onnx.load(str(model_file.path), load_external_data=False)
    if not any(node.op_type == "DynamicQuantizeLinear" for node in cell.graph.node):
        return False
    log_event(logger, "rows_depend_on_batch", logging.WARNING, file=str(model_file.path),
              advice="this int8 file quantizes a whole batch's states with one scale, so seeded text can depend on "
                     "the sessions sharing a step: export the model again with charstream-export")
    return True


def _open(path: Path, device: str, threads: ThreadSettings) -> ort.InferenceSession:
    """create_session, with a file ONNX Runtime cannot load reported as a bad model directory."""
    try:
        # Positional arguments: tests stand in for create_session with plain callables.
        return create_session(path, device, threads)
    except MODEL_LOAD_ERRORS as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelDirError(f"{path} cannot be loaded as an ONNX model (corrupt or truncated? export it "
                            f"again with charstream-export): {reason}") from exc


def _choose_and_open(model_dir: Path | str, variant: str | None, device: str,
                     threads: ThreadSettings) -> tuple[ModelFile, ort.InferenceSession]:
    """The file to serve and its session; for "auto", chosen again if the session ended up on
    another provider than the one assumed."""
    assumed = expected_provider(device) if variant == AUTO else None
    model_file = choose_model_file(model_dir, variant, assumed)
    session = _open(Path(model_file.path), device, threads)
    if assumed is not None and session.get_providers()[0] != assumed:
        actual = session.get_providers()[0]
        again = choose_model_file(model_dir, variant, actual)
        if again.path != model_file.path:
            # Straight to the provider in use: asking for CUDA again would fail again.
            session = _open(Path(again.path), "cpu" if actual == CPU else device, threads)
        reason = f"{again.reason}; chosen again: the session runs on {actual}, not the {assumed} assumed"
        model_file = ModelFile(again.directory, again.variant, again.path, reason=reason)
    return model_file, session


def load_runner(
    model_dir: Path | str,
    variant: str | None = AUTO,
    device: str = "auto",
    num_slots: int = 1024,
    threads: ThreadSettings | int | None = None,
    device_pool: bool | None = None,
) -> ModelRunner:
    """Load the model directory's chosen variant on the provider `device` selects.

    variant: a name from the manifest, None for the manifest's default, or "auto":
    the variant verified for the provider (model_dir.choose_model_file). For
    "auto" the provider is estimated first (providers.expected_provider), the
    file chosen for it, and if the session ends up on another provider (ONNX
    Runtime falls back to the CPU silently) the file is chosen again for the
    provider actually in use; the reason is in info.model_file.reason.
    threads: ONNX Runtime threading (default ThreadSettings()); a bare int is
    read as intra_op_threads with the default spinning setting (older callers).
    device_pool: keep states in a pool of ONNX Runtime values, read and written by graphs
    (device_runner.py); None: where the provider is CUDA. True on the CPU provider runs that
    path there (tests).

    Raises ModelDirError (bad directory/model) or DeviceError (device unavailable).
    """
    if threads is None:
        threads = ThreadSettings()
    elif not isinstance(threads, ThreadSettings):
        threads = ThreadSettings(intra_op_threads=int(threads))
    model_file, session = _choose_and_open(model_dir, variant, device, threads)
    spec = _session_spec(session, str(model_file.path))
    warn_if_rows_share_a_scale(model_file)
    provider = session.get_providers()[0]
    runner: ModelRunner | None = None
    loop_device = "cuda" if provider == CUDA else "cpu"
    pooled = provider == CUDA if device_pool is None else device_pool
    if pooled:
        from server.engine.runner.device_runner import (
            build_device_runner,  # only this path edits graphs
        )

        try:
            runner = build_device_runner(model_file, spec, num_slots, loop_device, threads)
        except Exception as exc:  # noqa: BLE001 - any failure of the optional pooled graph
            # The plain cell already runs on CUDA: serve it with states on the host
            # rather than refuse to start.
            log_event(logger, "device_state_pool_unavailable", logging.WARNING, reason=str(exc).splitlines()[0])
    if runner is None:
        runner = HostStateRunner(session, RunnerInfo(spec, model_file, provider, num_slots, states_on_device=False))
    else:
        del session  # replaced by the pooled graph on the same provider
    runner.prefill_session = _loop_session(
        "prefill", lambda cell: build_prefill(cell, spec.num_layers, spec.hidden_size), model_file, loop_device, threads)
    runner.stretch_session = _loop_session(
        "stretch", lambda cell: build_stretch(cell, spec.num_layers, spec.hidden_size, spec.vocab_size), model_file,
        loop_device, threads)
    if runner.info.states_on_device and runner.stretch_session is not None:
        runner.pooled_stretch_session = _loop_session(  # type: ignore[attr-defined]
            "pooled_stretch", lambda cell: build_pooled_stretch(
                build_stretch(cell, spec.num_layers, spec.hidden_size, spec.vocab_size), num_slots, spec.num_layers,
                spec.hidden_size), model_file, loop_device, threads)
    log_event(
        logger,
        "model_loaded",
        file=str(model_file.path),
        variant=model_file.variant,
        variant_reason=model_file.reason,
        provider=runner.info.provider,
        states_on_device=runner.info.states_on_device,
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        num_layers=spec.num_layers,
    )
    return runner
