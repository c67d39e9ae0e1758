"""charstream-serve configuration: flags, environment equivalents and their checks."""

from __future__ import annotations

import pytest

from server.config import parse_config


def test_environment_variables_set_defaults_and_flags_win() -> None:
    env = {"CHARSTREAM_MODEL": "models/demo", "CHARSTREAM_PORT": "6000", "CHARSTREAM_DEVICE": "cpu",
           "CHARSTREAM_SESSION_TTL": "30"}
    config = parse_config([], env)
    assert (config.model, config.port, config.device, config.session_ttl) == ("models/demo", 6000, "cpu", 30.0)
    assert parse_config(["--port", "7000"], env).port == 7000
    assert config.metrics_port is None and config.variant is None


@pytest.mark.parametrize(
    "argv, env, message",
    [
        ([], {}, "--model (or CHARSTREAM_MODEL) is required"),
        (["--model", "m", "--device", "tpu"], {}, "invalid choice: 'tpu'"),
        (["--model", "m", "--max-sessions", "0"], {}, "--max-sessions must be >= 1"),
        (["--model", "m", "--session-ttl", "0"], {}, "--session-ttl must be > 0"),
        (["--model", "m", "--session-ttl", "nan"], {}, "--session-ttl must be a finite number"),
        (["--model", "m"], {"CHARSTREAM_SHUTDOWN_GRACE": "inf"}, "--shutdown-grace must be a finite number"),
        (["--model", "m"], {"CHARSTREAM_PORT": "http"}, "CHARSTREAM_PORT='http' is not a valid int"),
    ],
)
def test_bad_configuration_is_refused_with_a_reason(
    argv: list[str], env: dict[str, str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_config(argv, env)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
