"""The engine: everything between a generation request and the model. One thread (loop.py)
owns the ONNX Runtime session and all model state; the scheduler decides which sessions
step, samples every row in one vectorised pass and undoes what was generated ahead but
never delivered; the model runner runs one batched step over pooled states on the
provider the model directory and the machine call for. Nothing here knows gRPC."""
