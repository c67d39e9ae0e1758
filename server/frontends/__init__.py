"""Several gRPC front-end processes over one engine process (--frontends N).

- supervisor.py: starts the engine and the front-ends, reserves the shared
  port, replaces a front-end that dies, drains them all on SIGTERM.
- frontend.py: one front-end process (a whole server whose engine link and
  sessions are the engine process's).
- session_host.py: the session store inside the engine process.
- remote_sessions.py: a front-end's session backend, asking the host.
- metrics_merge.py: one /metrics for the whole server.
"""
