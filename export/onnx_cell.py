"""The single-step GRU cell as an ONNX graph, written op by op.

The cell is spelled out as Gather/MatMul/Add/Sigmoid/Tanh rather than the ONNX
GRU op: no exporter decides `linear_before_reset` for us, the batch axis is
dynamic by construction, and dynamic int8 quantization can reach the MatMuls.
Layer 0's embedding and input projection fold into one [V, 3H] table:
with a few dozen characters, Gather(table) replaces Gather + MatMul.

PyTorch GRU equations (gate order r, z, n in the stacked weights):
    r  = sigmoid(W_ir x + b_ir + W_hr h + b_hr)
    z  = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
    n  = tanh(W_in x + b_in + r * (W_hn h + b_hn))
    h' = (1 - z) * n + z * h  =  n + z * (h - n)
"""

from __future__ import annotations

import json
from typing import Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# Names the server reads: written from the one definition both sides share.
from server.engine.model.model_contract import (
    INPUT_HIDDEN,
    INPUT_TOKENS,
    META_CONFIG,
    META_VOCAB,
    MODEL_CONFIG_KEYS,
    OUTPUT_HIDDEN,
    OUTPUT_LOGITS,
)

OPSET = 17
# Pinned so that onnx releases newer than the runtime cannot raise the IR
# version past what ONNX Runtime reads (IR 9 covers opset 17).
IR_VERSION = 9


def model_metadata(config: Mapping, vocab: list[str]) -> dict[str, str]:
    """metadata_props that make an .onnx file describe itself (vocab and model config)."""
    model_config = {k: config[k] for k in MODEL_CONFIG_KEYS if k in config}
    return {
        META_VOCAB: json.dumps(list(vocab), ensure_ascii=False),
        META_CONFIG: json.dumps(model_config),
    }


def build_cell(
    weights: Mapping[str, np.ndarray],
    config: Mapping,
    vocab: list[str],
    *,
    float_type: type = np.float32,
) -> onnx.ModelProto:
    """Build the cell from PyTorch-named weights (see DESIGN: embedding/gru/head).

    `float_type` is the type weights and arithmetic use inside the graph;
    inputs and outputs stay float32 so callers never change (Cast at the edges).
    """
    L, H = int(config["num_layers"]), int(config["hidden_size"])
    onnx_float = helper.np_dtype_to_tensor_dtype(np.dtype(float_type))
    g = GraphBuilder(weights)
    _add_shared_constants(g, H, float_type)
    hidden = _hidden_input(g, onnx_float)  # [L, B, H] in float_type

    x = None  # layer input: none for layer 0, which reads its folded table
    new_states = []
    for layer in range(L):
        gi = _input_gates(g, layer, x, float_type)  # [B, 3H]
        x = _gru_layer(g, layer, gi, hidden, float_type)  # [B, H]
        new_states.append(_as_layer_state(g, layer, x))  # [1, B, H]

    _add_head_and_outputs(g, x, new_states, float_type, onnx_float)
    return g.package("charstream_gru_cell", config, vocab)


def _add_shared_constants(g: GraphBuilder, hidden_size: int, float_type: type) -> None:
    """Layer 0's folded input table and the gate split sizes every layer uses."""
    # Folded layer-0 input table: [V, E] @ [E, 3H] + [3H] -> [V, 3H].
    table = g.weight("embedding.weight") @ g.weight("gru.weight_ih_l0").T + g.weight("gru.bias_ih_l0")
    g.const("l0.input_table", table.astype(float_type))
    g.const("split_rz_n", np.array([2 * hidden_size, hidden_size], dtype=np.int64))  # 3H -> 2H, H
    g.const("split_r_z", np.array([hidden_size, hidden_size], dtype=np.int64))  # 2H -> H, H


def _hidden_input(g: GraphBuilder, onnx_float: int) -> str:
    """The incoming state [L, B, H], cast to the graph's float type when that is not float32."""
    if onnx_float == TensorProto.FLOAT:
        return INPUT_HIDDEN
    return g.node("Cast", [INPUT_HIDDEN], "hidden_cast", to=onnx_float)


def _input_gates(g: GraphBuilder, layer: int, x: str | None, float_type: type) -> str:
    """W_i x + b_i for all three gates, [B, 3H]: a table lookup for layer 0, a MatMul above."""
    p = f"l{layer}"
    if layer == 0:
        return g.node("Gather", ["l0.input_table", INPUT_TOKENS], f"{p}.gi", axis=0)  # [B, 3H]
    w_ih = g.const(f"{p}.w_ih_t", g.weight(f"gru.weight_ih_l{layer}").T.astype(float_type))  # [H, 3H]
    b_ih = g.const(f"{p}.b_ih", g.weight(f"gru.bias_ih_l{layer}").astype(float_type))  # [3H]
    return g.node("Add", [g.node("MatMul", [x, w_ih], f"{p}.gi_mm"), b_ih], f"{p}.gi")  # [B, 3H]


