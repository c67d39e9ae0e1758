"""Assemble and run one server: engine, session store, gRPC service, health,
reflection and the metrics endpoint. Used by main.py and by BackgroundServer."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from protos.charstream.v1 import generator_pb2 as pb
from protos.charstream.v1 import generator_pb2_grpc as pb_grpc
from server.api.auth import ApiKeys, load_api_keys
from server.api.errors import ErrorInterceptor
from server.api.service import GeneratorService
from server.api.validation import Limits
from server.config import ServerConfig
from server.engine.prefix_cache import PrefixCache
from server.engine.runner.model_runner import ModelRunner, RunnerInfo, load_runner
from server.engine.runtime.engine_client import EngineClient
from server.engine.runtime.interface import GenerationEngine
from server.engine.runtime.loop import Engine
from server.engine.runtime.process import EngineProcess
from server.http.security import is_loopback_name
from server.metrics import MetricsEndpoint, ServerMetrics
from server.sessions.backend import LocalSessions, SessionBackend
from server.sessions.memory import SessionStore
from server.sessions.record import ModelFingerprint, file_sha256
from server.structured_log import log_event

if TYPE_CHECKING:  # both imported where they serve: TLS and HTTP are optional
    from server.api.tls import CertificateWatcher
    from server.http.front import HttpFrontEnd

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generator"].full_name  # "charstream.v1.Generator"
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
logger = logging.getLogger("charstream.server")


def is_loopback(host: str) -> bool:
    """Whether --host is this machine only (a host name other than localhost: assume it reaches beyond)."""
    return is_loopback_name(host)


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def model_info_message(info: RunnerInfo, config: ServerConfig) -> pb.GetModelInfoResponse:
    spec = info.spec
    return pb.GetModelInfoResponse(
        vocabulary=spec.vocab,
        vocab_size=spec.vocab_size,
        embedding_dim=spec.embedding_dim,
        hidden_size=spec.hidden_size,
        num_layers=spec.num_layers,
        model_file=info.model_file.path.name,
        variant=info.model_file.variant,
        execution_provider=info.provider,
        max_sessions=config.max_sessions,
        session_ttl_seconds=config.session_ttl,
        max_chars_limit=config.max_chars,
        max_prompt_chars=config.max_prompt_chars,
        variant_reason=info.model_file.reason,
        lookahead_chars=config.lookahead,
    )


class RunningServer:
    """A started server; `await stop(grace)` shuts it down gracefully."""

    def __init__(self, server: grpc.aio.Server, port: int, config: ServerConfig, engine: GenerationEngine,
                 service: GeneratorService, health: HealthServicer, metrics: ServerMetrics,
                 metrics_endpoint: MetricsEndpoint | None, sweeper: asyncio.Task, http: "HttpFrontEnd | None" = None):
        self.server = server
        self.port = port
        self.address = host_port(config.host, port)
        self.config = config
        self.engine = engine
        self.service = service
        self.health = health
        self.metrics = metrics
        self.metrics_endpoint = metrics_endpoint
        self._sweeper = sweeper
        self.http = http  # the HTTP front end (--http-port), or None

    async def stop(self, grace: float) -> None:
        """Stop accepting calls, end active streams with FINISH_REASON_SHUTDOWN, wait up to `grace` s."""
        log_event(logger, "shutdown_started", grace_seconds=grace, active_streams=self.service.active_streams)
        self.service.shutting_down.set()
        await self.health.enter_graceful_shutdown()  # health checks now say NOT_SERVING
        self.engine.drain()
        if self.http is not None:
            await asyncio.gather(self.server.stop(grace), self.http.stop())
        else:
            await self.server.stop(grace)
        self._sweeper.cancel()
        await self.service.store.close()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.engine.stop)
        if self.metrics_endpoint is not None:
            await loop.run_in_executor(None, self.metrics_endpoint.close)
        log_event(logger, "shutdown_complete")


def model_fingerprint(info: RunnerInfo) -> ModelFingerprint:
    """What a session record is tied to: the served file's digest, vocabulary and sizes."""
    spec = info.spec
    return ModelFingerprint(file_sha256(info.model_file.path), tuple(spec.vocab), spec.embedding_dim,
                            spec.hidden_size, spec.num_layers)


