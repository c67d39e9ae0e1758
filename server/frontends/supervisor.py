"""--frontends N: one engine process, N gRPC front-end processes on one port, and this process
watching them.

Why: one event loop writes every message of a server, and on a fast model
(a GPU) that loop is the limit long before the engine is. N front-ends
spread the writing over N cores. They share the port through SO_REUSEPORT
(the kernel spreads connections over them), the engine process through a
Unix socket each (child_links.py), and the sessions, which live in the
engine process (session_host.py), so any front-end serves any session.

This process reserves the ports (a bound socket with SO_REUSEPORT that never
listens, so that port 0 means one free port for all and no stranger can take
it between starts), starts the engine with the session host, spawns the
front-ends and waits for each to say it is ready, then prints the address as a
single server does. It serves the merged /metrics (metrics_merge.py). A
front-end that dies (killed, crashed) ends only its own streams; its sessions
keep what was delivered, and a new front-end takes its place. SIGTERM or SIGINT
drains every front-end (each gets SIGTERM and --shutdown-grace), then stops the
engine; the exit status is 0 when every front-end exited 0.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
from dataclasses import replace
from multiprocessing.connection import Connection
from typing import Any

from server.app import host_port
from server.config import ServerConfig
from server.engine.runtime.process import EngineProcess
from server.frontends.frontend import frontend_main
from server.frontends.metrics_merge import MergedMetrics
from server.frontends.session_host import HostSettings, session_host
from server.structured_log import log_event

logger = logging.getLogger("charstream.server")

READY_TIMEOUT = 60.0  # seconds a front-end may take to connect and bind
RESTART_PAUSE = 1.0  # seconds between a front-end's death and its replacement (no crash loop at full speed)


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) with SO_REUSEPORT that never listens: the front-ends bind the
    same port beside it; OSError when the port is taken by anything else.

    The port is first bound without SO_REUSEPORT, which fails while any socket holds it (another
    server's front-ends, with SO_REUSEPORT, would otherwise let this one join their group)."""
    address = host.strip("[]") if host != "localhost" else "127.0.0.1"
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_STREAM)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.bind((address, port))
        port = probe.getsockname()[1]
        probe.close()  # (a stranger binding in this instant is refused by the reservation below)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((address, port))
    except OSError as exc:
        probe.close()
        sock.close()
        raise OSError(f"cannot listen on {host_port(host, port)}: {exc.strerror or exc}") from exc
    return sock


class FrontendStartError(RuntimeError):
    """A front-end process did not become ready (its reason, as it said or as far as known)."""


class FrontEnd:
    """One spawned front-end process and what it said when ready."""

    def __init__(self, process: multiprocessing.process.BaseProcess, conn: Connection):
        self.process = process
        self.conn = conn
        self.metrics_port: int | None = None


