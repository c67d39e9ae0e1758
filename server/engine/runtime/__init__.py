"""The engine as it runs: in a process of its own (process.py on the server's side,
process_child.py in the child, process_pipe.py the socket between them) or on a thread
(loop.py, which also holds the iteration both share), the callers' streams and their loop hubs
(stream.py), and the interface the API layer uses (interface.py)."""
