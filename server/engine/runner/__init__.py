"""The model runner: the ONNX Runtime sessions of one model directory on one provider, a batched
step over pooled states, prefill and the stretch session (model_runner.py); the slot allocator and
the host and device state pools (state_pool.py)."""
