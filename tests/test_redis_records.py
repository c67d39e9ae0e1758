"""Leased, versioned, expiring session records against a real private redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import AsyncIterator

import pytest

from server.sessions.redis_records import (
    Leased,
    LeaseLost,
    RecordBusy,
    RecordNotFound,
    RecordStoreError,
    RedisRecords,
    RedisUnavailable,
)
from tests.redis_server import RedisServer, redis_server  # noqa: F401  (fixture)


@contextlib.asynccontextmanager
async def opened(url: str, ttl: float = 30.0, lease: float = 5.0, **kwargs: object) -> AsyncIterator[RedisRecords]:
    store = RedisRecords(url, ttl_seconds=ttl, lease_seconds=lease, **kwargs)
    try:
        yield store
    finally:
        await store.close()


def test_round_trip_versions_step_by_one(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        async with opened(redis_server.url) as store:
            await store.create("s1", b"\x00first")
            assert await store.read("s1") == (b"\x00first", 1, None)
            leased = await store.lease("s1", "A")
            assert leased == Leased(record=b"\x00first", version=1, holder="A")
            _, _, left = await store.read("s1")
            assert left is not None and 0 < left <= 5.0
            assert await store.write("s1", "A", 1, b"second") == 2
            assert await store.write("s1", "A", 2, b"third") == 3
            assert (await store.read("s1"))[:2] == (b"third", 3)
            await store.release("s1", "A")
            await store.release("s1", "A")  # already gone: no error
            assert await store.read("s1") == (b"third", 3, None)
            with pytest.raises(RecordStoreError, match="already exists"):
                await store.create("s1", b"again")
            assert (await store.lease("s1", "B")).record == b"third"

    asyncio.run(scenario())


def test_second_holder_busy_until_release_or_expiry(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        async with opened(redis_server.url, lease=0.3) as store:
            await store.create("s", b"r")
            await store.lease("s", "A")
            with pytest.raises(RecordBusy):
                await store.lease("s", "B")
            assert (await store.lease("s", "A")).version == 1  # the holder may re-take it
            await store.release("s", "B")  # not B's: must not free it
            with pytest.raises(RecordBusy):
                await store.lease("s", "B")
            await store.release("s", "A")
            await store.lease("s", "B")
            with pytest.raises(RecordBusy):
                await store.lease("s", "C")
            await asyncio.sleep(0.45)
            assert (await store.lease("s", "C")).holder == "C"

    asyncio.run(scenario())


def test_fencing_refuses_other_holders_and_the_holder_continues_after_a_lost_reply(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        async with opened(redis_server.url, lease=0.3) as store:
            await store.create("s", b"v1")
            a = await store.lease("s", "A")
            await asyncio.sleep(0.45)
            with pytest.raises(LeaseLost, match="expired"):
                await store.write("s", "A", a.version, b"from A, lease expired")
            b = await store.lease("s", "B")
            assert await store.write("s", "B", b.version, b"from B") == 2
            with pytest.raises(LeaseLost, match="another holder"):
                await store.write("s", "A", a.version, b"from A")
            with pytest.raises(LeaseLost, match="another holder"):
                await store.write("s", "A", 2, b"from A with the current version")
            assert (await store.read("s"))[:2] == (b"from B", 2)
            # The lease holder with a stale version: only its own write can have moved the version
            # (one whose reply was lost), so it continues from the current one.
            assert await store.write("s", "B", b.version, b"from B, the reply of version 2 lost") == 3
            assert (await store.read("s"))[:2] == (b"from B, the reply of version 2 lost", 3)

    asyncio.run(scenario())


def test_renew_keeps_lease_and_fails_once_lost(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        async with opened(redis_server.url, lease=0.3) as store:
            await store.create("s", b"r")
            await store.lease("s", "A")
            started = time.monotonic()
            while time.monotonic() - started < 0.8:
                assert await store.renew("s", "A") is True
                await asyncio.sleep(0.1)
            with pytest.raises(RecordBusy):
                await store.lease("s", "B")
            assert await store.write("s", "A", 1, b"still ours") == 2
            assert await store.renew("s", "B") is False
            await asyncio.sleep(0.45)
            assert await store.renew("s", "A") is False
            await store.lease("s", "B")
            assert await store.renew("s", "A") is False
            assert await store.renew("s", "B") is True
            assert await store.renew("missing", "B") is False

    asyncio.run(scenario())


def test_ttl_expires_untouched_sessions_and_lease_or_write_refresh(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        async with opened(redis_server.url, ttl=0.8, lease=0.6) as store:
            for session_id in ("read_only", "leased", "written"):
                await store.create(session_id, session_id.encode())
            await store.lease("written", "W")
            await asyncio.sleep(0.5)
            await store.read("read_only")  # a read is not use: no refresh
            await store.lease("leased", "L")
            assert await store.write("written", "W", 1, b"new") == 2
            await asyncio.sleep(0.5)
            with pytest.raises(RecordNotFound):
                await store.read("read_only")
            assert (await store.read("leased"))[0] == b"leased"
            assert (await store.read("written"))[:2] == (b"new", 2)
            await asyncio.sleep(1.0)
            for session_id in ("leased", "written"):
                with pytest.raises(RecordNotFound):
                    await store.read(session_id)
                with pytest.raises(RecordNotFound):
                    await store.lease(session_id, "X")

    asyncio.run(scenario())


def test_delete_refused_while_busy_then_gone(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        async with opened(redis_server.url) as store:
            await store.create("s", b"r")
            await store.lease("s", "A")
            with pytest.raises(RecordBusy):
                await store.delete("s")
            with pytest.raises(RecordBusy):
                await store.delete("s", "B")
            await store.delete("s", "A")
            with pytest.raises(RecordNotFound):
                await store.read("s")
            with pytest.raises(RecordNotFound):
                await store.delete("s")
            with pytest.raises(RecordNotFound):
                await store.write("s", "A", 1, b"late")
            await store.create("t", b"r")
            await store.delete("t")  # not leased: anyone may delete
            with pytest.raises(RecordNotFound):
                await store.lease("t", "A")

    asyncio.run(scenario())


def test_scan_ids_respects_prefix_and_limit(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        async with opened(redis_server.url, prefix="g*:") as store, opened(redis_server.url, prefix="gx:") as other:
            ids = {f"{n:032x}" for n in range(7)}
            for session_id in ids:
                await store.create(session_id, b"r")
            await other.create("f" * 32, b"r")
            assert set(await store.scan_ids(100)) == ids
            some = await store.scan_ids(3)
            assert len(some) == 3 and set(some) <= ids
            assert await store.scan_ids(0) == []
            assert await store.count() == 7
            assert await other.scan_ids(100) == ["f" * 32]

    asyncio.run(scenario())


def test_unreachable_redis_fails_fast_then_recovers(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        secret_url = redis_server.url.replace("redis://", "redis://user:s3cret@")
        async with opened(redis_server.url, timeout_seconds=1.0) as store, opened(secret_url) as secret:
            await store.create("s", b"r")
            redis_server.stop()
            calls = {
                "ping": lambda: store.ping(),
                "create": lambda: store.create("n", b"r"),
                "read": lambda: store.read("s"),
                "lease": lambda: store.lease("s", "A"),
                "renew": lambda: store.renew("s", "A"),
                "write": lambda: store.write("s", "A", 1, b"x"),
                "release": lambda: store.release("s", "A"),
                "delete": lambda: store.delete("s"),
                "scan_ids": lambda: store.scan_ids(10),
                "count": lambda: store.count(),
                "secret": lambda: secret.read("s"),
            }
            for name, call in calls.items():
                started = time.monotonic()
                with pytest.raises(RedisUnavailable) as caught:
                    await call()
                assert time.monotonic() - started < 3.0, name
                assert f"session store {redis_server.url} is unreachable: " in str(caught.value), name
                assert "s3cret" not in str(caught.value)
            redis_server.start()
            await store.ping()
            with pytest.raises(RecordNotFound):  # nothing persists across a restart
                await store.read("s")
            await store.create("s", b"again")
            assert (await store.lease("s", "A")).record == b"again"

    asyncio.run(scenario())


def test_racing_leases_have_exactly_one_winner(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        async with opened(redis_server.url) as store:
            await store.create("s", b"r")
            results = await asyncio.gather(
                *(store.lease("s", f"holder-{n}") for n in range(20)), return_exceptions=True
            )
            winners = [r for r in results if isinstance(r, Leased)]
            assert len(winners) == 1
            assert all(isinstance(r, RecordBusy) for r in results if not isinstance(r, Leased))
            _, _, left = await store.read("s")
            assert left is not None
            with pytest.raises(RecordBusy):
                await store.delete("s", "holder-none")
            await store.delete("s", winners[0].holder)

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:6379/0", "redis://:6379/0", "redis://h:notaport/0", "redis://h:6379/x", "redis://h:1/0?x=1"],
)
def test_bad_urls_are_refused_clearly(url: str) -> None:
    with pytest.raises(ValueError, match="redis://"):
        RedisRecords(url, ttl_seconds=1, lease_seconds=1)


def test_display_url_hides_credentials_and_settings_are_checked() -> None:
    store = RedisRecords("redis://u:pw@example.org:6380/3", ttl_seconds=1, lease_seconds=1)
    assert store.display_url == "redis://example.org:6380/3"
    for ttl, lease in ((0, 1), (1, 0), (-1, 1), (float("nan"), 1)):
        with pytest.raises(ValueError, match="positive"):
            RedisRecords("redis://127.0.0.1:6379/0", ttl_seconds=ttl, lease_seconds=lease)
    with pytest.raises(ValueError) as caught:
        RedisRecords("redis://u:s3cret@h:bad/0", ttl_seconds=1, lease_seconds=1)
    assert "s3cret" not in str(caught.value)
