"""charstream-loadtest's workers: sessions driven at random, every character accounted for and checked.

A worker loops: create a session (random prompt from the model's vocabulary,
random seed, temperature 0 or 0.5..1.2), make random Generate calls (1..400
characters), cancelling some after a random number of received characters.
After each call it reads GetSession (consumed_chars, recent_text): after a
cancel that tells it the characters handed over that never reached it (the
session keeps them); after a normal end the session must hold exactly what was
received. Finally a reference session with the same prompt, seed and
temperature generates the same total in one call: it must equal, character for
character, what the worker's session holds. Both sessions are then deleted.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc

from protos.charstream.v1 import generator_pb2 as pb
from protos.charstream.v1 import generator_pb2_grpc as pb_grpc

MAX_PROMPT, MAX_CALL_CHARS, MAX_CALLS = 200, 400, 4  # few calls per session: sessions churn, references stay short
CANCEL_PROBABILITY = 0.3
GREEDY_PROBABILITY = 0.2
RECENT_CHARS = 256  # GetSession.recent_text holds this many of the last consumed characters
UNARY_TIMEOUT = 30.0
SETTLE_SECONDS = 10.0  # longest wait for a session to stop being busy after its stream ended


@dataclass
class LoadStats:
    """Counters of the whole run; `problems` describes the first failures."""

    sessions: int = 0
    sessions_checked: int = 0  # compared with a reference
    streams_started: int = 0
    finished: Counter = field(default_factory=Counter)  # finish reason -> streams
    cancelled: int = 0  # by the client, on purpose
    errors: Counter = field(default_factory=Counter)  # unexpected status code -> calls
    chars_received: int = 0
    handed_not_received: int = 0  # kept by the server at a cancel, learned from recent_text
    reference_streams: int = 0
    mismatches: int = 0
    lost_chars: int = 0
    repeated_chars: int = 0
    unfinished_workers: int = 0
    problems: list[str] = field(default_factory=list)

    def problem(self, text: str) -> None:
        if len(self.problems) < 20:  # the first few say enough
            self.problems.append(text)

    def check_text(self, reference: str, delivered: str, what: str) -> bool:
        """The session's text must be exactly the reference's."""
        if reference == delivered:
            return True
        self.mismatches += 1
        shorter = min(len(reference), len(delivered))
        at = next((i for i, (a, b) in enumerate(zip(reference, delivered)) if a != b), shorter)
        self.problem(f"{what}: text differs from the reference at {at} ({len(delivered)} vs {len(reference)} chars)")
        return False

    @property
    def failed(self) -> bool:
        return bool(self.mismatches or self.lost_chars or self.repeated_chars or self.errors or self.unfinished_workers)


@dataclass
class WorkerSession:
    session_id: str
    prompt: str
    seed: int
    temperature: float
    text: str = ""  # every generated character the session holds


class WorkerContext:
    """What every worker shares: the counters, call metadata and the model's vocabulary."""

    def __init__(self, info: pb.GetModelInfoResponse, api_key: str | None, call_timeout: float):
        self.stats = LoadStats()
        self.metadata = bearer(api_key)
        self.call_timeout = call_timeout
        self.vocab = list(info.vocabulary)
        # The server's limits bound a call, a prompt and (the reference's one call) a session's total.
        self.call_chars = max(1, min(MAX_CALL_CHARS, info.max_chars_limit))
        self.total_chars = max(1, info.max_chars_limit)
        self.prompt_chars = max(1, min(MAX_PROMPT, info.max_prompt_chars))


