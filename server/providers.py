"""Execution-provider policy: --device auto|cuda|cpu -> an ONNX Runtime session.

auto: the CUDA provider when a CUDA device is present and the provider can be
created, otherwise the CPU provider with one log line saying why.
cuda: the CUDA provider or a DeviceError that says what is missing.
ONNX Runtime silently falls back to CPU when the CUDA provider fails, so the
provider actually in use is read back from the session, never assumed.
"""

from __future__ import annotations

import ctypes
import logging
import sys
from pathlib import Path

import onnxruntime as ort

from server.structured_log import log_event

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
DEVICES = ("auto", "cuda", "cpu")

logger = logging.getLogger("charstream.server")


class DeviceError(RuntimeError):
    """The requested device cannot be used; the message says why and what to do."""


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


def _options(intra_op_threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    if intra_op_threads > 0:
        options.intra_op_num_threads = intra_op_threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def _try_cuda(model: Path | bytes, intra_op_threads: int) -> tuple[ort.InferenceSession | None, str]:
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
        session = ort.InferenceSession(source, _options(intra_op_threads), providers=[CUDA, CPU])
    except Exception as exc:  # noqa: BLE001 - ORT raises plain RuntimeError/Fail here
        return None, f"creating the CUDA provider failed: {exc}"
    if session.get_providers()[0] != CUDA:
        return None, "ONNX Runtime could not create the CUDA provider (CUDA or cuDNN libraries missing?)"
    return session, ""


def create_session(model: Path | bytes, device: str, intra_op_threads: int = 0) -> ort.InferenceSession:
    """An InferenceSession on the provider `device` asks for (see the module docstring)."""
    if device not in DEVICES:
        raise DeviceError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device in ("auto", "cuda"):
        session, reason = _try_cuda(model, intra_op_threads)
        if session is not None:
            return session
        if device == "cuda":
            raise DeviceError(f"--device cuda: {reason}. Use --device auto or --device cpu to run on the CPU.")
        log_event(logger, "cuda_unavailable", reason=reason, fallback=CPU)
    source = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(source, _options(intra_op_threads), providers=[CPU])
