"""Wrap the single-step cell in two Loops: one consumes known characters, the next samples and consumes more.

A lone stream spends more time per character in the engine's Python (sampling
one row, bookkeeping, a model call) than in the model step itself on a fast
CPU. One call of this graph consumes the F characters already queued (a prompt,
or a character NumPy sampled; none once a request runs, its next character
drawn here from `logits`) and then K more it samples itself:

    inputs:  charstream_stretch.forced int64 [F]          known characters, consumed first
             charstream_stretch.logits float32 [1, V]   the logits to draw from when F = 0
             charstream_stretch.start float32 [L, 1, H]   the state before the first character
             charstream_stretch.uniforms float64 [K]      the session's random numbers, one per sampled character
             charstream_stretch.temperature float64 [1]
    outputs: charstream_stretch.forced_inputs float32 [F, L, 1, H]  the state before each known character
             charstream_stretch.tokens int64 [K, 1]                 the sampled characters
             charstream_stretch.inputs float32 [K, L, 1, H]         the state before each (undo window)
             charstream_stretch.drawn float32 [K, 1, V]             the logits each was drawn from
             charstream_stretch.final_logits float32 [1, V], charstream_stretch.final float32 [L, 1, H]

    logits, h = logits0, start
    for i in range(F):                                    # ONNX Loop 1: the cell's nodes only
        logits, h = cell(forced[i], h)
    for i in range(K):                                    # ONNX Loop 2: a draw, then the cell
        cdf = cumsum(softmax(logits / T))                 # float32, [1, V]
        token = argmax(cdf > uniforms[i])                 # the first character whose cdf passes u
        logits, h = cell(token, h)

The draw is choose_token's plain branch (inverse CDF in token-id order) in
float32 and in the fewest ONNX operators: the graph's draw is a fast first
guess, never the decision. The engine re-samples every row of `drawn` with the
server's float64 NumPy sampler in one pass and keeps the stretch only up to
the first disagreement (stretch.py), which can only come where a random number
falls within float32 rounding of a boundary between two characters (none in
3,100 draws measured; a u past the float32 total would make argmax 0, a
disagreement too, never a wrong character). Each operator in a Loop body costs
its iteration about a microsecond whatever its size, so the draw is six of
them, and known characters go through a Loop without any: per character on a
2-core CPU, an int8 call of 32 costs 71 µs against 72 µs for a step call and 78 µs for
the previous single Loop that chose between forced and sampled characters in
every iteration with a dozen more operators (fp32: 210, 207 and 215 µs). The
cell runs on exactly the shapes of a batch-1 step, so the states equal those
of single steps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from server.engine.graphs.loop_graph import copied_nodes, finished_model, loop_body
from server.engine.graphs.pooled_graph import check_wrappable
from server.engine.model.model_contract import (
    INPUT_HIDDEN,
    INPUT_TOKENS,
    OUTPUT_HIDDEN,
    OUTPUT_LOGITS,
)

if TYPE_CHECKING:
    import onnx

PREFIX = "charstream_stretch."
INPUT_FORCED = PREFIX + "forced"
INPUT_STRETCH_LOGITS = PREFIX + "logits"
INPUT_STRETCH_START = PREFIX + "start"
INPUT_UNIFORMS = PREFIX + "uniforms"
INPUT_TEMPERATURE = PREFIX + "temperature"
OUTPUT_FORCED_INPUTS = PREFIX + "forced_inputs"
OUTPUT_TOKENS = PREFIX + "tokens"
OUTPUT_INPUTS = PREFIX + "inputs"
OUTPUT_DRAWN = PREFIX + "drawn"
OUTPUT_FINAL_LOGITS = PREFIX + "final_logits"
OUTPUT_FINAL = PREFIX + "final"


def name_of(suffix: str) -> str:
    """An outer-graph value's name (the bodies read these from the enclosing scope)."""
    return PREFIX + suffix


def _loop(cell: onnx.ModelProto, scope: str, sampling: bool, shapes: tuple[list, list]) -> onnx.GraphProto:
    """The body of one of the two Loops: (iteration, cond, state [L, B, H], logits [B, V]) -> (cond,
    state, logits, the state it started from[, the tokens [B], the logits they were drawn from])."""
    from onnx import TensorProto, helper

    def name(suffix: str) -> str:
        return PREFIX + scope + suffix

    state_shape, logits_shape = shapes
    node = helper.make_node
    token, hidden_in, logits_in = name("token"), name("hidden_in"), name("logits_in")
    nodes = [node("Identity", [hidden_in], [name("input_state")], name=name("input_state"))]  # scan output
    if sampling:
        nodes += [
            node("Identity", [logits_in], [name("drawn")], name=name("drawn")),  # scan output
            node("Gather", [name_of("uniforms3"), name("iteration")], [name("u")], name=name("u"), axis=0),  # [B, 1]
            # The draw (see the module docstring): the first token whose float32 cdf exceeds u.
            node("Div", [logits_in, name_of("temperature2")], [name("scaled")], name=name("scaled")),  # [B, V]
            node("Softmax", [name("scaled")], [name("p")], name=name("p"), axis=1),  # [B, V]
            node("CumSum", [name("p"), name_of("axis1")], [name("cdf")], name=name("cdf")),  # [B, V]
            node("Greater", [name("cdf"), name("u")], [name("above")], name=name("above")),  # [B, V] bool
            node("Cast", [name("above")], [name("above32")], name=name("above32"), to=TensorProto.FLOAT),
            node("ArgMax", [name("above32")], [token], name=token, axis=1, keepdims=0),  # [B] int64
        ]
    else:
        nodes.append(node("Gather", [INPUT_FORCED, name("iteration")], [token], name=token, axis=0))  # [B]
    renamed = {INPUT_TOKENS: token, INPUT_HIDDEN: hidden_in, OUTPUT_HIDDEN: name("hidden_out"),
               OUTPUT_LOGITS: name("logits_out")}
    nodes += copied_nodes(list(cell.graph.node), renamed, scope=PREFIX + scope)
    outputs = [
        helper.make_tensor_value_info(name("hidden_out"), TensorProto.FLOAT, state_shape),
        helper.make_tensor_value_info(name("logits_out"), TensorProto.FLOAT, logits_shape),
        helper.make_tensor_value_info(name("input_state"), TensorProto.FLOAT, state_shape),
    ]
    if sampling:
        outputs += [helper.make_tensor_value_info(token, TensorProto.INT64, ["batch"]),
                    helper.make_tensor_value_info(name("drawn"), TensorProto.FLOAT, logits_shape)]
    carried = [helper.make_tensor_value_info(hidden_in, TensorProto.FLOAT, state_shape),
               helper.make_tensor_value_info(logits_in, TensorProto.FLOAT, logits_shape)]
    return loop_body(name, nodes, carried=carried, outputs=outputs, initializer=[])


