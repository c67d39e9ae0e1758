"""Execution-provider policy: --device auto|cuda|cpu -> an ONNX Runtime session.

auto: the CUDA provider when a CUDA device is present and the provider can be
created, otherwise the CPU provider with one log line saying why.
cuda: the CUDA provider or a DeviceError that says what is missing.
ONNX Runtime silently falls back to CPU when the CUDA provider fails, so the
provider actually in use is read back from the session, never assumed.
cuda_unavailable_reason / cuda_available is the one CUDA probe: the server's
device choice and the export's verification both ask it.
ThreadSettings carries the ONNX Runtime threading options (intra-op threads,
spinning) from the configuration to every session the server creates.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from server.engine.model.model_contract import CPU, CUDA
from server.structured_log import log_event

DEVICES = ("auto", "cuda", "cpu")
ALLOW_SPINNING_KEY = "session.intra_op.allow_spinning"
# ONNX Runtime's CUDA provider computes fp32 MatMul in TF32 by default on Ampere and newer
# GPUs: inputs rounded to a 10-bit mantissa, which put an H200's fp32 logits 1.3e-4 to 2e-4 of
# their scale away from PyTorch's (the fp32 tolerance is 1e-4; the CPU provider: 2e-7). fp32 means
# fp32; fp16 is the fast variant.
CUDA_PROVIDER_OPTIONS = {"use_tf32": "0"}

logger = logging.getLogger("charstream.server")


class DeviceError(RuntimeError):
    """The requested device cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class ThreadSettings:
    """ONNX Runtime threading for the server's sessions.

    intra_op_threads: threads one operator may use; 0 = ONNX Runtime's default
        (one per physical core).
    allow_spinning: whether idle intra-op threads busy-wait for the next piece
        of work ("session.intra_op.allow_spinning"). Spinning shaves latency off
        each step but burns CPU between steps, which hurts on a shared machine.

    These field defaults are the server's defaults (ServerConfig reads them from
    here): one thread, no spinning, until a benchmark says otherwise.
    """

    intra_op_threads: int = 1
    allow_spinning: bool = False


def cuda_device_count() -> tuple[int, str]:
    """(number of CUDA devices, reason when 0) from the NVIDIA driver, without loading CUDA libraries.

    Asking the driver first keeps CPU-only machines free of ONNX Runtime's
    loud provider-loading errors when --device auto has nothing to try.
    """
    name = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"
    try:
        driver = ctypes.CDLL(name)
    except OSError:
        return 0, f"no NVIDIA driver ({name} not found)"
    count = ctypes.c_int(0)
    if driver.cuInit(0) != 0:
        return 0, "the NVIDIA driver found no usable GPU (cuInit failed)"
    if driver.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
        return 0, "the NVIDIA driver reports no CUDA device"
    return count.value, ""


@functools.lru_cache(maxsize=1)
def cuda_unavailable_reason() -> str:
    """"" when ONNX Runtime can run a session on a CUDA device here, else why it cannot.

    Cheapest checks first: the build, then the driver (keeps CPU-only machines
    free of provider-loading errors), then a one-node session, because a GPU
    build lists the CUDA provider even where the CUDA or cuDNN libraries are
    missing and then silently runs on the CPU. Cached: the answer does not
    change while a process runs.
    """
    if CUDA not in ort.get_available_providers():
        return "this onnxruntime build has no CUDA provider (install onnxruntime-gpu)"
    count, reason = cuda_device_count()
    if count == 0:
        return reason
    try:
        # Finds CUDA/cuDNN libraries installed as Python packages (nvidia-*-cu*).
        ort.preload_dlls()
    except Exception as exc:  # noqa: BLE001 - best effort; the probe session decides
        logger.debug("preload_dlls failed: %s", exc)
    return _probe_cuda_session()


