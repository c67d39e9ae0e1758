"""The gRPC API: the charstream.v1.Generator servicer (streaming in service.py, session
RPCs in session_rpcs.py), request validation, errors as statuses (one interceptor, which
also authenticates), API keys and TLS. It converts messages, validates, authenticates and
streams; generation goes through the engine and sessions through a session backend."""
