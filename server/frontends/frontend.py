"""One front-end process: a whole gRPC (and HTTP) server whose engine and sessions are the
engine process's, on a port it shares with the other front-ends (SO_REUSEPORT).

The supervisor (supervisor.py) spawns it with the server's configuration, the
engine's socket path and one end of a pipe. It connects to the engine, binds,
and answers ("ready", gRPC port, HTTP port, metrics port), or ("failed", why).
Its metrics are served on a loopback port of its own, for the supervisor's
/metrics to merge. SIGTERM drains its streams (FINISH_REASON_SHUTDOWN after
--shutdown-grace) and it exits 0; SIGINT is left to the supervisor.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from multiprocessing.connection import Connection

from server.config import ServerConfig
from server.engine.runtime.engine_client import EngineClient
from server.frontends.remote_sessions import RemoteSessions
from server.metrics import ServerMetrics
from server.structured_log import configure_logging, log_event

logger = logging.getLogger("charstream.server")


def connect_engine(config: ServerConfig, engine_path: str,
                   metrics: ServerMetrics) -> tuple[EngineClient, RemoteSessions]:
    """This front-end's engine link and session backend; the metrics follow the engine's counts."""
    engine = EngineClient.connect(engine_path, config.lookahead, observer=metrics)
    sessions = RemoteSessions(engine, config.max_sessions, config.session_ttl,
                              config.streams_per_key if config.api_keys else None)
    engine.on_closed = sessions.fail_all
    metrics.track_sessions(lambda: len(sessions))
    if config.prefix_cache_bytes > 0:
        metrics.track_prefix_cache(engine.prefix_cache)  # type: ignore[arg-type]
    counted: dict[str, int] = {}

    def follow_removals(live: int, removed: dict[str, int]) -> None:
        # The engine's totals since it started, heard by the front-end that reports its metrics.
        for reason, total in removed.items():
            if total > counted.get(reason, 0):
                metrics.sessions_removed.labels(reason=reason).inc(total - counted.get(reason, 0))
                counted[reason] = total

    sessions.on_counts = follow_removals
    return engine, sessions


async def _serve(config: ServerConfig, engine_path: str, conn: Connection) -> int:
    from server.app import start_server  # app imports this module's connect_engine

    try:
        running = await start_server(config, engine_path=engine_path)
    except Exception as exc:  # noqa: BLE001 - the supervisor reports it and stops
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return 2
    endpoint = running.metrics.serve("127.0.0.1", 0)  # merged into the supervisor's /metrics
    conn.send(("ready", running.port, running.http.port if running.http else None, endpoint.port))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    engine_gone = asyncio.ensure_future(_engine_gone(running.engine))  # type: ignore[arg-type]
    await asyncio.wait({asyncio.ensure_future(stop.wait()), engine_gone}, return_when=asyncio.FIRST_COMPLETED)
    code = 0 if stop.is_set() else 3
    await running.stop(config.shutdown_grace)
    endpoint.close()
    return code


async def _engine_gone(engine: EngineClient) -> None:
    """Returns once the engine is unreachable: a front-end without it can only refuse, so it exits."""
    while not engine.gone:
        await asyncio.sleep(0.5)


def frontend_main(config: ServerConfig, engine_path: str, conn: Connection) -> None:
    """The front-end process's entry point (spawned by the supervisor)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the supervisor decides
    configure_logging(config.log_format, config.log_level)
    code = asyncio.run(_serve(config, engine_path, conn))
    log_event(logger, "frontend_exited", exit_code=code)
    sys.exit(code)
