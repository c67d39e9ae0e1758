"""The same model written with the ONNX GRU op: a step cell and a prompt (prefill) graph.

The step form exists to be measured against the hand-written cell in
onnx_cell.py (see export/bench.py and the README for the figures and the
choice). The prefill form consumes a whole prompt in one call: there the GRU
op's fused sequence loop is what we want, one call instead of one per character.

Two traps this file handles explicitly rather than leaving to an exporter:
- PyTorch applies the reset gate after the hidden matmul and its bias, which
  is the GRU op's `linear_before_reset=1`. With 0 the numbers are silently
  wrong; the argument exists so tests can prove verification catches that.
- PyTorch stacks gates as (r, z, n); the GRU op wants (z, r, h).
The initial state is a graph input, so the batch axis stays dynamic.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from export.onnx_cell import (
    INPUT_HIDDEN,
    INPUT_TOKENS,
    OUTPUT_HIDDEN,
    OUTPUT_LOGITS,
    package_model,
)

INPUT_LENGTHS = "lengths"


def _pytorch_to_onnx_gate_order(stacked: np.ndarray, hidden_size: int) -> np.ndarray:
    """Rows (r, z, n) -> (z, r, h): [3H, ...] or [3H]."""
    r, z, n = (stacked[i * hidden_size : (i + 1) * hidden_size] for i in range(3))
    return np.concatenate([z, r, n], axis=0)


def build_gru_op_graph(
    weights: Mapping[str, np.ndarray],
    config: Mapping,
    vocab: list[str],
    *,
    prefill: bool = False,
    linear_before_reset: int = 1,
) -> onnx.ModelProto:
    """Build the model with one ONNX GRU node per layer.

    prefill=False: the single-step contract of onnx_cell.build_cell
        (token_ids [batch], hidden [L, batch, H] -> logits [batch, V], hidden_out).
    prefill=True: token_ids [batch, T], lengths int64 [batch] (each 1..T; rows
        are right-padded), hidden [L, batch, H] -> logits [batch, V] after each
        row's last real token, hidden_out [L, batch, H] at that token.
    """
    L, H = int(config["num_layers"]), int(config["hidden_size"])
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def const(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(op: str, inputs: list[str], outputs: list[str] | str, **attrs) -> str:
        outputs = [outputs] if isinstance(outputs, str) else outputs
        nodes.append(helper.make_node(op, inputs, outputs, name=outputs[0], **attrs))
        return outputs[0]

    def w(name: str) -> np.ndarray:
        return np.asarray(weights[name], dtype=np.float32)

    const("embedding", w("embedding.weight"))  # [V, E]
    const("axis0", np.array([0], dtype=np.int64))
    const("axis1", np.array([1], dtype=np.int64))
    embedded = node("Gather", ["embedding", INPUT_TOKENS], "embedded", axis=0)
    if prefill:
        # [B, T, E] -> [T, B, E]: the GRU op's default layout is sequence-first.
        x = node("Transpose", [embedded], "x_seq", perm=[1, 0, 2])
        sequence_lens = node("Cast", [INPUT_LENGTHS], "sequence_lens", to=TensorProto.INT32)
    else:
        x = node("Unsqueeze", [embedded, "axis0"], "x_seq")  # [1, B, E]
        sequence_lens = ""  # every row runs the one step

    final_states = []
    for layer in range(L):
        p = f"l{layer}"
        W = const(f"{p}.W", _pytorch_to_onnx_gate_order(w(f"gru.weight_ih_l{layer}"), H)[None])
        R = const(f"{p}.R", _pytorch_to_onnx_gate_order(w(f"gru.weight_hh_l{layer}"), H)[None])
        bias = np.concatenate(
            [
                _pytorch_to_onnx_gate_order(w(f"gru.bias_ih_l{layer}"), H),
                _pytorch_to_onnx_gate_order(w(f"gru.bias_hh_l{layer}"), H),
            ]
        )[None]  # [1, 6H]
        B = const(f"{p}.B", bias)
        const(f"{p}.start", np.array([layer], dtype=np.int64))
        const(f"{p}.end", np.array([layer + 1], dtype=np.int64))
        h0 = node("Slice", [INPUT_HIDDEN, f"{p}.start", f"{p}.end", "axis0"], f"{p}.h0")  # [1, B, H]
        y, y_h = f"{p}.y", f"{p}.y_h"  # y [T, 1, B, H], y_h [1, B, H]
        node(
            "GRU",
            [x, W, R, B, sequence_lens, h0],
            [y, y_h],
            hidden_size=H,
            linear_before_reset=linear_before_reset,
        )
        final_states.append(y_h)
        x = node("Squeeze", [y, "axis1"], f"{p}.y_seq")  # [T, B, H]: next layer's input

    last = node("Squeeze", [final_states[-1], "axis0"], "last_state")  # [B, H]
    head_w = const("head.w_t", w("head.weight").T)  # [H, V]
    head_b = const("head.b", w("head.bias"))  # [V]
    node("Add", [node("MatMul", [last, head_w], "head.mm"), head_b], OUTPUT_LOGITS)  # [B, V]
    if L == 1:
        node("Identity", [final_states[0]], OUTPUT_HIDDEN)
    else:
        node("Concat", final_states, OUTPUT_HIDDEN, axis=0)  # [L, B, H]

    inputs = [
        helper.make_tensor_value_info(
            INPUT_TOKENS, TensorProto.INT64, ["batch", "time"] if prefill else ["batch"]
        )
    ]
    if prefill:
        inputs.append(helper.make_tensor_value_info(INPUT_LENGTHS, TensorProto.INT64, ["batch"]))
    inputs.append(helper.make_tensor_value_info(INPUT_HIDDEN, TensorProto.FLOAT, [L, "batch", H]))
    name = "charstream_gru_prefill" if prefill else "charstream_gru_op_cell"
    return package_model(nodes, inits, name, inputs, config, vocab)
