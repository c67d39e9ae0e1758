"""The stretch graph over a device state pool, and a graph that writes states into the pool.

With states on a device, the steady lane's stretch call (lane_stretch.py)
must neither read the rows' states out of the pool nor write them back from
the host: both would cross the bus twice a call. This graph wraps the
stretch graph (stretch_graph.py) so that it gathers its rows' start states
from the pool by slot and scatters each row's state after the call back
into it:

    inputs:  the stretch graph's, less its start state, and
             charstream_pstretch.slots int64 [R], charstream_pstretch.keep_at int64 [R, 2],
             charstream_pstretch.pool float32 [S, L, H]
    outputs: the stretch graph's, less its final state, and
             charstream_pstretch.pool_out float32 [S, L, H]

    start    = transpose(pool[slots])                        [L, R, H]
    ... the stretch graph's two Loops ...                    inputs [K, L, R, H], final [L, R, H]
    after    = transpose(concat(inputs, [final]), 0 2 1 3)   [K + 1, R, L, H]: the state after k drawn
    pool_out = pool with pool_out[slots] = after[keep_at]    [S, L, H]   (keep_at[r] = (k_r, r))

A row's k_r is the number of drawn characters it may keep (its limit, known
before the call). The server's NumPy check of the draws may keep fewer (a
disagreement: a random number within float32 rounding of a boundary, never
seen in thousands of draws); the caller then writes that row's state again
with the pool-write graph:

    inputs:  charstream_pwrite.pool float32 [S, L, H], charstream_pwrite.slots int64 [B],
             charstream_pwrite.states float32 [L, B, H]
    outputs: charstream_pwrite.pool_out float32 [S, L, H] = pool with pool_out[slots] = transpose(states)

The cell runs on the shapes it runs on in the stretch graph, so the states
and draws are those of the host path bit for bit on the same provider.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from server.engine.graphs.stretch_graph import (
    INPUT_STRETCH_START,
    OUTPUT_FINAL,
    OUTPUT_INPUTS,
)

if TYPE_CHECKING:
    import onnx

PREFIX = "charstream_pstretch."
INPUT_SLOTS = PREFIX + "slots"
INPUT_KEEP_AT = PREFIX + "keep_at"
INPUT_POOL = PREFIX + "pool"
OUTPUT_POOL = PREFIX + "pool_out"

WRITE_PREFIX = "charstream_pwrite."
WRITE_POOL = WRITE_PREFIX + "pool"
WRITE_SLOTS = WRITE_PREFIX + "slots"
WRITE_STATES = WRITE_PREFIX + "states"
WRITE_POOL_OUT = WRITE_PREFIX + "pool_out"


def build_pooled_stretch(stretch: onnx.ModelProto, num_slots: int, num_layers: int,
                         hidden_size: int) -> onnx.ModelProto:
    """The stretch graph `stretch` (build_stretch's model) reading and writing a pool of `num_slots`."""
    import onnx
    from onnx import TensorProto, helper

    graph = stretch.graph
    taken = {n.name for n in graph.node} | {o for n in graph.node for o in n.output}
    if any(name.startswith(PREFIX) for name in taken):
        raise ValueError(f"the stretch graph already uses names starting with {PREFIX!r}")

    def name(suffix: str) -> str:
        return PREFIX + suffix

    node = helper.make_node
    before = [
        node("Gather", [INPUT_POOL, INPUT_SLOTS], [name("rows")], name=name("rows"), axis=0),  # [R, L, H]
        node("Transpose", [name("rows")], [INPUT_STRETCH_START], name=name("start"), perm=[1, 0, 2]),  # [L, R, H]
    ]
    after = [
        node("Unsqueeze", [OUTPUT_FINAL, name("axis0")], [name("final4")], name=name("final4")),  # [1, L, R, H]
        node("Concat", [OUTPUT_INPUTS, name("final4")], [name("every")], name=name("every"), axis=0),  # [K+1, L, R, H]
        node("Transpose", [name("every")], [name("by_row")], name=name("by_row"), perm=[0, 2, 1, 3]),  # [K+1, R, L, H]
        node("GatherND", [name("by_row"), INPUT_KEEP_AT], [name("kept")], name=name("kept")),  # [R, L, H]
        node("Unsqueeze", [INPUT_SLOTS, name("axis1")], [name("indices")], name=name("indices")),  # [R, 1]
        node("ScatterND", [INPUT_POOL, name("indices"), name("kept")], [OUTPUT_POOL], name=name("scatter")),
    ]
    pool_shape = [num_slots, num_layers, hidden_size]
    wrapped = helper.make_graph(
        before + list(graph.node) + after,
        graph.name + "_pooled",
        inputs=[i for i in graph.input if i.name != INPUT_STRETCH_START] + [
            helper.make_tensor_value_info(INPUT_SLOTS, TensorProto.INT64, ["batch"]),
            helper.make_tensor_value_info(INPUT_KEEP_AT, TensorProto.INT64, ["batch", 2]),
            helper.make_tensor_value_info(INPUT_POOL, TensorProto.FLOAT, pool_shape),
        ],
        outputs=[o for o in graph.output if o.name != OUTPUT_FINAL] + [
            helper.make_tensor_value_info(OUTPUT_POOL, TensorProto.FLOAT, pool_shape),
        ],
        initializer=list(graph.initializer) + [
            helper.make_tensor(name("axis0"), TensorProto.INT64, [1], [0]),
            helper.make_tensor(name("axis1"), TensorProto.INT64, [1], [1]),
        ],
    )
    model = helper.make_model(wrapped, opset_imports=stretch.opset_import, producer_name="charstream-server")
    model.ir_version = stretch.ir_version
    model.functions.extend(stretch.functions)
    onnx.checker.check_model(model)
    return model


def build_pool_write(num_slots: int, num_layers: int, hidden_size: int, cell: onnx.ModelProto) -> onnx.ModelProto:
    """The pool-write graph for a pool of `num_slots`, with the opsets and IR version of `cell`."""
    import onnx
    from onnx import TensorProto, helper

    def name(suffix: str) -> str:
        return WRITE_PREFIX + suffix

    node = helper.make_node
    pool_shape = [num_slots, num_layers, hidden_size]
    graph = helper.make_graph(
        [
            node("Transpose", [WRITE_STATES], [name("updates")], name=name("updates"), perm=[1, 0, 2]),  # [B, L, H]
            node("Unsqueeze", [WRITE_SLOTS, name("axis1")], [name("indices")], name=name("indices")),  # [B, 1]
            node("ScatterND", [WRITE_POOL, name("indices"), name("updates")], [WRITE_POOL_OUT], name=name("scatter")),
        ],
        "charstream_pool_write",
        inputs=[
            helper.make_tensor_value_info(WRITE_POOL, TensorProto.FLOAT, pool_shape),
            helper.make_tensor_value_info(WRITE_SLOTS, TensorProto.INT64, ["batch"]),
            helper.make_tensor_value_info(WRITE_STATES, TensorProto.FLOAT, [num_layers, "batch", hidden_size]),
        ],
        outputs=[helper.make_tensor_value_info(WRITE_POOL_OUT, TensorProto.FLOAT, pool_shape)],
        initializer=[helper.make_tensor(name("axis1"), TensorProto.INT64, [1], [1])],
    )
    opsets = [o for o in cell.opset_import if o.domain in ("", "ai.onnx")]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="charstream-server")
    model.ir_version = cell.ir_version
    onnx.checker.check_model(model)
    return model