def _gru_layer(g: GraphBuilder, layer: int, gi: str, hidden: str, float_type: type) -> str:
    """One layer's step from its input gates `gi` [B, 3H]; returns the new state h' [B, H]."""
    p = f"l{layer}"
    g.const(f"{p}.index", np.array(layer, dtype=np.int64))
    h = g.node("Gather", [hidden, f"{p}.index"], f"{p}.h", axis=0)  # [B, H]
    w_hh = g.const(f"{p}.w_hh_t", g.weight(f"gru.weight_hh_l{layer}").T.astype(float_type))  # [H, 3H]
    b_hh = g.const(f"{p}.b_hh", g.weight(f"gru.bias_hh_l{layer}").astype(float_type))  # [3H]
    gh = g.node("Add", [g.node("MatMul", [h, w_hh], f"{p}.gh_mm"), b_hh], f"{p}.gh")  # [B, 3H]
    _split(g, gi, "split_rz_n", [f"{p}.gi_rz", f"{p}.gi_n"])  # [B, 2H], [B, H]
    _split(g, gh, "split_rz_n", [f"{p}.gh_rz", f"{p}.gh_n"])  # [B, 2H], [B, H]
    rz = g.node("Sigmoid", [g.node("Add", [f"{p}.gi_rz", f"{p}.gh_rz"], f"{p}.rz_pre")], f"{p}.rz")  # [B, 2H]
    _split(g, rz, "split_r_z", [f"{p}.r", f"{p}.z"])  # [B, H], [B, H]
    # linear_before_reset=1 semantics: r multiplies (W_hn h + b_hn), bias included.
    r_ghn = g.node("Mul", [f"{p}.r", f"{p}.gh_n"], f"{p}.r_ghn")  # [B, H]
    n = g.node("Tanh", [g.node("Add", [f"{p}.gi_n", r_ghn], f"{p}.n_pre")], f"{p}.n")  # [B, H]
    h_minus_n = g.node("Sub", [h, n], f"{p}.h_minus_n")  # [B, H]
    return g.node("Add", [n, g.node("Mul", [f"{p}.z", h_minus_n], f"{p}.z_hn")], f"{p}.h_new")  # [B, H]


def _split(g: GraphBuilder, source: str, sizes: str, outputs: list[str]) -> None:
    """Split `source` along axis 1 into pieces of `sizes` (an initializer's name)."""
    g.nodes.append(helper.make_node("Split", [source, sizes], outputs, axis=1))


def _as_layer_state(g: GraphBuilder, layer: int, h_new: str) -> str:
    """[B, H] -> [1, B, H], one layer's slice of hidden_out."""
    p = f"l{layer}"
    g.const(f"{p}.axes", np.array([0], dtype=np.int64))
    return g.node("Unsqueeze", [h_new, f"{p}.axes"], f"{p}.h_new_3d")  # [1, B, H]


def _add_head_and_outputs(
    g: GraphBuilder, x: str, new_states: list[str], float_type: type, onnx_float: int
) -> None:
    """logits [B, V] from the top layer's state; hidden_out [L, B, H]; both float32 at the edge."""
    head_w = g.const("head.w_t", g.weight("head.weight").T.astype(float_type))  # [H, V]
    head_b = g.const("head.b", g.weight("head.bias").astype(float_type))  # [V]
    logits = g.node("Add", [g.node("MatMul", [x, head_w], "head.mm"), head_b], "head.logits")  # [B, V]
    if len(new_states) == 1:
        state = new_states[0]  # [1, B, H]
    else:
        state = g.node("Concat", new_states, "hidden_concat", axis=0)  # [L, B, H]
    if onnx_float == TensorProto.FLOAT:
        g.node("Identity", [logits], OUTPUT_LOGITS)
        g.node("Identity", [state], OUTPUT_HIDDEN)
    else:
        g.node("Cast", [logits], OUTPUT_LOGITS, to=TensorProto.FLOAT)
        g.node("Cast", [state], OUTPUT_HIDDEN, to=TensorProto.FLOAT)


class GraphBuilder:
    """Collects a step graph's nodes and initializers in the order they are added.

    Both graph forms (build_cell here and gru_op's GRU-op cell) are written with
    it; `package` hands the result to package_model.
    """

    def __init__(self, weights: Mapping[str, np.ndarray]) -> None:
        self.weights = weights
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def weight(self, name: str) -> np.ndarray:
        """A PyTorch-named weight as float32."""
        return np.asarray(self.weights[name], dtype=np.float32)

    def const(self, name: str, array: np.ndarray) -> str:
        """Add an initializer; returns its name."""
        self.inits.append(numpy_helper.from_array(np.array(array, order="C"), name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str] | str, **attrs) -> str:
        """Add a node named after its (first) output; returns that output's name."""
        outputs = [outputs] if isinstance(outputs, str) else outputs
        self.nodes.append(helper.make_node(op, inputs, outputs, name=outputs[0], **attrs))
        return outputs[0]

    def package(self, name: str, config: Mapping, vocab: list[str]) -> onnx.ModelProto:
        """The collected graph as a checked, self-describing model (package_model)."""
        return package_model(self.nodes, self.inits, name, config, vocab)


def package_model(
    nodes: list[onnx.NodeProto],
    inits: list[onnx.TensorProto],
    name: str,
    config: Mapping,
    vocab: list[str],
) -> onnx.ModelProto:
    """Wrap a step graph's nodes into a checked, self-describing model.

    Both graph forms (this hand-written cell and gru_op's GRU-op cell) share
    the step signature, token_ids [batch] and hidden [L, batch, H] ->
    logits [batch, V] and hidden_out [L, batch, H], declared here once.
    """
    L, H = int(config["num_layers"]), int(config["hidden_size"])
    V = int(config["vocab_size"])
    graph = helper.make_graph(
        nodes,
        name,
        inputs=[
            helper.make_tensor_value_info(INPUT_TOKENS, TensorProto.INT64, ["batch"]),
            helper.make_tensor_value_info(INPUT_HIDDEN, TensorProto.FLOAT, [L, "batch", H]),
        ],
        outputs=[
            helper.make_tensor_value_info(OUTPUT_LOGITS, TensorProto.FLOAT, ["batch", V]),
            helper.make_tensor_value_info(OUTPUT_HIDDEN, TensorProto.FLOAT, [L, "batch", H]),
        ],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="charstream"
    )
    model.ir_version = IR_VERSION
    helper.set_model_props(model, model_metadata(config, vocab))
    onnx.checker.check_model(model, full_check=True)
    return model
