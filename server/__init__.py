"""charstream server: serves a model directory over gRPC on ONNX Runtime (never imports torch)."""
