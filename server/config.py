"""charstream-serve configuration: flags, each with an environment-variable equivalent.

Precedence: command-line flag, then CHARSTREAM_* environment variable, then default.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from server.engine.model.model_contract import MANIFEST_FILE, MODEL_FILE, VARIANT_FILES
from server.engine.model.model_dir import AUTO, AUTO_PREFERENCE
from server.engine.model.providers import DEVICES, ThreadSettings
from server.engine.runtime.loop import DEFAULT_LOOKAHEAD
from server.engine.scheduling.batch_stretch import DEFAULT_BATCH_STRETCH
from server.structured_log import LOG_FORMATS

if TYPE_CHECKING:
    from server.engine.runtime.process_messages import EngineParams


@dataclass(frozen=True)
class ServerConfig:
    model: str
    host: str = "127.0.0.1"
    port: int = 50051
    device: str = "auto"
    variant: str = AUTO
    max_sessions: int = 1024
    session_ttl: float = 600.0
    max_batch: int = 256
    max_chars: int = 10_000
    max_prompt_chars: int = 10_000
    metrics_port: int | None = None
    metrics_host: str | None = None
    http_port: int | None = None
    http_cors: str | None = None
    shutdown_grace: float = 5.0
    # The thread defaults live in ThreadSettings (one place for the server and library callers).
    intra_op_threads: int = ThreadSettings.intra_op_threads
    allow_spinning: bool = ThreadSettings.allow_spinning
    lookahead: int = DEFAULT_LOOKAHEAD  # the engine's default, one place (loop.py says why)
    stretch: bool = True
    batch_stretch: int = DEFAULT_BATCH_STRETCH
    engine_process: bool = True
    frontends: int = 1
    coalesce_streams: int = 4
    prefix_cache_bytes: int = 64 * 1024 * 1024
    session_store: str = "memory"
    lease_seconds: float = 10.0
    write_back_chars: int = 256
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    api_keys: str | None = None
    max_sessions_per_key: int = 0  # 0: half of max_sessions (see sessions_per_key)
    max_streams_per_key: int = 0  # 0: half of max_sessions
    max_message_bytes: int = 2 * 1024 * 1024
    log_format: str = "kv"
    log_level: str = "info"

    @property
    def sessions_per_key(self) -> int:
        """Most sessions one API key may hold (only with --api-keys)."""
        return self.max_sessions_per_key or max(1, self.max_sessions // 2)

    @property
    def streams_per_key(self) -> int:
        """Most streams one API key may run at once (only with --api-keys)."""
        return self.max_streams_per_key or max(1, self.max_sessions // 2)

    def engine_params(self) -> "EngineParams":
        """What the engine process needs to load the model and run (server/engine/runtime/process_child.py)."""
        from server.engine.runtime.process_messages import EngineParams

        return EngineParams(self.model, self.variant, self.device, self.max_sessions, self.thread_settings(),
                            self.max_batch, self.lookahead, self.prefix_cache_bytes, self.log_format, self.log_level,
                            self.stretch, self.batch_stretch)

    def thread_settings(self) -> ThreadSettings:
        """The ONNX Runtime threading this configuration asks for (for load_runner)."""
        return ThreadSettings(intra_op_threads=self.intra_op_threads, allow_spinning=self.allow_spinning)


def env_name(field_name: str) -> str:
    return "CHARSTREAM_" + field_name.upper()


HELP = {
    "model": f"model directory ({MODEL_FILE} [+ variants] + {MANIFEST_FILE}), as written by charstream-export",
    "host": "address to listen on; 0.0.0.0 or :: for every interface",
    "port": "gRPC port; 0 picks a free one (the bound port is printed)",
    "device": "auto: CUDA when available else CPU; cuda: fail if CUDA is unavailable; cpu",
    "variant": f"model variant from {MANIFEST_FILE} ({', '.join(VARIANT_FILES)}), or {AUTO}: "
    + " / ".join(f"{name} on {provider}" for provider, (name, _) in AUTO_PREFERENCE.items())
    + f" when {MANIFEST_FILE} records it verified on that provider, else the manifest's default",
    "max_sessions": "most sessions held at once; creating one more evicts the least recently used idle one",
    "session_ttl": "seconds an idle session lives",
    "max_batch": "most sessions in one model step",
    "max_chars": "largest max_chars a Generate call or Converse turn may ask for",
    "max_prompt_chars": "largest prompt (or turn text) one call may send, in characters",
    "metrics_port": "serve Prometheus metrics on this HTTP port (0 = a free one); default: off",
    "metrics_host": "address of the metrics endpoint; default: --host",
    "http_port": "also serve the HTTP/JSON API (server-sent events for streams) and the browser playground "
    "at / on this port of --host, 0 = a free one (the URL is printed); same keys, TLS files and limits as "
    "the gRPC port; default: off",
    "http_cors": "comma-separated origins (scheme://host[:port]) whose web pages may call the HTTP API, or * "
    "for any; default: cross-origin requests are refused with 403",
    "shutdown_grace": "seconds active streams get to finish on SIGTERM/SIGINT before they are cut",
    "intra_op_threads": "ONNX Runtime intra-op threads; 0 = its default (one per physical core)",
    "allow_spinning": "let idle ONNX Runtime threads busy-wait for work (lower latency, CPU burnt between steps); "
    "--no-allow-spinning suits a shared machine",
    "lookahead": "most characters a stream is generated ahead of what was handed to its client; "
    "bounds each stream's memory",
    "stretch": "a session stepping alone consumes its queued characters and, sampling with a plain temperature, "
    "samples up to half the lookahead more in one model call, checked against the server's sampler; --no-stretch "
    "steps it one character per call, and batches too",
    "batch_stretch": "with --stretch, when every session ready to step samples with a plain temperature, one "
    "model call samples up to this many characters per session (calls grow 2, 4, 8, ... with the youngest "
    "request; whatever arrives meanwhile waits for the call); below 2: batches take ordinary steps",
    "coalesce_streams": "under load, a stream's messages after its first wait for one character per this many "
    "running streams (at most half the lookahead): fewer, larger messages as load grows; 0 = send whatever is "
    "ready",
    "engine_process": "run the model and scheduler in a process of their own, so that model steps never wait "
    "for the gRPC threads (Python's interpreter lock); --no-engine-process runs them on a thread of this process",
    "frontends": "gRPC (and HTTP) server processes sharing the port and one engine process, each writing "
    "its own streams' messages on a core of its own; the sessions live in the engine process, so any "
    "front-end serves any session (needs --engine-process and --session-store memory); 1 = one server "
    "process, as measured best on a 2-core machine (docs/serving.md)",
    "prefix_cache_bytes": "bytes of session states kept by prompt text, so that a new session whose prompt starts "
    "with a cached text skips consuming it; 0 = off",
    "session_store": "memory: sessions live in this process; redis://HOST:PORT/DB: session records in Redis, "
    "shared by every replica pointed at it",
    "lease_seconds": "with --session-store redis: how long a replica's hold on a session outlives the replica "
    "(a crashed replica's sessions are served elsewhere after this)",
    "write_back_chars": "with --session-store redis: a stream's state is written back at least every this many "
    "delivered characters (a replica crash loses at most this many)",
    "tls_cert": "PEM certificate chain: serve TLS (with --tls-key); a renewed file is picked up without a restart",
    "tls_key": "PEM private key of --tls-cert",
    "tls_client_ca": "PEM CA bundle: require client certificates signed by it (mutual TLS; needs --tls-cert)",
    "api_keys": "file of NAME:SECRET lines (# comments, blank lines): every Generator call needs "
    "'authorization: Bearer SECRET'; sessions belong to the key that made them",
    "max_sessions_per_key": "with --api-keys: most sessions one key holds (its least recently used idle one is "
    "evicted first); 0 = half of --max-sessions",
    "max_streams_per_key": "with --api-keys: most Generate calls and Converse streams one key runs at once; "
    "0 = half of --max-sessions",
    "max_message_bytes": "largest request message accepted (bigger ones get RESOURCE_EXHAUSTED)",
    "log_format": "log line format: kv (key=value) or json",
    "log_level": "debug, info, warning or error",
}
CHOICES: dict[str, Sequence[str]] = {
    "device": DEVICES,
    "log_format": LOG_FORMATS,
    "log_level": ("debug", "info", "warning", "error"),
}
INTEGERS = ("port", "frontends", "max_sessions", "max_batch", "max_chars", "max_prompt_chars", "metrics_port", "http_port",
            "intra_op_threads",
            "lookahead", "batch_stretch", "coalesce_streams", "prefix_cache_bytes", "write_back_chars", "max_sessions_per_key",
            "max_streams_per_key", "max_message_bytes")
FLOATS = ("session_ttl", "shutdown_grace", "lease_seconds")
BOOLEANS = ("allow_spinning", "engine_process", "stretch")
MINIMUM = {"port": 0, "frontends": 1, "max_sessions": 1, "max_batch": 1, "max_chars": 1, "max_prompt_chars": 1,
           "metrics_port": 0, "http_port": 0, "shutdown_grace": 0, "coalesce_streams": 0, "intra_op_threads": 0, "lookahead": 1,
           "batch_stretch": 0,
           "prefix_cache_bytes": 0, "write_back_chars": 1, "max_sessions_per_key": 0, "max_streams_per_key": 0, "max_message_bytes": 4096}
TRUE_WORDS = ("1", "true", "yes")
FALSE_WORDS = ("0", "false", "no")


def parse_bool(text: str) -> bool:
    """1/0, true/false, yes/no (any case, surrounding blanks ignored)."""
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError(f"expected one of {', '.join(TRUE_WORDS + FALSE_WORDS)}")


def _converter(field_name: str) -> Callable[[str], Any]:
    if field_name in FLOATS:
        return float
    if field_name in INTEGERS:
        return int
    if field_name in BOOLEANS:
        return parse_bool
    return str


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="charstream-serve",
        description="Serve a charstream model directory over gRPC (and HTTP/JSON with --http-port). "
        "Every flag also reads CHARSTREAM_<FLAG> from the environment.",
    )
    for item in fields(ServerConfig):
        env = env_name(item.name)
        convert = _converter(item.name)
        default = None if item.name == "model" else item.default  # model has no default
        if env in environ:
            try:
                default = convert(environ[env])
            except ValueError:
                what = "boolean (1/0, true/false, yes/no)" if item.name in BOOLEANS else convert.__name__
                parser.error(f"{env}={environ[env]!r} is not a valid {what}")
        flag = "--" + item.name.replace("_", "-")
        help_text = f"{HELP[item.name]} [env {env}; default {default!r}]"
        if item.name in BOOLEANS:  # --flag / --no-flag
            parser.add_argument(flag, dest=item.name, action=argparse.BooleanOptionalAction, default=default,
                                help=help_text)
        else:
            parser.add_argument(flag, dest=item.name, type=convert, default=default, choices=CHOICES.get(item.name),
                                help=help_text)
    return parser


def parse_config(argv: Sequence[str] | None, environ: Mapping[str, str]) -> ServerConfig:
    parser = build_parser(environ)
    values = vars(parser.parse_args(argv))
    if not values["model"]:
        parser.error("--model (or CHARSTREAM_MODEL) is required: the model directory to serve")
    for name in FLOATS:
        # float() accepts "nan" and "inf": a NaN TTL would expire every session at once.
        if not math.isfinite(values[name]):
            parser.error(f"--{name.replace('_', '-')} must be a finite number of seconds, got {values[name]}")
    for name, minimum in MINIMUM.items():
        value = values.get(name)
        if value is not None and value < minimum:
            parser.error(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")
    for name in ("session_ttl", "lease_seconds"):
        if values[name] <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0 seconds")
    store = values["session_store"]
    if store != "memory" and not store.startswith("redis://"):
        parser.error(f"--session-store must be memory or redis://HOST:PORT/DB, got {store!r}")
    if values["frontends"] > 1 and not values["engine_process"]:
        parser.error("--frontends above 1 needs --engine-process: the front-ends share the engine process")
    if values["frontends"] > 1 and store != "memory":
        parser.error("--frontends above 1 serves --session-store memory (the sessions live in the engine "
                     "process); with Redis, run several servers instead, each pointed at it")
    if bool(values["tls_cert"]) != bool(values["tls_key"]):
        parser.error("--tls-cert and --tls-key go together")
    if values["tls_client_ca"] and not values["tls_cert"]:
        parser.error("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    if values["port"] > 65535 or (values["metrics_port"] or 0) > 65535 or (values["http_port"] or 0) > 65535:
        parser.error("ports must be <= 65535")
    if values["http_cors"] is not None:
        try:
            cors_origins(values["http_cors"])
        except ValueError as exc:
            parser.error(f"--http-cors: {exc}")
    return ServerConfig(**values)


def cors_origins(setting: str | None) -> frozenset[str]:
    """The origins --http-cors allows ("*" alone: any); ValueError naming a malformed one."""
    origins = frozenset(part.strip().rstrip("/") for part in (setting or "").split(",") if part.strip())
    for origin in origins:
        scheme, sep, rest = origin.partition("://")
        if origin != "*" and (scheme not in ("http", "https") or not sep or not rest or "/" in rest):
            raise ValueError(f"{origin!r} is not an origin: expected * or scheme://host[:port], "
                             "e.g. http://localhost:8080")
    return origins


def describe(config: ServerConfig) -> dict[str, Any]:
    """The effective configuration, for the start-up log line."""
    return asdict(config)
