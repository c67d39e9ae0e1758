"""charstream-bench: the server as a separate process, its log and metrics, a private redis-server (rows 10
and 11), and the machine description (row 8)."""

from __future__ import annotations

import json
import os
import platform
import queue
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from protos.charstream.v1 import generator_pb2 as pb

# Log fields that describe how the server runs the model: copied into row 8 and
# used for the raw loop's ONNX Runtime session options.
SETTING_WORDS = ("thread", "spinning", "lookahead", "max_batch", "variant", "device", "engine", "coalesce", "stretch")
REDIS_SERVER = "redis-server"
REDIS_START_SECONDS = 10.0
REDIS_STOP_SECONDS = 5.0
REDIS_PORT_TRIES = 3


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


def _start(command: list[str], flags: list[str], timeout: float) -> ServerProcess:
    """Start `command`, a server that prints `listening on ADDRESS` on stdout and logs JSON events on stderr."""
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


def stop_process(process: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; always reaps the process."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait()


def stop(server: ServerProcess) -> None:
    stop_process(server.process)


@contextmanager
def running_server(model: str, flags: list[str], timeout: float,
                   command: list[str] | None = None) -> Iterator[ServerProcess]:
    """A server process for the block (`python -m server` on `model` with `flags`, or `command`); terminated on
    the way out, whatever happens (Ctrl-C included)."""
    server: ServerProcess | None = None
    try:
        server = _start(command or server_command(model, flags), flags, timeout)
        yield server
    finally:
        if server is not None:
            stop(server)


def describe_server(info: pb.GetModelInfoResponse, server: ServerProcess) -> dict[str, Any]:
    """Row 8's server part: provider, variant, thread settings and lookahead as the server reports them."""
    return {"execution_provider": info.execution_provider, "variant": info.variant,
            "variant_reason": info.variant_reason, "model_file": info.model_file,
            "model": f"{info.num_layers} x {info.hidden_size} GRU, embedding {info.embedding_dim}, "
                     f"{info.vocab_size} characters",
            "lookahead_chars": info.lookahead_chars, "server_settings": server.settings(),
            "server_flags": server.flags}


def metrics_text(metrics_url: str | None) -> str | None:
    """The server's Prometheus metrics page, or None where there is none or it does not answer."""
    if metrics_url is None:
        return None
    try:
        return urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    except OSError:
        return None


def batch_totals(metrics_url: str | None) -> tuple[float, float] | None:
    """(sum, count) of the server's charstream_batch_size histogram, or None."""
    text = metrics_text(metrics_url)
    if text is None:
        return None
    total = re.search(r"^charstream_batch_size_sum (\S+)$", text, re.MULTILINE)
    count = re.search(r"^charstream_batch_size_count (\S+)$", text, re.MULTILINE)
    if not (total and count):
        return None
    return float(total.group(1)), float(count.group(1))


def vm_rss_bytes(pid: int) -> int | None:
    """Resident memory of a process and its descendants (the server's engine process among them):
    VmRSS in /proc/PID/status summed over the tree, or None where the process is not readable."""
    own = _own_rss_bytes(pid)
    if own is None:
        return None
    return own + sum(vm_rss_bytes(child) or 0 for child in _children(pid))


def _own_rss_bytes(pid: int) -> int | None:
    try:
        text = open(f"/proc/{pid}/status", encoding="utf-8").read()
    except OSError:
        return None
    found = re.search(r"^VmRSS:\s*(\d+)\s*kB", text, re.MULTILINE)
    return int(found.group(1)) * 1024 if found else None


def _children(pid: int) -> list[int]:
    """Child process ids, from /proc/PID/task/*/children (empty where that is not readable)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            found += [int(p) for p in open(f"/proc/{pid}/task/{task}/children", encoding="utf-8").read().split()]
        except (OSError, ValueError):
            continue
    return found


class RedisStartError(RuntimeError):
    """redis-server exited or did not answer PING."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as connection:
            connection.sendall(b"PING\r\n")
            return connection.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _start_redis(binary: str, directory: str) -> tuple[subprocess.Popen, int]:
    """A redis-server on 127.0.0.1 that keeps nothing on disk, answering PING; (process, port)."""
    log = os.path.join(directory, "redis.log")
    for _ in range(REDIS_PORT_TRIES):  # a free port can be taken by someone else before redis binds it
        port = free_port()
        process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                    "--appendonly", "no", "--dir", directory, "--daemonize", "no", "--logfile", log],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + REDIS_START_SECONDS
            while process.poll() is None and time.monotonic() < deadline:
                if answers_ping(port):
                    return process, port
                time.sleep(0.05)
        except BaseException:  # Ctrl-C while waiting must not leave it running
            stop_process(process, REDIS_STOP_SECONDS)
            raise
        stop_process(process, REDIS_STOP_SECONDS)
    try:
        tail = "\n".join(open(log, encoding="utf-8", errors="replace").read().splitlines()[-10:])
    except OSError:
        tail = "(no log)"
    raise RedisStartError(f"redis-server did not start:\n{tail}")


@contextmanager
def private_redis() -> Iterator[str]:
    """A throwaway redis-server for the block, in a temporary directory; yields its URL. Always stopped."""
    binary = shutil.which(REDIS_SERVER)
    if binary is None:
        raise RedisStartError(f"{REDIS_SERVER} is not on PATH")
    with tempfile.TemporaryDirectory(prefix="charstream-bench-redis-") as directory:
        process, port = _start_redis(binary, directory)
        try:
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            stop_process(process, REDIS_STOP_SECONDS)


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