def build_stretch(cell: onnx.ModelProto, num_layers: int, hidden_size: int, vocab_size: int) -> onnx.ModelProto:
    """The two Loops around `cell` (the charstream step model): F known and K sampled characters for
    each of B sessions, one call."""
    from onnx import TensorProto, helper

    check_wrappable(cell, PREFIX)
    name = name_of
    shapes = ([num_layers, "batch", hidden_size], ["batch", vocab_size])
    state_shape, logits_shape = shapes
    node = helper.make_node
    outer = [
        node("Shape", [INPUT_FORCED], [name("forced_shape")], name=name("forced_shape")),  # [2]
        node("Gather", [name("forced_shape"), name("zero")], [name("forced_count")], name=name("forced_count"),
             axis=0),  # [] = F
        node("Shape", [INPUT_UNIFORMS], [name("sampled_shape")], name=name("sampled_shape")),  # [2]
        node("Gather", [name("sampled_shape"), name("zero")], [name("sampled_count")], name=name("sampled_count"),
             axis=0),  # [] = K
        node("Cast", [INPUT_UNIFORMS], [name("uniforms32")], name=name("uniforms32"), to=TensorProto.FLOAT),
        node("Unsqueeze", [name("uniforms32"), name("axis2")], [name("uniforms3")], name=name("uniforms3")),  # [K, B, 1]
        node("Cast", [INPUT_TEMPERATURE], [name("temperature32")], name=name("temperature32"), to=TensorProto.FLOAT),
        node("Unsqueeze", [name("temperature32"), name("axis1")], [name("temperature2")],
             name=name("temperature2")),  # [B, 1]
        node("Loop", [name("forced_count"), name("true"), INPUT_STRETCH_START, INPUT_STRETCH_LOGITS],
             [name("after_forced"), name("after_forced_logits"), OUTPUT_FORCED_INPUTS], name=name("forced_loop"),
             body=_loop(cell, "forced.", False, shapes)),
        node("Loop", [name("sampled_count"), name("true"), name("after_forced"), name("after_forced_logits")],
             [OUTPUT_FINAL, OUTPUT_FINAL_LOGITS, OUTPUT_INPUTS, OUTPUT_TOKENS, OUTPUT_DRAWN], name=name("sampled_loop"),
             body=_loop(cell, "sampled.", True, shapes)),
    ]
    wrapped = helper.make_graph(
        outer,
        cell.graph.name + "_stretch",
        inputs=[
            helper.make_tensor_value_info(INPUT_FORCED, TensorProto.INT64, ["forced", "batch"]),
            helper.make_tensor_value_info(INPUT_STRETCH_LOGITS, TensorProto.FLOAT, logits_shape),
            helper.make_tensor_value_info(INPUT_STRETCH_START, TensorProto.FLOAT, state_shape),
            helper.make_tensor_value_info(INPUT_UNIFORMS, TensorProto.DOUBLE, ["sampled", "batch"]),
            helper.make_tensor_value_info(INPUT_TEMPERATURE, TensorProto.DOUBLE, ["batch"]),
        ],
        outputs=[
            helper.make_tensor_value_info(OUTPUT_FORCED_INPUTS, TensorProto.FLOAT, ["forced", *state_shape]),
            helper.make_tensor_value_info(OUTPUT_TOKENS, TensorProto.INT64, ["sampled", "batch"]),
            helper.make_tensor_value_info(OUTPUT_INPUTS, TensorProto.FLOAT, ["sampled", *state_shape]),
            helper.make_tensor_value_info(OUTPUT_DRAWN, TensorProto.FLOAT, ["sampled", *logits_shape]),
            helper.make_tensor_value_info(OUTPUT_FINAL_LOGITS, TensorProto.FLOAT, logits_shape),
            helper.make_tensor_value_info(OUTPUT_FINAL, TensorProto.FLOAT, state_shape),
        ],
        initializer=list(cell.graph.initializer) + [
            helper.make_tensor(name("true"), TensorProto.BOOL, [], [True]),
            helper.make_tensor(name("zero"), TensorProto.INT64, [], [0]),
            helper.make_tensor(name("axis1"), TensorProto.INT64, [1], [1]),
            helper.make_tensor(name("axis2"), TensorProto.INT64, [1], [2]),
        ],
    )
    return finished_model(wrapped, cell)
