"""Measuring tools of the server, apart from its client library (server/clients/):

- charstream-bench (bench.py, `python -m server.bench.bench`): the server against the raw model it serves,
  row by row; its parts: args.py (command line, the rows a run makes), context.py (the run as the row
  modules see it), turns.py (rows measured in turns with their raw loop), raw.py (raw ONNX Runtime and
  PyTorch loops), clients.py (streaming clients), spread.py (clients over several processes), process.py
  (server and redis-server processes, the machine), sessions.py (rows 9-11), ceiling.py (row 12),
  results.py (result rows, the table, the JSON file).
- charstream-loadtest (loadtest.py, loadtest_workers.py): a bounded load test that checks every character.
- `python -m server.bench.engine_cost`: the engine's own cost per iteration, with a model call that costs
  nothing and no client.

Only this package may import torch, training/ and export/ (the PyTorch row, the ceiling model), and only
inside the functions that need them: the server never loads torch (tests/test_import_layers.py).
"""
