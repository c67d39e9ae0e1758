"""Session records in Redis, shared by several server replicas: bytes in, bytes out.

Each session is a hash ``{prefix}s:{id}`` (fields ``record``, ``version``,
``updated`` in unix ms) that expires after ``ttl_seconds`` of no use. Only one
replica may advance a session at a time: it takes a lease, a string
``{prefix}l:{id}`` holding the holder's token with a PX expiry, renews it while
streaming, and every write-back is a compare-and-set on both the lease and the
version. The version is the fencing token: a replica whose lease expired and was
taken over can never overwrite newer state, even if it still believes it holds
the lease.

Every check-then-act operation is one Lua script, so Redis runs it atomically
and no other client's command can fall between the check and the write.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterator
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from server.sessions import redis_scripts as scripts


class RecordStoreError(Exception):
    """Base of every error this module raises."""


class RecordNotFound(RecordStoreError):
    """No such session: it never existed, or it expired or was deleted."""


class RecordBusy(RecordStoreError):
    """Another holder has the lease on the session."""


class LeaseLost(RecordStoreError):
    """A write was refused: our lease expired or was taken, or the version moved on."""


class RedisUnavailable(RecordStoreError):
    """Redis could not be reached or did not answer in time."""


@dataclass(frozen=True)
class Leased:
    """A session's record as of the moment a lease on it was taken."""

    record: bytes = field(repr=False)
    version: int
    holder: str


_GLOB_SPECIALS = "\\*?[]"


def parse_redis_url(url: str) -> tuple[dict[str, Any], str]:
    """Connection arguments and a display form without credentials for redis://HOST:PORT/DB."""

    def refused(why: str) -> ValueError:
        return ValueError(f"session store URL {_safe(url)!r}: {why}expected redis://[user:password@]HOST:PORT/DB")

    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise refused("")
    if parts.query or parts.fragment:
        raise refused("options are not supported; ")
    try:
        port = parts.port or 6379
    except ValueError:
        raise refused("bad port; ") from None
    db_text = parts.path.lstrip("/") or "0"
    if not db_text.isdigit():
        raise refused("the database must be a number; ")
    host, db = parts.hostname, int(db_text)
    username, password = (unquote(v) if v else None for v in (parts.username, parts.password))
    kwargs = {"host": host, "port": port, "db": db, "username": username, "password": password}
    kwargs["ssl"] = parts.scheme == "rediss"
    shown_host = f"[{host}]" if ":" in host else host
    return kwargs, f"{parts.scheme}://{shown_host}:{port}/{db}"


def _safe(url: str) -> str:
    """The URL with any userinfo cut out, so a bad URL's error never shows a password."""
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}{rest.rpartition('@')[2]}" if sep else "<unparseable>"


def _positive_ms(name: str, seconds: float) -> int:
    if not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{name} must be a positive number of seconds, got {seconds!r}")
    return max(1, round(seconds * 1000))


