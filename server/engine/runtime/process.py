"""The engine in a process of its own: spawning it, and the server's side of its socket.

Why a process: in one Python process the engine thread and the gRPC event loop
take turns holding the interpreter lock. The event loop writing messages kept
the engine waiting after every model step, so the engine made about one
character per stream per write and messages stayed one character long. In its
own process the engine steps at the model's speed, characters pile up while
the loop writes, and each write carries all of them (coalescing).

    engine = EngineProcess(params, observer=metrics)   # spawns the child, loads the model there
    engine.info                                         # the child's RunnerInfo
    engine.start(); ...; engine.stop()

Everything but the process itself is EngineClient's (engine_client.py): commands
in order over a socket that never blocks the caller, the child's messages read on
the serving event loop. The child's side is process_child.py.
"""

from __future__ import annotations

import logging
import multiprocessing
import socket
from typing import Any

from server.engine.observer import StepObserver
from server.engine.runner.model_runner import RunnerInfo
from server.engine.runtime.engine_client import GONE, EngineClient
from server.engine.runtime.process_child import MakeExtension, engine_main
from server.engine.runtime.process_messages import STARTUP_ERRORS, EngineParams
from server.engine.runtime.process_pipe import ServerPipe, run_on_loop
from server.structured_log import log_event

logger = logging.getLogger("charstream.server")

START_TIMEOUT = 300.0  # seconds for the child to load the model (a CUDA start can be slow)
STOP_TIMEOUT = 5.0


class EngineProcess(EngineClient):
    def __init__(self, params: EngineParams, observer: StepObserver | None = None,
                 start_timeout: float = START_TIMEOUT, make_extension: MakeExtension | None = None):
        context = multiprocessing.get_context("spawn")  # never fork a process that runs gRPC threads
        ours, theirs = socket.socketpair()
        self._process = context.Process(target=engine_main, args=(theirs, params, make_extension),
                                        name="charstream-engine", daemon=True)
        self._process.start()
        theirs.close()
        self._pipe = ServerPipe(ours)
        info = self._wait_ready(start_timeout)
        super().__init__(self._pipe, info, params.lookahead, observer)

    def _wait_ready(self, timeout: float) -> RunnerInfo:
        try:
            reply = self._pipe.receive_first(timeout)
        except TimeoutError:
            self._kill()
            raise RuntimeError(f"the engine process did not load the model within {timeout:.0f} s") from None
        except (EOFError, OSError):
            reply = ("failed", "RuntimeError", f"{GONE} while loading the model (exit code {self._exit_code()})")
        except BaseException:
            self._kill()
            raise
        if reply[0] == "ready":
            return reply[1]
        self._kill()
        _, kind, message = reply
        raise STARTUP_ERRORS.get(kind, RuntimeError)(message)

    def _exit_code(self) -> int | None:
        self._process.join(0.2)
        return self._process.exitcode

    def _kill(self) -> None:
        if self._process.is_alive():
            self._process.kill()
        self._process.join()
        self._pipe.close()

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop the child after the step in progress (killed if it does not stop in `timeout`), then
        fail whatever still waits and refuse later calls. From any thread but the loop's once
        started (it waits); never blocked by a full pipe."""
        self._stopping = True
        self._send(("stop",))
        self._process.join(timeout)
        if self._process.is_alive():
            log_event(logger, "engine_process_killed", logging.WARNING, timeout_seconds=timeout)
            self._process.kill()
            self._process.join()
        if not run_on_loop(self._loop, self._shut_down, timeout):
            log_event(logger, "engine_stop_unconfirmed", logging.WARNING, timeout_seconds=timeout)

    def _gone_details(self) -> dict[str, Any]:
        return {"exit_code": self._exit_code()}

    @property
    def pid(self) -> int | None:
        return self._process.pid
