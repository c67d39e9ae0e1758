"""The HTTP front end: an aiohttp server on the gRPC server's event loop (--http-port).

It holds no engine, store or rules of its own: every API route calls the same
GeneratorService object that the gRPC server serves (calls.py), so validation,
limits, session ownership and error statuses are the gRPC port's, and both ports'
streams are batched together by the one engine.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web
from grpc_health.v1._async import HealthServicer

from server.api.auth import ApiKeys
from server.api.service import GeneratorService
from server.api.tls import CertificateWatcher
from server.config import ServerConfig, cors_origins
from server.http.calls import Calls
from server.http.openapi import openapi_document
from server.http.pages import add_pages
from server.http.routes import CALLS, add_routes
from server.http.security import Guard
from server.metrics import ServerMetrics

WILDCARD_HOSTS = ("", "0.0.0.0", "::")


def build_app(config: ServerConfig, calls: Calls, loopback: bool) -> web.Application:
    guard = Guard(cors_origins(config.http_cors), loopback, calls.metrics)
    # client_max_size: aiohttp refuses a larger body while reading it (calls.read_body says 413).
    app = web.Application(client_max_size=config.max_message_bytes, middlewares=[guard.middleware])
    app[CALLS] = calls
    app.on_response_prepare.append(guard.on_prepare)
    add_routes(app)
    add_pages(app, calls, openapi_document(_version(), keys=calls.api_keys is not None))
    return app


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("charstream")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "0"


@dataclass
class HttpFrontEnd:
    runner: web.AppRunner
    port: int
    url: str  # where the playground is

    async def stop(self) -> None:
        """Stop listening, close idle connections, give running requests up to --shutdown-grace."""
        await self.runner.cleanup()


async def start_http(config: ServerConfig, service: GeneratorService, health: HealthServicer,
                     metrics: ServerMetrics, api_keys: ApiKeys | None, loopback: bool,
                     watcher: CertificateWatcher | None, shared_port: bool = False) -> HttpFrontEnd:
    """Bind --http-port on --host (TLS with `watcher`'s files) and start serving; OSError if it cannot.
    `shared_port`: one of several front-ends on the port (SO_REUSEPORT, server/frontends/)."""
    assert config.http_port is not None
    calls = Calls(service, health, api_keys, metrics, config.max_message_bytes)
    # handler_cancellation: a client that disconnects cancels its request, as grpc.aio cancels a
    # call whose client went away; a stream then ends at once and keeps what was written.
    runner = web.AppRunner(build_app(config, calls, loopback), handler_cancellation=True, access_log=None,
                           shutdown_timeout=config.shutdown_grace)
    await runner.setup()
    ssl_context = None
    if watcher is not None:
        from server.http.tls import RenewingContext

        ssl_context = RenewingContext(watcher)
    site = web.TCPSite(runner, config.host, config.http_port, ssl_context=ssl_context, reuse_port=shared_port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise OSError(f"cannot listen for HTTP on {config.host} port {config.http_port}: {exc.strerror or exc}") from exc
    port = runner.addresses[0][1]
    host = "localhost" if config.host in WILDCARD_HOSTS else config.host
    host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    scheme = "https" if ssl_context is not None else "http"
    return HttpFrontEnd(runner, port, f"{scheme}://{host}:{port}/")
