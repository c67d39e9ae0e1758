"""The same single-step cell written with the ONNX GRU op.

It exists to be measured against the hand-written cell in onnx_cell.py (see
export/bench.py and the README for the figures and the choice) and to prove,
in tests, that verification catches the GRU op's exporter traps.

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

from export.onnx_cell import GraphBuilder
from server.engine.model.model_contract import (
    INPUT_HIDDEN,
    INPUT_TOKENS,
    OUTPUT_HIDDEN,
    OUTPUT_LOGITS,
)


def build_gru_op_graph(
    weights: Mapping[str, np.ndarray],
    config: Mapping,
    vocab: list[str],
    *,
    linear_before_reset: int = 1,
) -> onnx.ModelProto:
    """Build the step cell with one ONNX GRU node per layer.

    Same signature as onnx_cell.build_cell: token_ids [batch], hidden
    [L, batch, H] -> logits [batch, V], hidden_out [L, batch, H].
    """
    L, H = int(config["num_layers"]), int(config["hidden_size"])
    g = GraphBuilder(weights)
    x = _embedded_sequence(g)  # [1, B, E]
    final_states = []
    for layer in range(L):
        x, y_h = _gru_layer(g, layer, x, H, linear_before_reset)  # [1, B, H] each
        final_states.append(y_h)
    _add_head_and_outputs(g, final_states)
    return g.package("charstream_gru_op_cell", config, vocab)


def _embedded_sequence(g: GraphBuilder) -> str:
    """token_ids [B] -> embeddings as a one-step sequence [1, B, E]; adds the axis constants."""
    g.const("embedding", g.weight("embedding.weight"))  # [V, E]
    g.const("axis0", np.array([0], dtype=np.int64))
    g.const("axis1", np.array([1], dtype=np.int64))
    embedded = g.node("Gather", ["embedding", INPUT_TOKENS], "embedded", axis=0)  # [B, E]
    # The GRU op's default layout is sequence-first: a sequence of one step.
    return g.node("Unsqueeze", [embedded, "axis0"], "x_seq")  # [1, B, E]


def _gru_layer(
    g: GraphBuilder, layer: int, x: str, hidden_size: int, linear_before_reset: int
) -> tuple[str, str]:
    """One GRU node over `x` [1, B, E or H]; returns (next layer's input, final state), each [1, B, H]."""
    p = f"l{layer}"
    W, R, B = _layer_weights(g, layer, hidden_size)
    g.const(f"{p}.start", np.array([layer], dtype=np.int64))
    g.const(f"{p}.end", np.array([layer + 1], dtype=np.int64))
    h0 = g.node("Slice", [INPUT_HIDDEN, f"{p}.start", f"{p}.end", "axis0"], f"{p}.h0")  # [1, B, H]
    y, y_h = f"{p}.y", f"{p}.y_h"  # y [1, 1, B, H], y_h [1, B, H]
    g.node(
        "GRU",
        [x, W, R, B, "", h0],  # no sequence_lens: every row runs the one step
        [y, y_h],
        hidden_size=hidden_size,
        linear_before_reset=linear_before_reset,
    )
    next_x = g.node("Squeeze", [y, "axis1"], f"{p}.y_seq")  # [1, B, H]: next layer's input
    return next_x, y_h


def _layer_weights(g: GraphBuilder, layer: int, hidden_size: int) -> tuple[str, str, str]:
    """The GRU op's W [1, 3H, E or H], R [1, 3H, H] and B [1, 6H], in its (z, r, h) gate order."""
    p, H = f"l{layer}", hidden_size
    W = g.const(f"{p}.W", _pytorch_to_onnx_gate_order(g.weight(f"gru.weight_ih_l{layer}"), H)[None])
    R = g.const(f"{p}.R", _pytorch_to_onnx_gate_order(g.weight(f"gru.weight_hh_l{layer}"), H)[None])
    bias = np.concatenate(
        [
            _pytorch_to_onnx_gate_order(g.weight(f"gru.bias_ih_l{layer}"), H),
            _pytorch_to_onnx_gate_order(g.weight(f"gru.bias_hh_l{layer}"), H),
        ]
    )[None]  # [1, 6H]
    B = g.const(f"{p}.B", bias)
    return W, R, B


def _pytorch_to_onnx_gate_order(stacked: np.ndarray, hidden_size: int) -> np.ndarray:
    """Rows (r, z, n) -> (z, r, h): [3H, ...] or [3H]."""
    r, z, n = (stacked[i * hidden_size : (i + 1) * hidden_size] for i in range(3))
    return np.concatenate([z, r, n], axis=0)


def _add_head_and_outputs(g: GraphBuilder, final_states: list[str]) -> None:
    """logits [B, V] from the top layer's final state; hidden_out [L, B, H] from all of them."""
    last = g.node("Squeeze", [final_states[-1], "axis0"], "last_state")  # [B, H]
    head_w = g.const("head.w_t", g.weight("head.weight").T)  # [H, V]
    head_b = g.const("head.b", g.weight("head.bias"))  # [V]
    g.node("Add", [g.node("MatMul", [last, head_w], "head.mm"), head_b], OUTPUT_LOGITS)  # [B, V]
    if len(final_states) == 1:
        g.node("Identity", [final_states[0]], OUTPUT_HIDDEN)  # [1, B, H]
    else:
        g.node("Concat", final_states, OUTPUT_HIDDEN, axis=0)  # [L, B, H]
