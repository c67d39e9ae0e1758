"""A server running on a thread of its own, with its own event loop.

For tests, benchmarks and embedding: synchronous code starts a real server
on a real port and talks to it over the network like any client.

    with BackgroundServer(ServerConfig(model="models/tiny", port=0)) as server:
        channel = grpc.insecure_channel(server.address)
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Callable, Coroutine, TypeVar

from server.app import RunningServer, start_server
from server.config import ServerConfig
from server.engine.runner.model_runner import ModelRunner

T = TypeVar("T")


class BackgroundServer:
    def __init__(self, config: ServerConfig, runner: ModelRunner | None = None, stop_grace: float = 1.0):
        self.config = config
        self._runner = runner
        self.stop_grace = stop_grace
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name="charstream-background-server", daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.running: RunningServer | None = None

    @property
    def address(self) -> str:
        assert self.running is not None, "server not started"
        return self.running.address

    @property
    def port(self) -> int:
        assert self.running is not None, "server not started"
        return self.running.port

    def start(self) -> "BackgroundServer":
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self

    def run(self, make_coroutine: Callable[[], Coroutine[Any, Any, T]], timeout: float = 30.0) -> T:
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(make_coroutine(), self._loop).result(timeout)

    def stop(self, grace: float | None = None) -> None:
        if self.running is None or not self._thread.is_alive():
            return
        running = self.running
        self.run(lambda: running.stop(self.stop_grace if grace is None else grace), timeout=60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self.running = self._loop.run_until_complete(start_server(self.config, self._runner))
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
            self._error = exc
            self._ready.set()
            self._loop.close()
            return
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()