def bearer(api_key: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying the API key, if any."""
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


async def stream(ctx: WorkerContext, stub: pb_grpc.GeneratorStub, request: pb.GenerateRequest,
                 cut: int | None) -> tuple[str, str, bool]:
    """(received text, finish reason, cancelled by us); an unexpected status raises AioRpcError."""
    call = stub.Generate(request, timeout=ctx.call_timeout, metadata=ctx.metadata)
    received, reason = "", ""
    async for response in call:
        received += response.text
        if response.finish_reason:
            reason = pb.FinishReason.Name(response.finish_reason).removeprefix("FINISH_REASON_").lower()
        elif cut is not None and len(received) >= cut:
            call.cancel()
            code = await call.code()
            if code not in (grpc.StatusCode.CANCELLED, grpc.StatusCode.OK):
                ctx.stats.errors[code.name] += 1
            return received, "", True
    return received, reason, False


async def _settled(ctx: WorkerContext, stub: pb_grpc.GeneratorStub, session_id: str) -> pb.SessionInfo | None:
    """The session once it is no longer busy (the server notices an end within a step), or None."""
    give_up = time.monotonic() + SETTLE_SECONDS
    while True:
        reply = await stub.GetSession(pb.GetSessionRequest(session_id=session_id), timeout=UNARY_TIMEOUT,
                                      metadata=ctx.metadata)
        if not reply.session.busy:
            return reply.session
        if time.monotonic() > give_up:
            ctx.stats.errors["STILL_BUSY"] += 1
            ctx.stats.problem(f"session {session_id[:8]} still busy {SETTLE_SECONDS:.0f} s after its stream ended")
            return None
        await asyncio.sleep(0.01)


def account(stats: LoadStats, session: WorkerSession, info: pb.SessionInfo, received: str, cancelled: bool) -> bool:
    """Add a call's characters to the session's text, checked against what the server says it holds."""
    kept = info.consumed_chars - len(session.prompt)
    expected = len(session.text) + len(received)
    if kept < expected:  # the client got characters the session does not hold: a continuation repeats them
        stats.repeated_chars += expected - kept
        stats.problem(f"session {session.session_id[:8]} holds {kept} chars, {expected} were received")
        return False
    extra = kept - expected
    if extra and not cancelled:  # a stream that ended normally must have delivered everything it handed over
        stats.lost_chars += extra
        stats.problem(f"session {session.session_id[:8]}: {extra} chars consumed but never received")
        return False
    recent = info.recent_text
    missed = recent[len(recent) - extra:] if extra else ""
    whole = session.prompt + session.text + received + missed
    if extra > len(recent) or whole[-RECENT_CHARS:] != recent:
        stats.mismatches += 1
        stats.problem(f"session {session.session_id[:8]}: recent_text disagrees with the received text")
        return False
    stats.handed_not_received += extra
    session.text += received + missed
    return True


async def _call(ctx: WorkerContext, stub: pb_grpc.GeneratorStub, session: WorkerSession, rng: random.Random) -> bool:
    """One Generate on the session, maybe cancelled, then accounted."""
    chars = rng.randint(1, ctx.call_chars)
    cut = rng.randint(1, chars) if rng.random() < CANCEL_PROBABILITY else None
    ctx.stats.streams_started += 1
    received, reason, cancelled = await stream(
        ctx, stub, pb.GenerateRequest(session_id=session.session_id, max_chars=chars), cut)
    ctx.stats.chars_received += len(received)
    if cancelled:
        ctx.stats.cancelled += 1
    elif not reason:
        ctx.stats.errors["NO_FINISH_REASON"] += 1
        return False
    else:
        ctx.stats.finished[reason] += 1
        if reason == "length" and len(received) != chars:
            ctx.stats.mismatches += 1
            ctx.stats.problem(f"finish length after {len(received)} of {chars} chars")
            return False
    info = await _settled(ctx, stub, session.session_id)
    return info is not None and account(ctx.stats, session, info, received, cancelled)


async def _check(ctx: WorkerContext, stub: pb_grpc.GeneratorStub, session: WorkerSession, created: list[str]) -> None:
    """A fresh session with the same prompt, seed and temperature, in one uninterrupted call."""
    reply = await stub.CreateSession(pb.CreateSessionRequest(prompt=session.prompt, seed=session.seed,
                                     temperature=session.temperature), timeout=UNARY_TIMEOUT, metadata=ctx.metadata)
    created.append(reply.session_id)
    ctx.stats.reference_streams += 1
    request = pb.GenerateRequest(session_id=reply.session_id, max_chars=len(session.text))
    reference, reason, _ = await stream(ctx, stub, request, None)
    ctx.stats.sessions_checked += 1
    ctx.stats.check_text(reference, session.text, f"session {session.session_id[:8]} ({reason or 'no reason'})")


async def _one_session(ctx: WorkerContext, stub: pb_grpc.GeneratorStub, rng: random.Random, deadline: float) -> None:
    """A session's life: created, 1..MAX_CALLS calls (at least one), checked, deleted with its reference."""
    prompt = "".join(rng.choice(ctx.vocab) for _ in range(rng.randint(1, ctx.prompt_chars)))
    temperature = 0.0 if rng.random() < GREEDY_PROBABILITY else round(rng.uniform(0.5, 1.2), 3)
    seed = rng.getrandbits(64)
    reply = await stub.CreateSession(pb.CreateSessionRequest(prompt=prompt, seed=seed, temperature=temperature),
                                     timeout=UNARY_TIMEOUT, metadata=ctx.metadata)
    ctx.stats.sessions += 1
    session, created = WorkerSession(reply.session_id, prompt, seed, temperature), [reply.session_id]
    try:
        for _ in range(rng.randint(1, MAX_CALLS)):
            # The reference generates the session's total in one call: it must stay within the server's limit.
            if len(session.text) + ctx.call_chars > ctx.total_chars or (session.text and time.monotonic() > deadline):
                break
            if not await _call(ctx, stub, session, rng):
                return  # already counted; the session's text is no longer known exactly
        if session.text:
            await _check(ctx, stub, session, created)
    finally:
        for session_id in created:
            if await _settled(ctx, stub, session_id) is not None:
                await stub.DeleteSession(pb.DeleteSessionRequest(session_id=session_id), timeout=UNARY_TIMEOUT,
                                         metadata=ctx.metadata)


async def worker(ctx: WorkerContext, stub: pb_grpc.GeneratorStub, seed: int, deadline: float) -> None:
    """Sessions one after another until the deadline; an unexpected status is counted and the loop goes on."""
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        try:
            await _one_session(ctx, stub, rng, deadline)
        except grpc.aio.AioRpcError as exc:
            ctx.stats.errors[exc.code().name] += 1
            ctx.stats.problem(f"{exc.code().name}: {exc.details()}")
            await asyncio.sleep(0.1)  # a server in trouble is not hammered in a tight loop
