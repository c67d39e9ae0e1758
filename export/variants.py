"""The model variants an export can write, each with the tolerance it is verified against.

Names and file names are the model-directory contract (VARIANT_FILES):
fp32  the reference graph; must match PyTorch to float32 rounding.
fp16  fp16 weights and maths inside, fp32 inputs/outputs (for GPUs).
int8  int8 quantization of the fp32 graph's MatMuls, weights per output column and
      states with a fixed scale (for CPUs).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import onnx
from onnx import helper

from export.onnx_cell import IR_VERSION, build_cell, model_metadata
from export.state_quantization import quantize_states_statically
from server.engine.model.model_contract import FP16, FP32, INT8, VARIANT_FILES


@dataclass(frozen=True)
class Tolerance:
    """What a variant promises against the PyTorch float32 model.

    logits_relative: bound on max |Δlogits| as a fraction of the reference's
        max |logit| (at least 1): logit errors grow with the logits themselves.
        Checked after one step from random states and at every step of the
        teacher-forced greedy trajectory.
    hidden_absolute: bound on max |Δstate| (GRU states lie in (-1, 1)).
    exact_greedy: free-running greedy text must be identical (fp32 only; a lossy
        variant may legitimately pick the other side of a near tie).
    max_loss_delta: bound on |val loss - PyTorch val loss| in nats when an
        evaluation text is given.
    """

    logits_relative: float
    hidden_absolute: float
    exact_greedy: bool
    max_loss_delta: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Variant:
    name: str
    file: str
    tolerance: Tolerance
    # Providers the variant is meant for; verification also runs it on the CPU
    # so that every export is checked wherever it happens.
    target: str
    build: Callable[[Mapping[str, np.ndarray], Mapping, list[str], Path], None]


def _save(model: onnx.ModelProto, path: Path) -> None:
    onnx.save(model, str(path))


def _build_fp32(weights: Mapping[str, np.ndarray], config: Mapping, vocab: list[str], path: Path) -> None:
    _save(build_cell(weights, config, vocab, float_type=np.float32), path)


def _build_fp16(weights: Mapping[str, np.ndarray], config: Mapping, vocab: list[str], path: Path) -> None:
    _save(build_cell(weights, config, vocab, float_type=np.float16), path)


def _build_int8(weights: Mapping[str, np.ndarray], config: Mapping, vocab: list[str], path: Path) -> None:
    """quantize_dynamic over the fp32 cell: MatMul weights to int8 per output column; then the
    activations, all GRU states in (-1, 1), quantized with a fixed scale instead of one computed
    per call for the whole batch (state_quantization.py: a row's result must not depend on the
    rows beside it).

    The folded layer-0 table stays fp32: it is a lookup (Gather), tiny, and
    quantizing it would only add error. Nothing needs calibrating.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32 = build_cell(weights, config, vocab, float_type=np.float32)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        source = Path(scratch) / "fp32.onnx"
        _save(fp32, source)
        # quantize_dynamic logs a generic "consider pre-processing" warning on the
        # root logger; our graph has nothing for that pre-processing to do.
        logging.disable(logging.WARNING)
        try:
            quantize_dynamic(
                source,
                path,
                op_types_to_quantize=["MatMul"],
                per_channel=True,
                weight_type=QuantType.QInt8,
                reduce_range=True,
            )
        finally:
            logging.disable(logging.NOTSET)
    quantized = onnx.load(str(path))
    # The quantizer rewrites the model proto: restore the pinned IR version and
    # make sure the file still describes itself.
    quantized = quantize_states_statically(quantized)
    quantized.ir_version = IR_VERSION
    del quantized.metadata_props[:]
    helper.set_model_props(quantized, model_metadata(config, vocab))
    _save(quantized, path)


# Bounds chosen from measurements (export/README.md): each is several times the
# error the variant really shows on trained and random models. The fp32 and
# fp16 bounds are far below what a structural bug produces (a GRU with
# linear_before_reset=0 is off by 6-20% of max |logit|); int8 comes from
# quantizing the fp32 graph, which is itself verified first.
VARIANTS: dict[str, Variant] = {
    FP32: Variant(
        FP32, VARIANT_FILES[FP32],
        Tolerance(logits_relative=1e-4, hidden_absolute=1e-4, exact_greedy=True, max_loss_delta=1e-3),
        target="any", build=_build_fp32,
    ),
    FP16: Variant(
        FP16, VARIANT_FILES[FP16],
        Tolerance(logits_relative=0.01, hidden_absolute=0.01, exact_greedy=False, max_loss_delta=0.005),
        target="cuda", build=_build_fp16,
    ),
    INT8: Variant(
        INT8, VARIANT_FILES[INT8],
        Tolerance(logits_relative=0.05, hidden_absolute=0.1, exact_greedy=False, max_loss_delta=0.02),
        target="cpu", build=_build_int8,
    ),
}


def parse_variants(text: str | list[str] | tuple[str, ...]) -> list[str]:
    """'fp32,int8' -> ['fp32', 'int8'] (fp32 always included and first: it is the reference file)."""
    names = [n.strip() for n in text.split(",")] if isinstance(text, str) else list(text)
    names = [n for n in names if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choose from {sorted(VARIANTS)}")
    return [FP32] + [n for n in dict.fromkeys(names) if n != FP32]
