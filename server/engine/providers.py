"""Execution-provider policy: --device auto|cuda|cpu -> an ONNX Runtime session.

auto: the CUDA provider when a CUDA device is present and the provider can be
created, otherwise the CPU provider with one log line saying why.
cuda: the CUDA provider or a DeviceError that says what is missing.
ONNX Runtime silently falls back to CPU when the CUDA provider fails, so the
provider actually in use is read back from the session, never assumed.
ThreadSettings carries the ONNX Runtime threading options (intra-op threads,
spinning) from the configuration to every session the server creates.
"""

from __future__ import annotations

import ctypes
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from server.structured_log import log_event

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
DEVICES = ("auto", "cuda", "cpu")
ALLOW_SPINNING_KEY = "session.intra_op.allow_spinning"

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

    auto: CUDA when this onnxruntime has the CUDA provider and the driver reports
    a device, else CPU; cuda: CUDA (create_session fails if it cannot be had);
    cpu: CPU. Only an estimate: the session's own provider list is the truth.
    """
    if device == "cpu":
        return CPU
    if device == "cuda":
        return CUDA
    if CUDA in ort.get_available_providers() and cuda_device_count()[0] > 0:
        return CUDA
    return CPU


# What ONNX Runtime raises for a file that is not a usable model, whatever the provider.
MODEL_LOAD_ERRORS: tuple[type[Exception], ...] = (ort_state.InvalidProtobuf, ort_state.InvalidGraph,
                                                  ort_state.NoSuchFile, ort_state.NoModel)


def _try_cuda(model: Path | bytes, threads: ThreadSettings) -> tuple[ort.InferenceSession | None, str]:
    """A CUDA session, or (None, reason)."""
    if CUDA not in ort.get_available_providers():
        return None, "this onnxruntime build has no CUDA provider (install onnxruntime-gpu)"
    count, reason = cuda_device_count()
    if count == 0:
        return None, reason
    try:
        # Finds CUDA/cuDNN libraries installed as Python packages (nvidia-*-cu*).
        ort.preload_dlls()
    except Exception as exc:  # noqa: BLE001 - best effort; session creation decides
        logger.debug("preload_dlls failed: %s", exc)
    source = str(model) if isinstance(model, Path) else model
    try:
        session = ort.InferenceSession(source, session_options(threads), providers=[CUDA, CPU])
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
