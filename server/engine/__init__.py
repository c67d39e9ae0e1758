"""The engine: everything between a generation request and the model. Nothing here knows gRPC.

Its layers, each importing only those before it:

- model/: what a model directory is (the contract shared with export, choosing the file and
  variant to serve, the execution-provider policy, the vocabulary);
- graphs/: the ONNX graphs built around the exported cell (the device state pool, prefill and
  stretch Loops);
- runner/: the model runner (one batched step, prefill, the stretch session) and the state pools;
- scheduling/: which sessions step and how (ordinary steps, prefill, stretches, the steady lane),
  per-session state, undo and snapshots;
- runtime/: the engine as it runs, in a process of its own or on a thread, its pipe, and the
  callers' streams.

The modules at this level are what every layer shares: generation.py (requests, statuses,
events), sampling.py (the sampler and what a seed means), observer.py (what the engine reports)
and prefix_cache.py (prompt states kept by their text).
"""
