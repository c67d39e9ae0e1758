"""charstream-serve / python -m server: run the gRPC server (and the HTTP one, --http-port) until
SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from typing import Sequence

from server.app import start_server
from server.config import ServerConfig, describe, parse_config
from server.engine.model.model_dir import ModelDirError
from server.engine.model.providers import DeviceError
from server.frontends.supervisor import FrontendStartError, serve_frontends
from server.structured_log import configure_logging, log_event

logger = logging.getLogger("charstream.server")


async def serve(config: ServerConfig) -> int:
    running = await start_server(config)
    # One plain line on stdout for scripts and tests that started us with --port 0.
    print(f"listening on {running.address}", flush=True)
    if running.http is not None:
        print(f"HTTP API and playground on {running.http.url}", flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    received: list[str] = []

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig.name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    await stop.wait()
    log_event(logger, "signal_received", signal=received[0])
    await running.stop(config.shutdown_grace)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(argv, os.environ)
    configure_logging(config.log_format, config.log_level)
    log_event(logger, "config", **describe(config))
    try:
        if config.frontends > 1:
            return asyncio.run(serve_frontends(config))
        return asyncio.run(serve(config))
    except (ModelDirError, DeviceError, OSError, FrontendStartError) as exc:
        log_event(logger, "startup_failed", logging.ERROR, error=str(exc))
        print(f"charstream-serve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
