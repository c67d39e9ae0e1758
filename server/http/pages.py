"""The routes outside the API proper: the playground's files, /openapi.json, /healthz, /readyz.

None of them needs an API key (the page asks for one and sends it with its API calls;
health checks come from load balancers, as the gRPC health service takes no key either).
"""

from __future__ import annotations

from importlib import resources
from typing import Awaitable, Callable

from aiohttp import web

from server.http.calls import Calls
from server.http.codec import dumps
from server.http.security import PAGE_POLICY

STATIC_TYPES = {".html": "text/html", ".css": "text/css", ".js": "text/javascript", ".png": "image/png",
                ".svg": "image/svg+xml"}
GENERATOR_SERVICE = "charstream.v1.Generator"


def static_files() -> dict[str, tuple[bytes, str]]:
    """The playground's files (package data, read once): name -> (bytes, media type)."""
    folder = resources.files("server.http").joinpath("static")
    files = {}
    for entry in folder.iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1] if "." in entry.name else ""
        if entry.is_file() and suffix in STATIC_TYPES:
            files[entry.name] = (entry.read_bytes(), STATIC_TYPES[suffix])
    if "index.html" not in files:
        raise OSError("the playground's files are missing from the installed package (server/http/static)")
    return files


def add_pages(app: web.Application, calls: Calls, openapi: dict) -> None:
    files = static_files()
    openapi_body = dumps(openapi)

    def file_reply(name: str) -> web.Response:
        data, media_type = files[name]
        response = web.Response(body=data, content_type=media_type,
                                headers={"Cache-Control": "no-cache"})  # revalidate: a new server, new files
        if media_type == "text/html":
            response.headers["Content-Security-Policy"] = PAGE_POLICY
            response.headers["X-Frame-Options"] = "DENY"
        if media_type.startswith("text/"):
            response.charset = "utf-8"
        return response

    async def index(request: web.Request) -> web.StreamResponse:
        return file_reply("index.html")

    async def static(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in files:  # only the shipped files: nothing else on disk is reachable
            raise web.HTTPNotFound()
        return file_reply(name)

    async def openapi_document(request: web.Request) -> web.StreamResponse:
        return web.Response(body=openapi_body, content_type="application/json")

    def health(service: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def check(request: web.Request) -> web.StreamResponse:
            status = await calls.health_status(service)
            return web.Response(status=200 if status == "SERVING" else 503, body=dumps({"status": status}),
                                content_type="application/json", headers={"Cache-Control": "no-store"})
        return check

    app.router.add_get("/", index)
    app.router.add_get("/static/{name}", static)
    app.router.add_get("/openapi.json", openapi_document)
    app.router.add_get("/healthz", health(""))  # the server as a whole: up until it shuts down
    app.router.add_get("/readyz", health(GENERATOR_SERVICE))  # takes calls: engine up, store reachable