def _check_text(name: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    return value


class RedisRecords:
    """Leased, versioned, expiring session records in one Redis database."""

    def __init__(
        self,
        url: str,
        ttl_seconds: float,
        lease_seconds: float,
        prefix: str = "charstream:",
        timeout_seconds: float = 2.0,
    ):
        kwargs, self._display_url = parse_redis_url(url)
        self._ttl_ms = _positive_ms("ttl_seconds", ttl_seconds)
        self._lease_ms = _positive_ms("lease_seconds", lease_seconds)
        # A held lease keeps its session alive, so a long lease never outlives its record.
        self._keep_ms = max(self._ttl_ms, self._lease_ms)
        _positive_ms("timeout_seconds", timeout_seconds)
        self._prefix = prefix
        self._match = "".join("\\" + c if c in _GLOB_SPECIALS else c for c in prefix) + "s:*"
        # No retries: a dead Redis must fail fast, and re-sending a write whose
        # reply was lost would turn our own successful write into a version conflict.
        # Stale pooled connections are still replaced: the pool reconnects them.
        self._client = aioredis.Redis(
            **kwargs,
            socket_timeout=timeout_seconds,
            socket_connect_timeout=timeout_seconds,
            retry=Retry(NoBackoff(), 0),
            decode_responses=False,
        )
        register = self._client.register_script
        self._create, self._read = register(scripts.CREATE), register(scripts.READ)
        self._lease = register(scripts.LEASE)
        self._renew, self._write = register(scripts.RENEW), register(scripts.WRITE)
        self._release, self._delete = register(scripts.RELEASE), register(scripts.DELETE)

    @property
    def display_url(self) -> str:
        """The store's URL without credentials, for messages and logs."""
        return self._display_url

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        """Turn the client's errors into this module's, naming the store but never a password."""
        try:
            yield
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            reason = str(exc) or type(exc).__name__
            raise RedisUnavailable(f"session store {self._display_url} is unreachable: {reason}") from exc
        except RedisError as exc:
            raise RecordStoreError(f"session store {self._display_url} failed: {exc}") from exc

    def _keys(self, session_id: str) -> list[str]:
        _check_text("session_id", session_id)
        return [f"{self._prefix}s:{session_id}", f"{self._prefix}l:{session_id}"]

    async def ping(self) -> None:
        with self._translated():
            await self._client.ping()

    async def create(self, session_id: str, record: bytes) -> None:
        keys = self._keys(session_id)
        with self._translated():
            created = await self._create(keys=keys[:1], args=[bytes(record), self._ttl_ms, int(time.time() * 1000)])
        if not created:
            raise RecordStoreError(f"session {session_id} already exists in {self._display_url}")

    async def read(self, session_id: str) -> tuple[bytes, int, float | None]:
        """Record, version and seconds left on a lease (None when not leased); no TTL refresh."""
        with self._translated():
            found = await self._read(keys=self._keys(session_id))
        if found is None:
            raise RecordNotFound(f"session {session_id} not found")
        record, version, lease_ms = found
        return bytes(record), int(version), (lease_ms / 1000 if lease_ms >= 0 else None)

    async def lease(self, session_id: str, holder: str) -> Leased:
        """Take (or re-take, for the same holder) the session's lease and refresh its TTL."""
        _check_text("holder", holder)
        with self._translated():
            reply = await self._lease(keys=self._keys(session_id), args=[holder, self._lease_ms, self._keep_ms])
        if reply[0] == -1:
            raise RecordNotFound(f"session {session_id} not found")
        if reply[0] == -2:
            raise RecordBusy(f"session {session_id} is in use by another holder for up to {reply[1] / 1000:.1f} s more")
        return Leased(record=bytes(reply[1]), version=int(reply[2]), holder=holder)

    async def renew(self, session_id: str, holder: str) -> bool:
        """Extend our lease (and the session's TTL); False when the lease or session is gone."""
        _check_text("holder", holder)
        with self._translated():
            renewed = await self._renew(keys=self._keys(session_id), args=[holder, self._lease_ms, self._keep_ms])
        return bool(renewed)

    async def write(self, session_id: str, holder: str, version: int, record: bytes) -> int:
        """Store `record` if `holder` still has the lease and the session is at `version`; the new version."""
        _check_text("holder", holder)
        args = [holder, int(version), bytes(record), self._keep_ms, int(time.time() * 1000)]
        with self._translated():
            reply = await self._write(keys=self._keys(session_id), args=args)
        if reply[0] == -1:
            raise RecordNotFound(f"session {session_id} not found")
        if reply[0] == -2:
            why = "another holder has taken it" if reply[1] else "it expired"
            raise LeaseLost(f"write to session {session_id} refused: the lease is no longer ours ({why})")
        if reply[0] == -3:
            # The lease is still ours (checked first), and a lease, once lost, never comes back
            # to the same holder token: every write since we took it was ours. So the version
            # moved because one of our writes succeeded after its reply was lost (a timeout):
            # continue from it.
            args[1] = int(reply[1])
            with self._translated():
                reply = await self._write(keys=self._keys(session_id), args=args)
            if reply[0] < 0:
                raise LeaseLost(f"write to session {session_id} refused (code {reply[0]}) after a lost reply")
        return int(reply[0])

    async def release(self, session_id: str, holder: str) -> None:
        """Give the lease back if it is still ours; a lease already gone is not an error."""
        _check_text("holder", holder)
        with self._translated():
            await self._release(keys=self._keys(session_id)[1:], args=[holder])

    async def delete(self, session_id: str, holder: str | None = None) -> None:
        """Delete the session unless someone other than `holder` has its lease."""
        if holder is not None:
            _check_text("holder", holder)
        with self._translated():
            result = await self._delete(keys=self._keys(session_id), args=[holder or ""])
        if result == -1:
            raise RecordNotFound(f"session {session_id} not found")
        if result == -2:
            raise RecordBusy(f"session {session_id} is in use by another holder")

    async def scan_ids(self, limit: int) -> list[str]:
        """Up to `limit` session ids via SCAN (never KEYS, which blocks Redis); a rehash may repeat one."""
        ids: list[str] = []
        if limit <= 0:
            return ids
        start = len(self._prefix) + 2
        with self._translated():
            async for key in self._client.scan_iter(match=self._match, count=max(limit, 100)):
                ids.append(key.decode("utf-8", "replace")[start:])
                if len(ids) >= limit:
                    break
        return ids

    async def count(self) -> int:
        """Number of sessions; approximate, as SCAN may see a key twice while Redis rehashes."""
        total = 0
        with self._translated():
            async for _ in self._client.scan_iter(match=self._match, count=1000):
                total += 1
        return total

    async def close(self) -> None:
        with self._translated():
            await self._client.aclose()