def build_sessions(config: ServerConfig, engine: GenerationEngine, local: SessionStore,
                   fingerprint: ModelFingerprint) -> SessionBackend:
    """The session backend --session-store asks for."""
    if config.session_store == "memory":
        return LocalSessions(local)
    from server.sessions.redis_records import (
        RedisRecords,  # the redis package is needed only here
    )
    from server.sessions.redis_store import RedisSessions

    records = RedisRecords(config.session_store, config.session_ttl, config.lease_seconds)
    return RedisSessions(records, local, engine, fingerprint, config.write_back_chars, config.lease_seconds)


# A client that vanishes without closing its connection (power loss, a cut cable) is
# noticed by keepalive pings: its streams end and its sessions are free again within
# about KEEPALIVE_TIME + KEEPALIVE_TIMEOUT. A killed process closes its sockets at once.
KEEPALIVE_TIME_MS = 20_000
KEEPALIVE_TIMEOUT_MS = 10_000


def server_options(config: ServerConfig, shared_port: bool = False) -> list[tuple[str, int]]:
    return [
        # gRPC binds with SO_REUSEPORT by default: a second server on a taken port would
        # silently share its traffic. Refuse instead, unless this is one of several front-ends
        # sharing the port on purpose (server/frontends/: the supervisor holds it reserved).
        ("grpc.so_reuseport", 1 if shared_port else 0),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def listen(server: grpc.aio.Server, config: ServerConfig, watcher: CertificateWatcher | None = None) -> int:
    """Bind the gRPC port, with TLS when --tls-cert is given (`watcher`: its files, shared with the
    HTTP port); returns the port (0: failed)."""
    address = host_port(config.host, config.port)
    if not config.tls_cert:
        return server.add_insecure_port(address)
    from server.api.tls import server_credentials

    credentials = server_credentials(config.tls_cert, config.tls_key or "", config.tls_client_ca, watcher)
    return server.add_secure_port(address, credentials)


def tls_watcher(config: ServerConfig) -> CertificateWatcher | None:
    """The watcher of the --tls-* files (None without TLS): one for both ports, so that a renewal
    is read, checked and logged once."""
    if not config.tls_cert:
        return None
    from server.api.tls import certificate_watcher

    return certificate_watcher(config.tls_cert, config.tls_key or "", config.tls_client_ca)


def build_engine(config: ServerConfig, runner: ModelRunner | None,
                 metrics: ServerMetrics) -> tuple[GenerationEngine, RunnerInfo]:
    """The engine (not started) and what it runs: in a process of its own with --engine-process
    (loading the model there), else a thread beside the event loop (on `runner`, loaded here
    unless given)."""
    if runner is None and config.engine_process:
        engine = EngineProcess(config.engine_params(), observer=metrics)
        if config.prefix_cache_bytes > 0:
            metrics.track_prefix_cache(engine.prefix_cache)
        return engine, engine.info
    if runner is None:
        runner = load_runner(config.model, config.variant, config.device, config.max_sessions, config.thread_settings())
    prefix_cache = PrefixCache(config.prefix_cache_bytes) if config.prefix_cache_bytes > 0 else None
    if prefix_cache is not None:
        metrics.track_prefix_cache(prefix_cache)
    engine = Engine(runner, config.max_batch, observer=metrics, lookahead=config.lookahead, prefix_cache=prefix_cache,
                    stretch=config.stretch, batch_stretch=config.batch_stretch)
    return engine, runner.info


def build_service(config: ServerConfig, engine: GenerationEngine, info: RunnerInfo, metrics: ServerMetrics,
                  sessions: SessionBackend | None = None) -> tuple[GeneratorService, ApiKeys | None]:
    """The session backend (unless given: a front-end's are the engine's) and servicer over
    `engine` (nothing started yet)."""
    api_keys = load_api_keys(config.api_keys) if config.api_keys else None
    if api_keys is None and not is_loopback(config.host):
        log_event(logger, "no_api_keys", logging.WARNING, host=config.host,
                  message="listening beyond loopback without --api-keys: anyone who can connect may use any session")
    fingerprint = model_fingerprint(info)
    if sessions is None:
        store = SessionStore(
            engine,
            config.max_sessions,
            config.session_ttl,
            on_removed=lambda reason: metrics.sessions_removed.labels(reason=reason).inc(),
            per_owner_limit=config.sessions_per_key if api_keys else None,
        )
        metrics.track_sessions(lambda: len(store))
        sessions = build_sessions(config, engine, store, fingerprint)
    limits = Limits(max_chars=config.max_chars, max_prompt_chars=config.max_prompt_chars)
    service = GeneratorService(engine, sessions, limits, metrics, model_info_message(info, config), fingerprint,
                               streams_per_key=config.streams_per_key if api_keys else None,
                               coalesce_streams=config.coalesce_streams)
    return service, api_keys


def build_grpc_server(config: ServerConfig, service: GeneratorService, metrics: ServerMetrics,
                      api_keys: ApiKeys | None, watcher: CertificateWatcher | None = None,
                      shared_port: bool = False) -> tuple[grpc.aio.Server, HealthServicer, int]:
    """The gRPC server with the Generator, health and reflection services, bound: (server, health, port)."""
    server = grpc.aio.server(
        interceptors=[ErrorInterceptor(f"/{SERVICE_NAME}/", metrics, api_keys.authenticate if api_keys else None)],
        options=server_options(config, shared_port),
    )
    pb_grpc.add_GeneratorServicer_to_server(service, server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection([SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME], server)
    try:
        port = listen(server, config, watcher)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {host_port(config.host, config.port)}: {exc}") from exc
    if port == 0:
        raise OSError(f"cannot listen on {host_port(config.host, config.port)} (address in use?)")
    return server, health, port


async def start_server(config: ServerConfig, runner: ModelRunner | None = None,
                       engine_path: str | None = None) -> RunningServer:
    """Load the model (unless `runner` is given), bind, and start serving. `engine_path`: serve as
    a front-end of the engine process listening there (server/frontends/), on a shared port."""
    metrics = ServerMetrics()
    sessions = None
    if engine_path is not None:
        from server.frontends.frontend import connect_engine

        engine, sessions = connect_engine(config, engine_path, metrics)
        info = engine.info
    else:
        engine, info = build_engine(config, runner, metrics)
    try:
        service, api_keys = build_service(config, engine, info, metrics, sessions)
        watcher = tls_watcher(config)
        server, health, port = build_grpc_server(config, service, metrics, api_keys, watcher,
                                                 shared_port=engine_path is not None)
    except BaseException:
        if isinstance(engine, EngineClient):
            engine.stop()  # the child is running already (or this front-end's link open); a thread has not started
        raise
    engine.start()
    await server.start()
    await health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    http = None
    if config.http_port is not None:
        from server.http.front import (
            start_http,  # aiohttp is imported only where it serves
        )

        try:
            http = await start_http(config, service, health, metrics, api_keys, is_loopback(config.host), watcher,
                                    shared_port=engine_path is not None)
        except BaseException:  # the port is taken, say: nothing of this server may stay behind
            await server.stop(0)
            await service.store.close()
            await asyncio.get_running_loop().run_in_executor(None, engine.stop)
            raise
    endpoint = None
    if config.metrics_port is not None:
        endpoint = metrics.serve(config.metrics_host or config.host, config.metrics_port)

    async def set_serving(serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        if not service.shutting_down.is_set():
            await health.set(SERVICE_NAME, status)

    # Expiry sweeps, and for a shared store its leases and health.
    sweeper = asyncio.create_task(service.store.run_background(set_serving))
    if isinstance(engine, EngineClient):
        # Without its engine the server can only refuse: health checks say so, so that a load
        # balancer or an orchestrator moves traffic away and restarts it.
        loop = asyncio.get_running_loop()
        engine.on_gone = lambda: loop.call_soon_threadsafe(
            lambda: asyncio.ensure_future(health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)))
    running = RunningServer(server, port, config, service.engine, service, health, metrics, endpoint, sweeper, http)
    log_event(
        logger,
        "listening",
        address=running.address,
        provider=info.provider,
        engine="front-end" if engine_path else "process" if isinstance(engine, EngineProcess) else "thread",
        metrics=host_port(config.metrics_host or config.host, endpoint.port) if endpoint else "off",
        http=http.url if http else "off",
    )
    return running
