"""charstream-serve configuration: flags, environment equivalents and their checks."""

from __future__ import annotations

import pytest

from server.config import ServerConfig, parse_config
from server.engine.model.providers import ThreadSettings
from server.engine.runtime.loop import DEFAULT_LOOKAHEAD


def test_environment_variables_set_defaults_and_flags_win() -> None:
    env = {"CHARSTREAM_MODEL": "models/demo", "CHARSTREAM_PORT": "6000", "CHARSTREAM_DEVICE": "cpu",
           "CHARSTREAM_SESSION_TTL": "30"}
    config = parse_config([], env)
    assert (config.model, config.port, config.device, config.session_ttl) == ("models/demo", 6000, "cpu", 30.0)
    assert parse_config(["--port", "7000"], env).port == 7000
    assert config.metrics_port is None and config.variant == "auto"


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
        (["--model", "m"], {"CHARSTREAM_ALLOW_SPINNING": "maybe"},
         "CHARSTREAM_ALLOW_SPINNING='maybe' is not a valid boolean (1/0, true/false, yes/no)"),
        (["--model", "m"], {"CHARSTREAM_ALLOW_SPINNING": ""}, "CHARSTREAM_ALLOW_SPINNING='' is not a valid boolean"),
        (["--model", "m", "--allow-spinning=1"], {}, "ignored explicit argument '1'"),
        (["--model", "m", "--lookahead", "0"], {}, "--lookahead must be >= 1, got 0"),
        (["--model", "m", "--lookahead", "many"], {}, "argument --lookahead: invalid int value: 'many'"),
        (["--model", "m"], {"CHARSTREAM_LOOKAHEAD": "-3"}, "--lookahead must be >= 1, got -3"),
        (["--model", "m", "--intra-op-threads", "-1"], {}, "--intra-op-threads must be >= 0, got -1"),
    ],
)
def test_bad_configuration_is_refused_with_a_reason(
    argv: list[str], env: dict[str, str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_config(argv, env)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_thread_and_lookahead_defaults_come_from_one_place() -> None:
    config = parse_config(["--model", "m"], {})
    assert config.thread_settings() == ThreadSettings()  # the defaults live in ThreadSettings
    assert (config.intra_op_threads, config.allow_spinning) == (1, False)
    assert config.lookahead == 128 == ServerConfig(model="m").lookahead == DEFAULT_LOOKAHEAD
    assert config.variant == "auto"


@pytest.mark.parametrize(
    "argv, env, expected",
    [
        (["--allow-spinning"], {}, True),
        (["--no-allow-spinning"], {}, False),
        ([], {"CHARSTREAM_ALLOW_SPINNING": "1"}, True),
        ([], {"CHARSTREAM_ALLOW_SPINNING": "0"}, False),
        ([], {"CHARSTREAM_ALLOW_SPINNING": "true"}, True),
        ([], {"CHARSTREAM_ALLOW_SPINNING": "False"}, False),
        ([], {"CHARSTREAM_ALLOW_SPINNING": " YES "}, True),
        ([], {"CHARSTREAM_ALLOW_SPINNING": "no"}, False),
        (["--no-allow-spinning"], {"CHARSTREAM_ALLOW_SPINNING": "yes"}, False),  # the flag wins
        (["--allow-spinning"], {"CHARSTREAM_ALLOW_SPINNING": "0"}, True),
    ],
)
def test_allow_spinning_from_flags_and_environment(argv: list[str], env: dict[str, str], expected: bool) -> None:
    config = parse_config(["--model", "m", *argv], env)
    assert config.allow_spinning is expected
    assert config.thread_settings() == ThreadSettings(intra_op_threads=1, allow_spinning=expected)


def test_lookahead_and_threads_from_flags_and_environment() -> None:
    env = {"CHARSTREAM_LOOKAHEAD": "8", "CHARSTREAM_INTRA_OP_THREADS": "4"}
    config = parse_config(["--model", "m"], env)
    assert (config.lookahead, config.intra_op_threads) == (8, 4)
    assert config.thread_settings() == ThreadSettings(intra_op_threads=4, allow_spinning=False)
    assert parse_config(["--model", "m", "--lookahead", "1", "--intra-op-threads", "0"], env).lookahead == 1
    assert parse_config(["--model", "m", "--variant", "int8"], {}).variant == "int8"
