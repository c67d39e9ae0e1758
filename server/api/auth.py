"""API keys: who is calling, from the `authorization: Bearer SECRET` metadata.

Keys file (--api-keys): one key per line as NAME:SECRET; `#` starts a comment
line, blank lines are skipped. NAME identifies the client in logs, metrics and
session ownership; SECRET never appears in logs, metrics or error messages.
A malformed file stops the server at start-up, naming the line.

Secrets are compared in constant time, against every key (the time taken does
not depend on which key, if any, matches). The caller's name is put in a
context variable for the duration of the call (`caller()`), so the session
layer can scope sessions to their owner without threading it through every
signature of the servicer.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import grpc

from server.api.errors import ServiceError

NAME_PATTERN = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
MIN_SECRET_CHARS = 16
BEARER = "bearer "

_caller: contextvars.ContextVar[str] = contextvars.ContextVar("charstream_caller", default="")


def caller() -> str:
    """The API key name of the call being served ("" when the server has no keys)."""
    return _caller.get()


class ApiKeysError(OSError):
    """The keys file cannot be used; the message names the file and line. An OSError so that
    charstream-serve reports it like other start-up problems (exit status 2)."""


@dataclass(frozen=True)
class ApiKey:
    name: str
    digest: bytes  # SHA-256 of the secret: equal-length values for the constant-time comparison


class ApiKeys:
    def __init__(self, keys: Iterable[ApiKey]):
        self.keys = tuple(keys)
        if not self.keys:
            raise ValueError("at least one API key is needed")

    @property
    def names(self) -> list[str]:
        return [key.name for key in self.keys]

    def identify(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
        """The name of the key whose secret the call's authorization metadata carries, or None."""
        presented = _bearer_token(metadata)
        if presented is None:
            return None
        digest = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest()
        found = None
        for key in self.keys:  # no early exit: every key is compared
            if hmac.compare_digest(digest, key.digest):
                found = key.name
        return found

    def authenticate(self, context: grpc.aio.ServicerContext) -> None:
        """Record the caller's key name for this call (caller()); UNAUTHENTICATED otherwise,
        without echoing anything the caller sent."""
        self.authenticate_metadata(context.invocation_metadata())

    def authenticate_metadata(
        self, metadata: Iterable[tuple[str, str | bytes]] | None
    ) -> contextvars.Token[str]:
        """As authenticate, from the metadata (gRPC) or headers (HTTP) themselves; the token undoes
        the recording (reset_caller), for a task that serves several calls one after another."""
        name = self.identify(metadata)
        if name is None:
            raise ServiceError(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or unknown API key: send 'authorization: Bearer <secret>' "
                "(gRPC metadata or HTTP header)",
            )
        return _caller.set(name)


def reset_caller(token: contextvars.Token[str]) -> None:
    """Forget the caller recorded by authenticate_metadata."""
    _caller.reset(token)


def _bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key.lower() != "authorization" or not isinstance(value, str):
            continue
        if value[: len(BEARER)].lower() == BEARER:
            return value[len(BEARER):].strip()
        return None
    return None


def parse_api_keys(text: str, where: str) -> ApiKeys:
    """Keys from the file's text; ApiKeysError naming `where` and the line on any defect."""
    keys: list[ApiKey] = []
    seen_names: set[str] = set()
    seen_digests: set[bytes] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, colon, secret = line.partition(":")
        name, secret = name.strip(), secret.strip()
        problem = None
        if not colon:
            problem = "expected NAME:SECRET"
        elif not NAME_PATTERN.fullmatch(name):
            problem = "NAME must be 1-64 letters, digits or _.@-"
        elif len(secret) < MIN_SECRET_CHARS or any(c.isspace() for c in secret):
            problem = f"SECRET must be at least {MIN_SECRET_CHARS} characters without spaces"
        elif name in seen_names:
            problem = f"the name {name} is used twice"
        digest = hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()
        if problem is None and digest in seen_digests:
            problem = "this secret is used twice"
        if problem is not None:
            # Never echo the line: it may hold a secret.
            raise ApiKeysError(f"{where}, line {number}: {problem}")
        seen_names.add(name)
        seen_digests.add(digest)
        keys.append(ApiKey(name, digest))
    if not keys:
        raise ApiKeysError(f"{where} holds no keys (expected NAME:SECRET lines)")
    return ApiKeys(keys)


def load_api_keys(path: str | Path) -> ApiKeys:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ApiKeysError(f"cannot read the API keys file {path}: {exc}") from exc
    return parse_api_keys(text, str(path))
