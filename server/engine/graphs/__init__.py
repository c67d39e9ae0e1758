"""The ONNX graphs the server builds around the exported single-step cell, from the cell's own
nodes: the device-resident state pool (pooled_graph.py), prefill's Loop (prefill_graph.py) and the
stretch Loops that sample in the graph (stretch_graph.py), with their shared pieces
(loop_graph.py). Each is bit for bit the cell's step."""