def _probe_cuda_session() -> str:
    """Start a one-node session on the CUDA provider alone: "" when it runs there."""
    from onnx import TensorProto, helper  # only machines with a CUDA driver get here

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "cuda_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    probe.ir_version = 9  # pinned: IR 9 covers opset 17 and every supported ONNX Runtime reads it
    options = ort.SessionOptions()
    options.log_severity_level = 4
    # A failed provider load is logged through the default logger, not the
    # session's: silence it for the probe (the returned reason says what failed).
    ort.set_default_logger_severity(4)
    try:
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=[CUDA])
    except Exception as exc:  # noqa: BLE001 - any failure to start CUDA means "not available"
        return f"creating the CUDA provider failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    finally:
        ort.set_default_logger_severity(2)  # ONNX Runtime's own default (warnings)
    if session.get_providers()[0] != CUDA:
        return "ONNX Runtime could not create the CUDA provider (CUDA or cuDNN libraries missing?)"
    return ""


def provider_entry(provider: str) -> str | tuple[str, dict[str, str]]:
    """`provider` as an entry of InferenceSession's `providers` list (CUDA with CUDA_PROVIDER_OPTIONS)."""
    return (CUDA, dict(CUDA_PROVIDER_OPTIONS)) if provider == CUDA else provider


def cuda_available() -> bool:
    """True when ONNX Runtime can run on a CUDA device here (see cuda_unavailable_reason)."""
    return not cuda_unavailable_reason()


def session_options(threads: ThreadSettings) -> ort.SessionOptions:
    """The SessionOptions every server session is created with."""
    options = ort.SessionOptions()
    if threads.intra_op_threads > 0:
        options.intra_op_num_threads = threads.intra_op_threads
    options.add_session_config_entry(ALLOW_SPINNING_KEY, "1" if threads.allow_spinning else "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


_options = session_options


def expected_provider(device: str) -> str:
    """The provider `device` should give, judged without creating a session (cheap).

    auto: CUDA when the CUDA probe passes (cuda_available; a one-node session,
    once per process, on machines with a driver), else CPU; cuda: CUDA
    (create_session fails if it cannot be had); cpu: CPU. Only an estimate:
    the session's own provider list is the truth.
    """
    if device == "cpu":
        return CPU
    if device == "cuda":
        return CUDA
    return CUDA if cuda_available() else CPU


# What ONNX Runtime raises for a file that is not a usable model, whatever the provider.
MODEL_LOAD_ERRORS: tuple[type[Exception], ...] = (ort_state.InvalidProtobuf, ort_state.InvalidGraph,
                                                  ort_state.NoSuchFile, ort_state.NoModel)


def _try_cuda(model: Path | bytes, threads: ThreadSettings) -> tuple[ort.InferenceSession | None, str]:
    """A CUDA session, or (None, reason)."""
    reason = cuda_unavailable_reason()
    if reason:
        return None, reason
    source = str(model) if isinstance(model, Path) else model
    try:
        session = ort.InferenceSession(source, session_options(threads), providers=[provider_entry(CUDA), CPU])
    except MODEL_LOAD_ERRORS:
        raise  # the file is at fault, not CUDA: the caller reports it as a bad model
    except Exception as exc:  # noqa: BLE001 - ORT raises plain RuntimeError/Fail here
        return None, f"creating the CUDA provider failed: {exc}"
    if session.get_providers()[0] != CUDA:
        return None, "ONNX Runtime could not create the CUDA provider (CUDA or cuDNN libraries missing?)"
    return session, ""


def create_session(
    model: Path | bytes, device: str, threads: ThreadSettings | None = None
) -> ort.InferenceSession:
    """An InferenceSession on the provider `device` asks for (see the module docstring).

    `threads` defaults to ThreadSettings() (the server's defaults).
    """
    if device not in DEVICES:
        raise DeviceError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    threads = threads if threads is not None else ThreadSettings()
    if device in ("auto", "cuda"):
        session, reason = _try_cuda(model, threads)
        if session is not None:
            return session
        if device == "cuda":
            raise DeviceError(f"--device cuda: {reason}. Use --device auto or --device cpu to run on the CPU.")
        log_event(logger, "cuda_unavailable", reason=reason, fallback=CPU)
    source = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(source, session_options(threads), providers=[CPU])
