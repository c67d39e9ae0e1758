"""Clients of the gRPC API: the synchronous and asyncio Python client libraries,
charstream-generate, and the measuring tools charstream-bench and charstream-loadtest.
They use only the .proto's generated stubs, never the server's internals."""
