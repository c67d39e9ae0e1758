"""What the two Loop graphs around the cell share (prefill_graph.py, stretch_graph.py).

Both wrap the cell's own nodes in an ONNX Loop body at batch 1: the body
takes (iteration, condition, the state, ...) and gives (condition, the next
state, ...), and its nodes are copies of the cell's with the cell's inputs
renamed to the body's values. Helpers here build those pieces and finish the
model the way the cell was built (opsets, IR version, functions), checked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import onnx


def copied_nodes(nodes: list, renamed: dict[str, str], scope: str = "") -> list:
    """Copies of the cell's `nodes`, reading and writing renamed[value] wherever they read or write a
    renamed value; with a `scope`, every other value they write is scope + its name (two bodies of
    one model then share no value names)."""
    import onnx

    produced = {value for node in nodes for value in node.output}
    names = {value: scope + value for value in produced} if scope else {}
    names.update(renamed)
    copies = []
    for node in nodes:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.input[:] = [names.get(value, value) for value in node.input]
        copy.output[:] = [names.get(value, value) for value in node.output]
        if scope and copy.name:
            copy.name = scope + copy.name
        copies.append(copy)
    return copies


def loop_body(name: Callable[[str], str], nodes: list, carried: list, outputs: list,
              initializer: list) -> onnx.GraphProto:
    """A Loop body: (iteration int64 [], cond_in bool [], *carried) -> (cond_out, *outputs); the
    condition passes through unchanged (the trip count alone ends the loop)."""
    from onnx import TensorProto, helper

    nodes = nodes + [helper.make_node("Identity", [name("cond_in")], [name("cond_out")], name=name("cond"))]
    return helper.make_graph(
        nodes,
        name("body"),
        inputs=[helper.make_tensor_value_info(name("iteration"), TensorProto.INT64, []),
                helper.make_tensor_value_info(name("cond_in"), TensorProto.BOOL, []), *carried],
        outputs=[helper.make_tensor_value_info(name("cond_out"), TensorProto.BOOL, []), *outputs],
        initializer=initializer,
    )


def finished_model(graph: onnx.GraphProto, cell: onnx.ModelProto) -> onnx.ModelProto:
    """`graph` as a model with the cell's opsets, IR version and functions, checked."""
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=cell.opset_import, producer_name="charstream-server")
    model.ir_version = cell.ir_version
    model.functions.extend(cell.functions)
    onnx.checker.check_model(model)
    return model
