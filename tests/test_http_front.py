"""--http-port and --http-cors as flags and environment variables, and charstream-serve with an
HTTP port as a process: the printed URL, a stream ended by SIGTERM with FINISH_REASON_SHUTDOWN,
exit status 0, and a taken port reported as a start-up error (exit status 2)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from server.config import parse_config
from tests.http_client import Http, read_events

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_http_flags_and_their_environment_variables() -> None:
    assert parse_config(["--model", "m"], {}).http_port is None  # off by default
    assert parse_config(["--model", "m", "--http-port", "0"], {}).http_port == 0
    assert parse_config(["--model", "m"], {"CHARSTREAM_HTTP_PORT": "8080"}).http_port == 8080
    config = parse_config(["--model", "m", "--http-cors", "http://a.example:3000, https://b.example"], {})
    assert config.http_cors == "http://a.example:3000, https://b.example"
    assert parse_config(["--model", "m"], {"CHARSTREAM_HTTP_CORS": "*"}).http_cors == "*"


@pytest.mark.parametrize("argv, message", [
    (["--http-port", "70000"], "ports must be <= 65535"),
    (["--http-port", "-1"], "--http-port must be >= 0"),
    (["--http-cors", "a.example"], "is not an origin"),
    (["--http-cors", "http://a.example/path"], "is not an origin"),
])
def test_bad_http_settings_are_refused_naming_the_fix(argv: list[str], message: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_config(["--model", "m", *argv], {})
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def start(model: Path, *flags: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "server", "--model", str(model), "--port", "0", "--device", "cpu",
                             *flags], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_serve_prints_the_url_and_sigterm_ends_http_streams_with_shutdown(tiny_model_dir: Path) -> None:
    process = start(tiny_model_dir, "--http-port", "0", "--max-chars", "100000", "--shutdown-grace", "5")
    try:
        assert process.stdout is not None
        assert process.stdout.readline().startswith("listening on 127.0.0.1:")
        line = process.stdout.readline().strip()
        assert line.startswith("HTTP API and playground on http://127.0.0.1:") and line.endswith("/")
        port = int(line.rsplit(":", 1)[1].rstrip("/"))
        http = Http(port)
        assert http.call("GET", "/readyz").json() == {"status": "SERVING"}
        connection, response = http.open_stream({"prompt": "To be", "max_chars": 100_000, "temperature": 0})
        events = read_events(response)
        next(events)  # running
        process.send_signal(signal.SIGTERM)
        last = list(events)[-1][1]
        connection.close()
        assert last["finish_reason"] == "FINISH_REASON_SHUTDOWN" and 0 < last["generated_chars"] < 100_000
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_taken_http_port_is_a_startup_error(tiny_model_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = start(tiny_model_dir, "--http-port", str(port))
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 2
    assert f"cannot listen for HTTP on 127.0.0.1 port {port}" in stderr
