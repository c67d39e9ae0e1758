"""charstream-bench: the server as a separate process, its log, and the machine description (row 8)."""

from __future__ import annotations

import json
import os
import platform
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

# Log fields that describe how the server runs the model: copied into row 8 and
# used for the raw loop's ONNX Runtime session options.
SETTING_WORDS = ("thread", "spinning", "lookahead", "max_batch", "variant", "device")


class ServerStartError(RuntimeError):
    """The server process exited or stayed silent instead of printing `listening on ADDRESS`."""


@dataclass
class ServerProcess:
    process: subprocess.Popen
    command: list[str]
    flags: list[str]  # the flags beyond model, address, metrics port and log format
    address: str = ""
    events: list[dict[str, Any]] = field(default_factory=list)
    tail: deque = field(default_factory=lambda: deque(maxlen=40))

    def event(self, name: str) -> dict[str, Any] | None:
        """The last logged event called `name`."""
        return next((e for e in reversed(self.events) if e.get("event") == name), None)

    def settings(self) -> dict[str, Any]:
        """Thread, spinning, lookahead, batch, variant and device settings as the server logged them."""
        found: dict[str, Any] = {}
        for event in self.events:
            if event.get("event") in ("config", "model_loaded", "listening"):
                found.update({k: v for k, v in event.items() if any(w in k for w in SETTING_WORDS)})
        return found

    def metrics_url(self) -> str | None:
        listening = self.event("listening") or {}
        endpoint = listening.get("metrics")
        return f"http://{endpoint}/metrics" if endpoint and endpoint != "off" else None

    def describe_exit(self) -> str:
        """Its last stderr line first (a start-up error says what is wrong there), then the command and log tail."""
        lines = [line.strip() for line in self.tail if line.strip()]
        return (f"{lines[-1] if lines else 'no output'} (exit status {self.process.poll()})\n"
                f"command: {' '.join(self.command)}\nlast log lines:\n" + "\n".join(lines))


def server_command(model: str, flags: list[str]) -> list[str]:
    return [sys.executable, "-m", "server", "--model", model, "--host", "127.0.0.1", "--port", "0",
            "--metrics-port", "0", "--log-format", "json", *flags]


def _read_stderr(server: ServerProcess) -> None:
    for line in server.process.stderr:  # type: ignore[union-attr]
        server.tail.append(line)
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            server.events.append(event)


def _start(model: str, flags: list[str], timeout: float) -> ServerProcess:
    command = server_command(model, flags)
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, encoding="utf-8", errors="replace")
    server = ServerProcess(process, command, flags)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()  # type: ignore
    threading.Thread(target=_read_stderr, args=(server,), daemon=True).start()
    deadline = time.monotonic() + timeout
    while not server.address:
        try:
            line = lines.get(timeout=0.1)
        except queue.Empty:
            line = ""
        found = re.match(r"listening on (\S+)", line)
        if found:
            server.address = found.group(1)
        elif process.poll() is not None or time.monotonic() > deadline:
            time.sleep(0.2)  # let the stderr reader catch the last lines
            why = "timed out" if process.poll() is None else "exited"
            raise ServerStartError(f"server {why} before listening: {server.describe_exit()}")
    # The `listening` log event precedes the stdout line; wait until the reader has it.
    while server.event("listening") is None and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    return server


def stop(server: ServerProcess) -> None:
    """SIGTERM, then SIGKILL after 15 s; always reaps the process."""
    process = server.process
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait()


@contextmanager
def running_server(model: str, flags: list[str], timeout: float) -> Iterator[ServerProcess]:
    """A server process for the block; terminated on the way out, whatever happens (Ctrl-C included)."""
    server: ServerProcess | None = None
    try:
        server = _start(model, flags, timeout)
        yield server
    finally:
        if server is not None:
            stop(server)


def batch_totals(metrics_url: str | None) -> tuple[float, float] | None:
    """(sum, count) of the server's charstream_batch_size histogram, or None."""
    if metrics_url is None:
        return None
    try:
        text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    except OSError:
        return None
    total = re.search(r"^charstream_batch_size_sum (\S+)$", text, re.MULTILINE)
    count = re.search(r"^charstream_batch_size_count (\S+)$", text, re.MULTILINE)
    if not (total and count):
        return None
    return float(total.group(1)), float(count.group(1))


def _cpuinfo() -> tuple[str, int | None]:
    """(CPU model, logical cores) from /proc/cpuinfo; ("unknown", None) where it is missing."""
    try:
        text = open("/proc/cpuinfo", encoding="utf-8", errors="replace").read()
    except OSError:
        return platform.processor() or "unknown", None
    models = re.findall(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    processors = re.findall(r"^processor\s*:", text, re.MULTILINE)
    return (models[0].strip() if models else platform.processor() or "unknown"), (len(processors) or None)


def _gpu_name() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        result = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return ", ".join(line.strip() for line in result.stdout.splitlines() if line.strip()) or None


def machine_info() -> dict[str, Any]:
    import onnxruntime

    cpu_model, logical = _cpuinfo()
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {"cpu_model": cpu_model, "logical_cores": logical, "os_cpu_count": os.cpu_count(),
            "usable_cpus": affinity, "gpu": _gpu_name(), "platform": platform.platform(),
            "python": platform.python_version(), "onnxruntime": onnxruntime.__version__}
