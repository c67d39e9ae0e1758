"""Wrap the single-step cell in a Loop that consumes a run of known characters in one call.

A prompt's characters are known in advance, so they need no sampling between
steps: one Session.run can consume a chunk of them, instead of one engine
iteration (scheduling, a model call, bookkeeping) per character.

    inputs:  charstream_prefill.tokens int64 [T], charstream_prefill.start float32 [L, 1, H]
    outputs: charstream_prefill.final float32 [L, 1, H]: the state after all T characters

    h = start
    for t in range(T):                       # an ONNX Loop; its body is the cell's own nodes
        _, h = cell(tokens[t:t + 1], h)      # [1] int64, [L, 1, H] -> [1, V] unused, [L, 1, H]
    final = h

The body runs exactly the cell's nodes on exactly the shapes of a batch-1 step,
so the state equals that of T single steps (the tests compare them bit for
bit). The head (logits) is left out of the body: only the last character's
logits are needed, and the scheduler's ordinary step produces them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from server.engine.graphs.loop_graph import copied_nodes, finished_model, loop_body
from server.engine.graphs.pooled_graph import check_wrappable
from server.engine.model.model_contract import INPUT_HIDDEN, INPUT_TOKENS, OUTPUT_HIDDEN

if TYPE_CHECKING:
    import onnx

PREFIX = "charstream_prefill."
INPUT_CHUNK = PREFIX + "tokens"
INPUT_CHUNK_START = PREFIX + "start"
OUTPUT_CHUNK_FINAL = PREFIX + "final"


def _needed_nodes(nodes: list, wanted: set[str]) -> list:
    """The nodes that `wanted` values depend on, in their original (topological) order."""
    keep = [False] * len(nodes)
    wanted = set(wanted)
    for index in range(len(nodes) - 1, -1, -1):
        if any(out in wanted for out in nodes[index].output):
            keep[index] = True
            wanted.update(name for name in nodes[index].input if name)
    return [node for node, kept in zip(nodes, keep) if kept]


def build_prefill(cell: onnx.ModelProto, num_layers: int, hidden_size: int) -> onnx.ModelProto:
    """The Loop graph around `cell` (the charstream step model): T known characters, one call."""
    from onnx import TensorProto, helper

    check_wrappable(cell, PREFIX)
    graph = cell.graph

    def name(suffix: str) -> str:
        return PREFIX + suffix

    token, hidden_in = name("token"), name("hidden_in")
    renamed = {INPUT_TOKENS: token, INPUT_HIDDEN: hidden_in}
    body_nodes = [
        helper.make_node("Gather", [INPUT_CHUNK, name("iteration")], [name("token_scalar")], name=name("gather"), axis=0),
        helper.make_node("Unsqueeze", [name("token_scalar"), name("axis0")], [token], name=name("token")),  # [1]
    ]
    body_nodes += copied_nodes(_needed_nodes(list(graph.node), {OUTPUT_HIDDEN}), renamed)
    state_shape = [num_layers, 1, hidden_size]
    body = loop_body(name, body_nodes,
                     carried=[helper.make_tensor_value_info(hidden_in, TensorProto.FLOAT, state_shape)],
                     outputs=[helper.make_tensor_value_info(OUTPUT_HIDDEN, TensorProto.FLOAT, state_shape)],
                     initializer=[helper.make_tensor(name("axis0"), TensorProto.INT64, [1], [0])])
    used = {value for node in body_nodes for value in node.input}
    outer = [
        helper.make_node("Shape", [INPUT_CHUNK], [name("length1")], name=name("length1")),  # [1]
        helper.make_node("Squeeze", [name("length1")], [name("length")], name=name("length")),  # []
        helper.make_node("Loop", [name("length"), name("true"), INPUT_CHUNK_START], [OUTPUT_CHUNK_FINAL],
                         name=name("loop"), body=body),
    ]
    wrapped = helper.make_graph(
        outer,
        graph.name + "_prefill",
        inputs=[
            helper.make_tensor_value_info(INPUT_CHUNK, TensorProto.INT64, ["chunk"]),
            helper.make_tensor_value_info(INPUT_CHUNK_START, TensorProto.FLOAT, state_shape),
        ],
        outputs=[helper.make_tensor_value_info(OUTPUT_CHUNK_FINAL, TensorProto.FLOAT, state_shape)],
        initializer=[i for i in graph.initializer if i.name in used]  # the head's weights stay out
        + [helper.make_tensor(name("true"), TensorProto.BOOL, [], [True])],
    )
    return finished_model(wrapped, cell)