class Supervisor:
    def __init__(self, config: ServerConfig):
        self.config = config
        self._context = multiprocessing.get_context("spawn")  # never fork a process that runs gRPC threads
        self._folder = tempfile.mkdtemp(prefix="charstream-")  # mode 0700: only this user reaches the engine
        self.engine_path = os.path.join(self._folder, "engine.sock")
        self._reserved: list[socket.socket] = []
        self.frontends: list[FrontEnd] = []
        self.engine: EngineProcess | None = None
        self.metrics: MergedMetrics | None = None
        self.port = 0
        self.http_port: int | None = None
        self._stopping = False

    async def start(self) -> None:
        config = self.config
        grpc_socket = reserve_port(config.host, config.port)
        self._reserved.append(grpc_socket)
        self.port = grpc_socket.getsockname()[1]
        if config.http_port is not None:
            http_socket = reserve_port(config.host, config.http_port)
            self._reserved.append(http_socket)
            self.http_port = http_socket.getsockname()[1]
        settings = HostSettings(config.max_sessions, config.session_ttl,
                                config.sessions_per_key if config.api_keys else None,
                                config.streams_per_key if config.api_keys else None)
        params = replace(config.engine_params(), listen_path=self.engine_path)
        loop = asyncio.get_running_loop()
        self.engine = await loop.run_in_executor(
            None, functools.partial(EngineProcess, params, make_extension=functools.partial(session_host, settings)))
        self.engine.start()
        self.frontends = [self._spawn(index) for index in range(config.frontends)]
        for index, frontend in enumerate(self.frontends):
            await self._wait_ready(index, frontend)
        if config.metrics_port is not None:
            self.metrics = MergedMetrics(self._metrics_ports).serve(config.metrics_host or config.host,
                                                                    config.metrics_port)
        log_event(logger, "listening", address=host_port(config.host, self.port), frontends=config.frontends,
                  engine_pid=self.engine.pid,
                  metrics=host_port(config.metrics_host or config.host, self.metrics.port) if self.metrics else "off",
                  http=self.http_port if self.http_port is not None else "off")

    def _frontend_config(self) -> ServerConfig:
        return replace(self.config, port=self.port, http_port=self.http_port, metrics_port=None, frontends=1)

    def _spawn(self, index: int) -> FrontEnd:
        ours, theirs = self._context.Pipe(duplex=False)
        process = self._context.Process(target=frontend_main, args=(self._frontend_config(), self.engine_path, theirs),
                                        name=f"charstream-frontend-{index}", daemon=False)
        process.start()
        theirs.close()
        return FrontEnd(process, ours)

    async def _wait_ready(self, index: int, frontend: FrontEnd) -> None:
        loop = asyncio.get_running_loop()
        ready = await loop.run_in_executor(None, frontend.conn.poll, READY_TIMEOUT)
        try:
            reply: Any = frontend.conn.recv() if ready else ("failed", f"not ready within {READY_TIMEOUT:.0f} s")
        except EOFError:
            reply = ("failed", f"it exited with status {frontend.process.exitcode}")
        if reply[0] != "ready":
            raise FrontendStartError(f"a front-end failed to start: {reply[1]}")
        frontend.metrics_port = reply[3]
        log_event(logger, "frontend_ready", frontend=index, pid=frontend.process.pid)

    def _metrics_ports(self) -> list[int]:
        return [f.metrics_port for f in self.frontends if f.metrics_port is not None and f.process.is_alive()]

    async def watch(self) -> None:
        """Replace front-ends that die, until stopped; returns early if the engine dies."""
        loop = asyncio.get_running_loop()
        assert self.engine is not None
        while not self._stopping:
            await asyncio.sleep(0.2)
            if self.engine.gone:
                log_event(logger, "engine_process_exited", logging.ERROR)
                return
            for index, frontend in enumerate(self.frontends):
                if self._stopping or frontend.process.is_alive():
                    continue
                log_event(logger, "frontend_died", logging.WARNING, frontend=index,
                          exit_code=frontend.process.exitcode)
                await asyncio.sleep(RESTART_PAUSE)
                if self._stopping:
                    return
                await loop.run_in_executor(None, frontend.process.join, 1.0)
                replacement = self.frontends[index] = self._spawn(index)  # in the list at once: stop() sees it
                try:
                    await self._wait_ready(index, replacement)
                except FrontendStartError as exc:  # the next pass sees it dead (a live one that is not ready is killed)
                    log_event(logger, "frontend_restart_failed", logging.ERROR, frontend=index, error=str(exc))
                    if replacement.process.is_alive():
                        replacement.process.kill()

    async def stop(self) -> int:
        """Drain every front-end (SIGTERM, each waits --shutdown-grace), then stop the engine."""
        self._stopping = True
        loop = asyncio.get_running_loop()
        serving = [frontend for frontend in self.frontends if frontend.process.is_alive()]
        for frontend in serving:  # (one that died already was reported by watch)
            os.kill(frontend.process.pid, signal.SIGTERM)  # type: ignore[arg-type]
        deadline = self.config.shutdown_grace + 15.0
        codes = []
        for frontend in serving:
            await loop.run_in_executor(None, frontend.process.join, deadline)
            if frontend.process.is_alive():
                log_event(logger, "frontend_killed", logging.WARNING, pid=frontend.process.pid)
                frontend.process.kill()
                frontend.process.join()
            codes.append(frontend.process.exitcode)
        if self.metrics is not None:
            self.metrics.close()
        if self.engine is not None:
            await loop.run_in_executor(None, self.engine.stop)
        for sock in self._reserved:
            sock.close()
        shutil.rmtree(self._folder, ignore_errors=True)
        log_event(logger, "shutdown_complete", frontend_exit_codes=codes)
        return 0 if all(code == 0 for code in codes) else 1


async def serve_frontends(config: ServerConfig) -> int:
    """charstream-serve with --frontends N > 1: run until SIGTERM or SIGINT."""
    supervisor = Supervisor(config)
    try:
        await supervisor.start()
    except BaseException:
        await supervisor.stop()
        raise
    print(f"listening on {host_port(config.host, supervisor.port)}", flush=True)
    if supervisor.http_port is not None:
        http_host = "localhost" if config.host in ("0.0.0.0", "::", "") else config.host
        print(f"HTTP API and playground on http://{host_port(http_host, supervisor.http_port)}/", flush=True)
    if supervisor.metrics is not None:
        print(f"metrics on {host_port(config.metrics_host or config.host, supervisor.metrics.port)}", flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watching = asyncio.ensure_future(supervisor.watch())
    await asyncio.wait({asyncio.ensure_future(stop.wait()), watching}, return_when=asyncio.FIRST_COMPLETED)
    engine_died = watching.done() and not stop.is_set()
    if watching.done() and not watching.cancelled() and watching.exception() is not None:
        log_event(logger, "supervisor_failed", logging.ERROR, error=repr(watching.exception()))
    watching.cancel()
    code = await supervisor.stop()
    return 3 if engine_died else code
