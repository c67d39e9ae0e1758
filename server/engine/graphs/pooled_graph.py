"""Wrap the single-step cell in a graph that reads and writes the state pool itself.

Used when states live on the GPU: ONNX Runtime has no Python API to gather or
scatter rows of a device buffer, so the gather and scatter become graph ops
and only token ids, slot ids and logits cross to the host.

    inputs:  token_ids int64 [B], slots int64 [B], keep bool [B], start float32 [L, B, H],
             pool float32 [S, L, H]
    outputs: logits float32 [B, V], pool_out float32 [S, L, H], hidden float32 [L, B, H]

    hidden   = where(keep, transpose(pool[slots]), start)   [L, B, H]  (keep False: start there,
                                                                         zeros for a fresh session)
    logits, hidden_out = cell(token_ids, hidden)
    pool_out = pool with pool_out[slots] = transpose(hidden_out)

`hidden`, the state each row started from, is an output too: the scheduler
keeps it to undo characters generated ahead of delivery.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from server.engine.model.model_contract import (
    INPUT_HIDDEN,
    INPUT_NAMES,
    OUTPUT_HIDDEN,
    OUTPUT_LOGITS,
)
from server.engine.model.model_dir import ModelDirError

INPUT_SLOTS = "slots"
INPUT_KEEP = "keep"
INPUT_START = "start"
INPUT_POOL = "pool"
OUTPUT_POOL = "pool_out"
# The state each row started from is produced under the cell's own input
# name, so the cell's nodes read it unchanged; it is also a graph output.
OUTPUT_START_STATE = INPUT_HIDDEN

# Every node and value the wrapper adds is named with this prefix.
PREFIX = "charstream_pool."

if TYPE_CHECKING:
    import onnx


def check_wrappable(cell: onnx.ModelProto, prefix: str = PREFIX) -> None:
    """Refuse a model a wrapper cannot extend: another interface, an old opset, names clashing with
    the wrapper's `prefix`."""
    graph = cell.graph
    if tuple(i.name for i in graph.input) != INPUT_NAMES:
        raise ModelDirError(f"the model's inputs are not {INPUT_NAMES}: cannot wrap it")
    opset = next((o.version for o in cell.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        raise ModelDirError(f"the model uses ONNX opset {opset}; wrapping it needs opset 13 or newer")
    taken = {n.name for n in graph.node} | {o for n in graph.node for o in n.output}
    if any(name.startswith(prefix) for name in taken):
        raise ModelDirError(f"the model already uses names starting with {prefix!r}")


def build_pooled_step(cell: onnx.ModelProto, num_slots: int, num_layers: int, hidden_size: int) -> onnx.ModelProto:
    """The pooled step graph around `cell` (the charstream step model), for `num_slots` slots."""
    # Imported here so that the runner can read the names above without
    # loading onnx: only the device path builds this graph.
    import onnx
    from onnx import TensorProto, helper

    graph = cell.graph
    check_wrappable(cell)

    def name(suffix: str) -> str:
        return PREFIX + suffix

    before = [
        helper.make_node("Gather", [INPUT_POOL, INPUT_SLOTS], [name("rows")], name=name("rows"), axis=0),  # [B, L, H]
        helper.make_node("Transpose", [name("rows")], [name("pooled")], name=name("pooled"), perm=[1, 0, 2]),  # [L, B, H]
        helper.make_node("Unsqueeze", [INPUT_KEEP, name("keep_axes")], [name("keep3")], name=name("keep3")),  # [1, B, 1]
        # Where, not a multiply: a stale row holding inf or NaN must still give the start state.
        helper.make_node(
            "Where", [name("keep3"), name("pooled"), INPUT_START], [OUTPUT_START_STATE], name=name("hidden")
        ),
    ]
    after = [
        helper.make_node("Transpose", [OUTPUT_HIDDEN], [name("updates")], name=name("updates"), perm=[1, 0, 2]),  # [B, L, H]
        helper.make_node("Unsqueeze", [INPUT_SLOTS, name("slot_axes")], [name("indices")], name=name("indices")),  # [B, 1]
        helper.make_node("ScatterND", [INPUT_POOL, name("indices"), name("updates")], [OUTPUT_POOL], name=name("scatter")),
    ]
    constants = [
        helper.make_tensor(name("keep_axes"), TensorProto.INT64, [2], [0, 2]),
        helper.make_tensor(name("slot_axes"), TensorProto.INT64, [1], [1]),
    ]
    pool_shape = [num_slots, num_layers, hidden_size]
    logits = next(o for o in graph.output if o.name == OUTPUT_LOGITS)
    wrapped = helper.make_graph(
        before + list(graph.node) + after,
        graph.name + "_pooled",
        inputs=[
            graph.input[0],
            helper.make_tensor_value_info(INPUT_SLOTS, TensorProto.INT64, ["batch"]),
            helper.make_tensor_value_info(INPUT_KEEP, TensorProto.BOOL, ["batch"]),
            helper.make_tensor_value_info(INPUT_START, TensorProto.FLOAT, [num_layers, "batch", hidden_size]),
            helper.make_tensor_value_info(INPUT_POOL, TensorProto.FLOAT, pool_shape),
        ],
        outputs=[
            logits,
            helper.make_tensor_value_info(OUTPUT_POOL, TensorProto.FLOAT, pool_shape),
            helper.make_tensor_value_info(OUTPUT_START_STATE, TensorProto.FLOAT, [num_layers, "batch", hidden_size]),
        ],
        initializer=list(graph.initializer) + constants,
    )
    model = helper.make_model(wrapped, opset_imports=cell.opset_import, producer_name="charstream-server")
    model.ir_version = cell.ir_version
    model.functions.extend(cell.functions)
    for prop in cell.metadata_props:
        model.metadata_props.add(key=prop.key, value=prop.value)
    onnx.checker.check_model(model)
    return model
