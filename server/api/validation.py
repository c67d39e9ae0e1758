"""Request checks shared by the RPCs: each failure is a ServiceError naming the field and the fix."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import grpc

from server.api.errors import ServiceError
from server.engine.model.vocabulary import Vocabulary
from server.engine.sampling import SamplingSettings
from server.sessions.memory import SESSION_ID_PATTERN
from server.sessions.record_checks import FLOAT32_TINY

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@dataclass(frozen=True)
class Limits:
    max_chars: int = 10_000  # per Generate call or Converse turn
    max_prompt_chars: int = 10_000  # per prompt or turn text
    max_stops: int = 16
    max_stop_chars: int = 64


def check_session_id(session_id: str) -> str:
    if not session_id:
        raise ServiceError(INVALID, "session_id is empty: pass the id CreateSession returned")
    if not SESSION_ID_PATTERN.fullmatch(session_id):
        raise ServiceError(INVALID, f"session_id {session_id[:80]!r} is malformed: ids are 32 lowercase hex digits")
    return session_id


def check_text(vocab: Vocabulary, text: str, limits: Limits, field: str = "prompt") -> list[int]:
    """Token ids of `text`; INVALID_ARGUMENT naming any character the model does not know."""
    if len(text) > limits.max_prompt_chars:
        raise ServiceError(
            INVALID, f"{field} has {len(text)} characters; the limit is {limits.max_prompt_chars} per call"
        )
    unknown = vocab.unknown(text)
    if unknown:
        shown = ", ".join(repr(ch) for ch in unknown[:20]) + (" ..." if len(unknown) > 20 else "")
        raise ServiceError(
            INVALID,
            f"{field} contains {len(unknown)} character(s) outside the model's vocabulary: {shown} "
            "(GetModelInfo lists the vocabulary)",
        )
    return vocab.encode(text)


def check_max_chars(max_chars: int, limits: Limits) -> int:
    if not 1 <= max_chars <= limits.max_chars:
        raise ServiceError(INVALID, f"max_chars must be between 1 and {limits.max_chars}, got {max_chars}")
    return max_chars


def resolve_settings(message: Any, defaults: SamplingSettings) -> SamplingSettings:
    """Sampling settings from a message's optional temperature/top_k/top_p, unset ones from `defaults`."""
    temperature = message.temperature if message.HasField("temperature") else defaults.temperature
    top_k = message.top_k if message.HasField("top_k") else defaults.top_k
    top_p = message.top_p if message.HasField("top_p") else defaults.top_p
    if not math.isfinite(temperature) or temperature < 0:
        raise ServiceError(INVALID, f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if 0 < temperature < FLOAT32_TINY:
        # A subnormal float32: a session record (ExportSession, a shared store) could not hold it.
        raise ServiceError(INVALID, f"temperature must be 0 (greedy) or at least {FLOAT32_TINY:.4g}, "
                                    f"got {temperature}")
    if top_k < 0:
        raise ServiceError(INVALID, f"top_k must be >= 0 (0 = no limit), got {top_k}")
    if not (0.0 < top_p <= 1.0):
        raise ServiceError(INVALID, f"top_p must be in (0, 1] (1 = no limit), got {top_p}")
    return SamplingSettings(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))


def seed_of(message: Any) -> int | None:
    return int(message.seed) if message.HasField("seed") else None


def check_stops(stops: Any, vocab: Vocabulary, limits: Limits) -> tuple[str, ...]:
    stops = tuple(stops)
    if len(stops) > limits.max_stops:
        raise ServiceError(INVALID, f"at most {limits.max_stops} stop strings, got {len(stops)}")
    for stop in stops:
        if not stop:
            raise ServiceError(INVALID, "stop strings must not be empty")
        if len(stop) > limits.max_stop_chars:
            raise ServiceError(INVALID, f"stop strings are limited to {limits.max_stop_chars} characters")
        unknown = vocab.unknown(stop)
        if unknown:
            raise ServiceError(
                INVALID,
                f"stop string {stop!r} can never match: the model cannot generate {', '.join(map(repr, unknown))}",
            )
    return stops
