"""A private, throwaway redis-server for tests, and the `redis_server` fixture.

Each server listens on 127.0.0.1 on a free port, keeps nothing on disk (no RDB
snapshots, no AOF) and works in a pytest temporary directory. It can be stopped
and started again on the same port, so a test can check what its client does
while Redis is unreachable and after it is back (empty, as nothing persists).

Use from a test module (imported fixtures are registered by pytest):

    from tests.redis_server import RedisServer, redis_server

    def test_something(redis_server: RedisServer) -> None:
        ... redis_server.url ...
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from server.bench.process import answers_ping, free_port

REDIS_SERVER = "redis-server"
START_TIMEOUT_SECONDS = 10.0
STOP_TIMEOUT_SECONDS = 5.0


def redis_server_binary() -> str:
    """The redis-server executable; skips the calling test when it is not installed."""
    path = shutil.which(REDIS_SERVER)
    if path is None:
        pytest.skip("redis-server is not on PATH; install the Debian package redis-server to run this test")
    return path


class RedisServer:
    """One redis-server process; `start()` again after `stop()` reuses the same port."""

    def __init__(self, directory: Path, port: int | None = None, binary: str | None = None):
        self.directory = Path(directory)
        self.binary = binary or redis_server_binary()
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def log_path(self) -> Path:
        return self.directory / f"redis-{self.port}.log"

    def start(self) -> "RedisServer":
        """Start the server and wait (bounded) until it answers PING."""
        if self.running:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        # A free port can be taken by someone else before redis binds it; pick
        # another then, unless the caller needs this exact port (a restart).
        for _ in range(1 if self._fixed_port else 3):
            if self._launch_and_wait():
                # Later restarts must come back where clients expect them.
                self._fixed_port = True
                return self
            if not self._fixed_port:
                self.port = free_port()
        raise RuntimeError(f"redis-server did not start on port {self.port}:\n{self._log_tail()}")

    def _launch_and_wait(self) -> bool:
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.directory),
            "--daemonize", "no",
            "--logfile", str(self.log_path),
        ]
        quiet = subprocess.DEVNULL  # it logs to its own file, read back when it fails to start
        self._process = subprocess.Popen(args, stdin=quiet, stdout=quiet, stderr=quiet)
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._process = None
                return False
            if answers_ping(self.port):
                return True
            time.sleep(0.05)
        self.stop()
        return False

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers; always waits so no zombie is left."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _log_tail(self) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A started private redis-server, stopped after the test whatever happened."""
    server = RedisServer(tmp_path / "redis")
    with server:
        yield server
