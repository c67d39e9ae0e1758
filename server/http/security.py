"""What every HTTP request passes before its route: origin and host checks, and the headers
every reply carries.

- **Cross-origin requests are refused** (403 PERMISSION_DENIED) unless --http-cors lists
  the page's origin (or is `*`). A browser sends `Origin` with every cross-origin call and
  with same-origin POSTs; a request without one (curl, scripts) is not a browser page's and
  passes. Allowed origins get the CORS headers, preflights included: Authorization and
  Content-Type may be sent, no cookies are involved (keys travel in a header).
- **A server on a loopback address answers only for loopback host names** (localhost,
  127.0.0.1, [::1]): a web page cannot reach it by pointing a name of its own at 127.0.0.1
  (DNS rebinding), which would make its requests same-origin.
- **Replies** carry nosniff and no-referrer; the playground's page a Content-Security-Policy
  that lets it load and call nothing but this server.
"""

from __future__ import annotations

import ipaddress
from typing import Awaitable, Callable

import grpc
from aiohttp import web

from server.api.errors import failure_status
from server.http.errors import HttpServiceError, error_response, from_http_exception
from server.metrics import ServerMetrics

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ALLOWED_METHODS = "GET, POST, DELETE, OPTIONS"
ALLOWED_HEADERS = "Authorization, Content-Type, Accept"
PAGE_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
               "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'")


def is_loopback_name(host: str) -> bool:
    name = host.lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):  # RFC 6761: always this machine
        return True
    try:
        return ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(host_header: str) -> str:
    """The name in a Host header, without its port ("[::1]:8080" -> "[::1]")."""
    if host_header.startswith("["):
        return host_header.split("]", 1)[0] + "]"
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


def refused(message: str) -> web.Response:
    return error_response(HttpServiceError(grpc.StatusCode.PERMISSION_DENIED, message, 403))


class Guard:
    def __init__(self, origins: frozenset[str], loopback_only: bool, metrics: ServerMetrics):
        self.origins = origins
        self.any_origin = "*" in origins
        self.loopback_only = loopback_only
        self.metrics = metrics

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        host = request.host or ""
        if self.loopback_only and not is_loopback_name(host_name(host)):
            return refused(f"this server listens on a loopback address and answers only requests for "
                           f"localhost, 127.0.0.1 or [::1], not {host[:100]!r} (a guard against DNS "
                           "rebinding); to serve other names, listen on another --host")
        origin = request.headers.get("Origin")
        cross = origin is not None and origin.lower() != f"{request.scheme}://{host}".lower()
        if cross and not (self.any_origin or origin in self.origins):
            return refused(f"cross-origin request from {origin[:100]!r} refused: start the server with "
                           f"--http-cors {origin[:100]} to let that origin's pages call this API")
        if cross and request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            return web.Response(status=204)  # a preflight of an allowed origin: on_prepare adds the headers
        return await self._answer(request, handler)

    async def _answer(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """The route's answer; aiohttp's own refusals and any escaped failure in the API's error shape."""
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return error_response(from_http_exception(exc))
        except Exception as exc:  # noqa: BLE001 - never aiohttp's plain-text 500
            return error_response(failure_status("HTTP", exc, self.metrics))

    async def on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        """Headers of every reply, streamed ones included (aiohttp calls this before headers go out)."""
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        origin = request.headers.get("Origin")
        cross = origin is not None and origin.lower() != f"{request.scheme}://{request.host}".lower()
        if cross and (self.any_origin or origin in self.origins):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Allow-Methods"] = ALLOWED_METHODS
            response.headers["Access-Control-Allow-Headers"] = ALLOWED_HEADERS
            response.headers["Access-Control-Max-Age"] = "600"
            response.headers.add("Vary", "Origin")
