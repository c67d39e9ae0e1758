"""Wrap the single-step cell in a Loop that consumes known characters, then samples and consumes more.

A lone stream spends more time per character in the engine's Python (sampling
one row, bookkeeping, a model call) than in the model step itself on a fast
CPU. One call of this graph consumes the F characters already queued (a prompt,
or the character just sampled) and then K more it samples itself:

    inputs:  charstream_stretch.forced int64 [F]          known characters, consumed first
             charstream_stretch.logits float32 [1, V]   the logits to draw from when F = 0
             charstream_stretch.start float32 [L, 1, H]   the state before the first character
             charstream_stretch.uniforms float64 [K]      the session's random numbers, one per sampled character
             charstream_stretch.temperature float64 [1]
    outputs: charstream_stretch.tokens int64 [F + K, 1]        every character consumed (forced, then sampled)
             charstream_stretch.inputs float32 [F + K, L, 1, H] the state before consuming each (undo window)
             charstream_stretch.drawn float32 [F + K, 1, V]    the logits before each (a sampled one's were drawn from)
             charstream_stretch.final_logits float32 [1, V], charstream_stretch.final float32 [L, 1, H]

    logits, h = logits0, start
    for i in range(F + K):                                # an ONNX Loop; the body holds the cell's nodes
        if i < F:
            token = forced[i]
        else:                                             # float32, as sampling.choose_token's plain branch
            w = exp(logits / T - max(logits / T))
            token = min(count(cumsum(w) <= uniforms[i - F] * sum(w)), V - 1)
        logits, h = cell(token, h)

The sampling is choose_token's plain branch, operation for operation, but in
float32: the graph's draw is a fast first guess, never the decision. The
engine re-samples every sampled row of `drawn` with the server's float64 NumPy
sampler in one pass and keeps the stretch only up to the first disagreement
(stretch.py), which can only come where a random number falls within float32
rounding of a boundary between two characters (none in 1,860 draws measured).
float32 made an iteration 1-2 µs cheaper than float64 for int8 (of about 84)
and 8-14 µs for fp32 (of about 250), on a 2-core CPU. The cell runs on exactly the shapes of a batch-1
step, so the states equal those of single steps. (The sampling nodes run on
forced iterations too, their result unused: a dozen small ops on [1, V].)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from server.engine.loop_graph import copied_nodes, finished_model, loop_body
from server.engine.model_contract import INPUT_HIDDEN, INPUT_TOKENS, OUTPUT_HIDDEN, OUTPUT_LOGITS
from server.engine.pooled_graph import check_wrappable

if TYPE_CHECKING:
    import onnx

PREFIX = "charstream_stretch."
INPUT_FORCED = PREFIX + "forced"
INPUT_STRETCH_LOGITS = PREFIX + "logits"
INPUT_STRETCH_START = PREFIX + "start"
INPUT_UNIFORMS = PREFIX + "uniforms"
INPUT_TEMPERATURE = PREFIX + "temperature"
OUTPUT_TOKENS = PREFIX + "tokens"
OUTPUT_INPUTS = PREFIX + "inputs"
OUTPUT_DRAWN = PREFIX + "drawn"
OUTPUT_FINAL_LOGITS = PREFIX + "final_logits"
OUTPUT_FINAL = PREFIX + "final"


def _choosing_nodes(name, helper, vocab_size: int, opset: int) -> tuple[list, list]:  # noqa: ANN001 - onnx helpers, lazily imported
    """Nodes giving token [1] int64 for iteration i: forced[i] while i < F, else drawn from logits_in [1, V]
    with uniforms[i - F] as choose_token's plain branch. The outer graph lays both out over all F + K
    iterations (forced_all: the forced tokens then -1s; uniforms_all: 0s then the uniforms), so that
    choosing costs each iteration two gathers and a Where."""
    node = helper.make_node

    def row_max(x: str, out: str):  # noqa: ANN202 - [1, V] -> [1, 1]; ReduceMax's axes became an input in opset 18
        if opset >= 18:
            return node("ReduceMax", [name(x), name("axis1")], [name(out)], name=name(out), keepdims=1)
        return node("ReduceMax", [name(x)], [name(out)], name=name(out), axes=[1], keepdims=1)

    return [
        node("Gather", [name("forced_all"), name("iteration")], [name("forced_scalar")], name=name("forced_at"),
             axis=0),  # [], -1 past the forced tokens
        node("Gather", [name("uniforms_all"), name("iteration")], [name("u")], name=name("u"), axis=0),  # []
        # The draw: softmax(logits / T), inverse CDF in token-id order; float32 (see the module docstring).
        node("Div", [name("logits_in"), name("temperature32")], [name("scaled")], name=name("scaled")),  # [1, V]
        row_max("scaled", "max"),  # [1, 1]
        node("Sub", [name("scaled"), name("max")], [name("shifted")], name=name("shifted")),
        node("Exp", [name("shifted")], [name("weights")], name=name("weights")),  # [1, V], max = 1
        node("CumSum", [name("weights"), name("axis1")], [name("cdf")], name=name("cdf")),  # [1, V]
        # The cdf never decreases, so its max is its last entry: the total, as choose_token's cdf[-1].
        row_max("cdf", "total"),  # [1, 1]
        node("Mul", [name("u"), name("total")], [name("target")], name=name("target")),  # [1, 1]
        node("LessOrEqual", [name("cdf"), name("target")], [name("below")], name=name("below")),  # [1, V]
        node("Cast", [name("below")], [name("below64")], name=name("below64"), to=7),
        node("ReduceSum", [name("below64"), name("axis1")], [name("count")], name=name("count"), keepdims=0),  # [1]
        node("Min", [name("count"), name("last")], [name("sampled")], name=name("sampled")),  # [1] int64
        node("Less", [name("forced_scalar"), name("zero")], [name("is_sampled")], name=name("is_sampled")),  # []
        node("Where", [name("is_sampled"), name("sampled"), name("forced_scalar")], [name("token")],
             name=name("token")),  # [1]
    ], [
        helper.make_tensor(name("axis1"), 7, [1], [1]),
        helper.make_tensor(name("zero"), 7, [], [0]),
        helper.make_tensor(name("last"), 7, [1], [vocab_size - 1]),
    ]


def build_stretch(cell: onnx.ModelProto, num_layers: int, hidden_size: int, vocab_size: int) -> onnx.ModelProto:
    """The Loop around `cell` (the charstream step model): F known and K sampled characters, one call."""
    from onnx import TensorProto, helper

    check_wrappable(cell, PREFIX)
    graph = cell.graph

    def name(suffix: str) -> str:
        return PREFIX + suffix

    hidden_in = name("hidden_in")
    renamed = {INPUT_TOKENS: name("token"), INPUT_HIDDEN: hidden_in}
    opset = next(o.version for o in cell.opset_import if o.domain in ("", "ai.onnx"))  # >= 13: check_wrappable
    body_nodes, constants = _choosing_nodes(name, helper, vocab_size, opset)
    body_nodes += copied_nodes(list(graph.node), renamed)
    body_nodes += [
        # Scan outputs: what this iteration started from, kept for the engine's check and undo.
        helper.make_node("Identity", [hidden_in], [name("input_state")], name=name("input_state")),
        helper.make_node("Identity", [name("logits_in")], [name("drawn")], name=name("drawn")),
    ]
    state_shape = [num_layers, 1, hidden_size]
    logits_shape = [1, vocab_size]
    body = loop_body(
        name,
        body_nodes,
        carried=[
            helper.make_tensor_value_info(hidden_in, TensorProto.FLOAT, state_shape),
            helper.make_tensor_value_info(name("logits_in"), TensorProto.FLOAT, logits_shape),
        ],
        outputs=[
            helper.make_tensor_value_info(OUTPUT_HIDDEN, TensorProto.FLOAT, state_shape),
            helper.make_tensor_value_info(OUTPUT_LOGITS, TensorProto.FLOAT, logits_shape),
            helper.make_tensor_value_info(name("token"), TensorProto.INT64, [1]),
            helper.make_tensor_value_info(name("input_state"), TensorProto.FLOAT, state_shape),
            helper.make_tensor_value_info(name("drawn"), TensorProto.FLOAT, logits_shape),
        ],
        initializer=constants,
    )
    outer = [
        helper.make_node("Shape", [INPUT_FORCED], [name("forced_count1")], name=name("forced_count1")),  # [1]
        helper.make_node("Shape", [INPUT_UNIFORMS], [name("sampled_count1")], name=name("sampled_count1")),  # [1]
        helper.make_node("Add", [name("forced_count1"), name("sampled_count1")], [name("length1")], name=name("length1")),
        helper.make_node("Squeeze", [name("length1")], [name("length")], name=name("length")),  # [] = F + K
        # forced_all = forced ++ [-1] * K and uniforms_all = [0] * F ++ uniforms: [F + K] each.
        helper.make_node("Expand", [name("minus_one"), name("sampled_count1")], [name("unforced")],
                         name=name("unforced")),  # [K]
        helper.make_node("Concat", [INPUT_FORCED, name("unforced")], [name("forced_all")], name=name("forced_all"),
                         axis=0),
        helper.make_node("Expand", [name("no_uniform"), name("forced_count1")], [name("unsampled")],
                         name=name("unsampled")),  # [F]
        helper.make_node("Concat", [name("unsampled"), INPUT_UNIFORMS], [name("uniforms_all64")],
                         name=name("uniforms_all64"), axis=0),
        helper.make_node("Cast", [name("uniforms_all64")], [name("uniforms_all")], name=name("uniforms_all"),
                         to=TensorProto.FLOAT),
        helper.make_node("Cast", [INPUT_TEMPERATURE], [name("temperature32")], name=name("temperature32"),
                         to=TensorProto.FLOAT),
        helper.make_node(
            "Loop",
            [name("length"), name("true"), INPUT_STRETCH_START, INPUT_STRETCH_LOGITS],
            [OUTPUT_FINAL, OUTPUT_FINAL_LOGITS, OUTPUT_TOKENS, OUTPUT_INPUTS, OUTPUT_DRAWN],
            name=name("loop"),
            body=body,
        ),
    ]
    wrapped = helper.make_graph(
        outer,
        graph.name + "_stretch",
        inputs=[
            helper.make_tensor_value_info(INPUT_FORCED, TensorProto.INT64, ["forced"]),
            helper.make_tensor_value_info(INPUT_STRETCH_LOGITS, TensorProto.FLOAT, logits_shape),
            helper.make_tensor_value_info(INPUT_STRETCH_START, TensorProto.FLOAT, state_shape),
            helper.make_tensor_value_info(INPUT_UNIFORMS, TensorProto.DOUBLE, ["stretch"]),
            helper.make_tensor_value_info(INPUT_TEMPERATURE, TensorProto.DOUBLE, [1]),
        ],
        outputs=[
            helper.make_tensor_value_info(OUTPUT_TOKENS, TensorProto.INT64, ["steps", 1]),
            helper.make_tensor_value_info(OUTPUT_INPUTS, TensorProto.FLOAT, ["steps", *state_shape]),
            helper.make_tensor_value_info(OUTPUT_DRAWN, TensorProto.FLOAT, ["steps", *logits_shape]),
            helper.make_tensor_value_info(OUTPUT_FINAL_LOGITS, TensorProto.FLOAT, logits_shape),
            helper.make_tensor_value_info(OUTPUT_FINAL, TensorProto.FLOAT, state_shape),
        ],
        initializer=list(graph.initializer) + [
            helper.make_tensor(name("true"), TensorProto.BOOL, [], [True]),
            helper.make_tensor(name("minus_one"), TensorProto.INT64, [1], [-1]),
            helper.make_tensor(name("no_uniform"), TensorProto.DOUBLE, [1], [0.0]),
        ],
    )
    return finished_model(wrapped, cell)
