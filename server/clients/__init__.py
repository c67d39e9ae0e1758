"""Clients of the gRPC API: the synchronous and asyncio Python client libraries (client.py, aio_client.py,
their shared calls in calls.py and credentials in credentials.py) and charstream-generate (generate_cli.py).
They use only the .proto's generated stubs, never the server's internals. The measuring tools
(charstream-bench, charstream-loadtest) are in server/bench/."""
