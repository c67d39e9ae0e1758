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

OPSET = 17
# Pinned so that onnx releases newer than the runtime cannot raise the IR
# version past what ONNX Runtime reads (IR 9 covers opset 17).
IR_VERSION = 9
INPUT_TOKENS = "token_ids"
INPUT_HIDDEN = "hidden"
OUTPUT_LOGITS = "logits"
OUTPUT_HIDDEN = "hidden_out"
META_VOCAB = "charstream.vocab"
META_CONFIG = "charstream.config"


MODEL_CONFIG_KEYS = ("vocab_size", "embedding_dim", "hidden_size", "num_layers", "dropout")


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
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def const(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.array(array, order="C"), name))
        return name

    def node(op: str, inputs: list[str], output: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def w(name: str) -> np.ndarray:
        return np.asarray(weights[name], dtype=np.float32)

    # Folded layer-0 input table: [V, E] @ [E, 3H] + [3H] -> [V, 3H].
    table = w("embedding.weight") @ w("gru.weight_ih_l0").T + w("gru.bias_ih_l0")
    const("l0.input_table", table.astype(float_type))
    const("split_rz_n", np.array([2 * H, H], dtype=np.int64))
    const("split_r_z", np.array([H, H], dtype=np.int64))

    hidden = INPUT_HIDDEN
    if onnx_float != TensorProto.FLOAT:
        hidden = node("Cast", [INPUT_HIDDEN], "hidden_cast", to=onnx_float)

    x = None
    new_states = []
    for layer in range(L):
        p = f"l{layer}"
        if layer == 0:
            gi = node("Gather", ["l0.input_table", INPUT_TOKENS], f"{p}.gi", axis=0)  # [B, 3H]
        else:
            w_ih = const(f"{p}.w_ih_t", w(f"gru.weight_ih_l{layer}").T.astype(float_type))
            b_ih = const(f"{p}.b_ih", w(f"gru.bias_ih_l{layer}").astype(float_type))
            gi = node("Add", [node("MatMul", [x, w_ih], f"{p}.gi_mm"), b_ih], f"{p}.gi")
        const(f"{p}.index", np.array(layer, dtype=np.int64))
        h = node("Gather", [hidden, f"{p}.index"], f"{p}.h", axis=0)  # [B, H]
        w_hh = const(f"{p}.w_hh_t", w(f"gru.weight_hh_l{layer}").T.astype(float_type))
        b_hh = const(f"{p}.b_hh", w(f"gru.bias_hh_l{layer}").astype(float_type))
        gh = node("Add", [node("MatMul", [h, w_hh], f"{p}.gh_mm"), b_hh], f"{p}.gh")  # [B, 3H]
        nodes.append(
            helper.make_node("Split", [gi, "split_rz_n"], [f"{p}.gi_rz", f"{p}.gi_n"], axis=1)
        )
        nodes.append(
            helper.make_node("Split", [gh, "split_rz_n"], [f"{p}.gh_rz", f"{p}.gh_n"], axis=1)
        )
        rz = node("Sigmoid", [node("Add", [f"{p}.gi_rz", f"{p}.gh_rz"], f"{p}.rz_pre")], f"{p}.rz")
        nodes.append(helper.make_node("Split", [rz, "split_r_z"], [f"{p}.r", f"{p}.z"], axis=1))
        # linear_before_reset=1 semantics: r multiplies (W_hn h + b_hn), bias included.
        n_pre = node("Add", [f"{p}.gi_n", node("Mul", [f"{p}.r", f"{p}.gh_n"], f"{p}.r_ghn")], f"{p}.n_pre")
        n = node("Tanh", [n_pre], f"{p}.n")
        h_minus_n = node("Sub", [h, n], f"{p}.h_minus_n")
        x = node("Add", [n, node("Mul", [f"{p}.z", h_minus_n], f"{p}.z_hn")], f"{p}.h_new")  # [B, H]
        const(f"{p}.axes", np.array([0], dtype=np.int64))
        new_states.append(node("Unsqueeze", [x, f"{p}.axes"], f"{p}.h_new_3d"))  # [1, B, H]

    head_w = const("head.w_t", w("head.weight").T.astype(float_type))  # [H, V]
    head_b = const("head.b", w("head.bias").astype(float_type))  # [V]
    logits = node("Add", [node("MatMul", [x, head_w], "head.mm"), head_b], "head.logits")  # [B, V]
    state = new_states[0] if L == 1 else node("Concat", new_states, "hidden_concat", axis=0)
    if onnx_float == TensorProto.FLOAT:
        node("Identity", [logits], OUTPUT_LOGITS)
        node("Identity", [state], OUTPUT_HIDDEN)
    else:
        node("Cast", [logits], OUTPUT_LOGITS, to=TensorProto.FLOAT)
        node("Cast", [state], OUTPUT_HIDDEN, to=TensorProto.FLOAT)

    inputs = [
        helper.make_tensor_value_info(INPUT_TOKENS, TensorProto.INT64, ["batch"]),
        helper.make_tensor_value_info(INPUT_HIDDEN, TensorProto.FLOAT, [L, "batch", H]),
    ]
    return package_model(nodes, inits, "charstream_gru_cell", inputs, config, vocab)


def package_model(
    nodes: list[onnx.NodeProto],
    inits: list[onnx.TensorProto],
    name: str,
    inputs: list[onnx.ValueInfoProto],
    config: Mapping,
    vocab: list[str],
) -> onnx.ModelProto:
    """Wrap a graph's nodes into a checked, self-describing model.

    The cell and the prompt graph end in the same outputs, logits [batch, V]
    and hidden_out [L, batch, H]; only the inputs differ (the prompt graph
    takes [batch, time] tokens and their lengths), so the caller gives those.
    """
    L, H = int(config["num_layers"]), int(config["hidden_size"])
    V = int(config["vocab_size"])
    graph = helper.make_graph(
        nodes,
        name,
        inputs=inputs,
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
