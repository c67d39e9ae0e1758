"""The devices server-level tests run on: the CPU everywhere, CUDA where it can run."""

from __future__ import annotations

import pytest


def _cuda_skip_reason() -> str:
    """Why ONNX Runtime cannot run on a CUDA device here ("" when it can)."""
    from server.engine.model.providers import cuda_unavailable_reason

    return cuda_unavailable_reason()


# The devices a server-level test runs on: the CPU everywhere, CUDA where a GPU and
# onnxruntime-gpu's CUDA libraries are present (select those cases with -m gpu).
SERVING_DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(bool(_cuda_skip_reason()),
                                                                    reason=f"CUDA: {_cuda_skip_reason()}")]),
]
