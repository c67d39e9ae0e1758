"""A real `charstream-serve --frontends N` in a subprocess, for tests: its address, metrics URL,
the front-ends' process ids (from its log), and a stop that checks the exit status."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 90.0


class FrontendsServer:
    def __init__(self, model_dir: Path, frontends: int, *extra: str, device: str = "cpu"):
        self.args = [sys.executable, "-m", "server", "--model", str(model_dir), "--port", "0",
                     "--metrics-port", "0", "--frontends", str(frontends), "--device", device,
                     "--shutdown-grace", "2", *extra]
        self._log = tempfile.NamedTemporaryFile("w+", prefix="charstream-frontends-", suffix=".log", delete=False)
        self.process: subprocess.Popen | None = None
        self.address = ""
        self.metrics_url = ""
        self.http_url = ""

    def start(self) -> FrontendsServer:
        self.process = subprocess.Popen(self.args, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=self._log, text=True)
        deadline = time.monotonic() + START_TIMEOUT
        assert self.process.stdout is not None
        while not self.metrics_url:
            line = self.process.stdout.readline()
            if not line:
                self.process.wait(10)
                raise RuntimeError(f"the server exited ({self.process.returncode}) before listening:\n{self.log()}")
            if line.startswith("listening on "):
                self.address = line.split()[-1]
            elif line.startswith("HTTP API and playground on "):
                self.http_url = line.split()[-1]
            elif line.startswith("metrics on "):
                self.metrics_url = f"http://{line.split()[-1]}/metrics"
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start within {START_TIMEOUT:.0f} s:\n{self.log()}")
        return self

    def log(self) -> str:
        return Path(self._log.name).read_text()

    def frontend_pids(self) -> list[int]:
        """Process ids of the front-ends serving now (their latest `frontend_ready` lines, by index)."""
        latest: dict[str, int] = {}
        for index, pid in re.findall(r"event=frontend_ready frontend=(\d+) pid=(\d+)", self.log()):
            latest[index] = int(pid)
        return [pid for _, pid in sorted(latest.items())]

    def wait_for_ready_count(self, count: int, timeout: float = 60.0) -> None:
        """Wait until `count` front-ends have said ready since the start (a replacement counts)."""
        deadline = time.monotonic() + timeout
        while len(re.findall(r"event=frontend_ready ", self.log())) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"fewer than {count} front-ends became ready:\n{self.log()}")
            time.sleep(0.1)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, then the exit status (killed, and an error raised, if it does not exit in time)."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise
        finally:
            self._log.close()

    def __enter__(self) -> FrontendsServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        code = self.stop()
        log = self.log()
        os.unlink(self._log.name)
        assert code == 0, f"the server exited with {code}:\n{log}"
