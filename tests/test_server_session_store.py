"""Session store: ids, TTL expiry, LRU eviction, busy sessions and why a session is gone."""

from __future__ import annotations

import re

import pytest

from server.engine.sampling import SamplingSettings
from server.sessions.memory import SessionBusy, SessionNotFound, SessionStore, StoreFull


class RecordingEngine:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def open_slot(self, slot: int, seed: int, prompt_tokens: list[int]) -> None:
        self.calls.append(("open", slot, seed, list(prompt_tokens)))

    def reset_slot(self, slot: int, seed: int | None, prompt_tokens: list[int]) -> None:
        self.calls.append(("reset", slot, seed, list(prompt_tokens)))

    def close_slot(self, slot: int) -> None:
        self.calls.append(("close", slot))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_store(max_sessions: int = 3, ttl: float = 10.0, remember: int = 100):
    engine, clock, removed = RecordingEngine(), Clock(), []
    store = SessionStore(engine, max_sessions, ttl, clock=clock, remember=remember, on_removed=removed.append)
    return store, engine, clock, removed


def test_ids_are_128_bit_hex_and_slots_are_opened() -> None:
    store, engine, _, _ = make_store()
    a = store.create(SamplingSettings(), seed=7, prompt_tokens=[1, 2])
    b = store.create(SamplingSettings(), seed=8, prompt_tokens=[])
    assert re.fullmatch(r"[0-9a-f]{32}", a.id) and a.id != b.id
    assert engine.calls == [("open", 0, 7, [1, 2]), ("open", 1, 8, [])]
    assert a.consumed_chars == 2


def test_idle_session_expires_after_ttl_and_says_so() -> None:
    store, engine, clock, removed = make_store(ttl=10.0)
    session = store.create(SamplingSettings(), 1, [])
    clock.now += 9.0
    assert store.get(session.id) is session
    clock.now += 1.5
    with pytest.raises(SessionNotFound, match="expired after 10 s"):
        store.get(session.id)
    assert ("close", session.slot) in engine.calls and removed == ["expired"]


def test_busy_session_does_not_expire_and_idle_time_restarts_on_release() -> None:
    store, _, clock, _ = make_store(ttl=10.0)
    session = store.acquire(store.create(SamplingSettings(), 1, []).id)
    clock.now += 100.0
    assert store.get(session.id) is session
    store.release(session)
    clock.now += 5.0
    assert store.get(session.id) is session


def test_full_store_evicts_least_recently_used_idle_session() -> None:
    store, _, clock, removed = make_store(max_sessions=2)
    old = store.create(SamplingSettings(), 1, [])
    clock.now += 1
    newer = store.create(SamplingSettings(), 2, [])
    clock.now += 1
    store.release(store.acquire(old.id))  # use `old`: `newer` is now least recently used
    third = store.create(SamplingSettings(), 3, [])
    assert third.slot == newer.slot
    with pytest.raises(SessionNotFound, match="evicted: the server holds at most 2 sessions"):
        store.get(newer.id)
    assert store.get(old.id) is old and removed == ["evicted"]


def test_busy_sessions_are_never_evicted_and_a_full_busy_store_refuses() -> None:
    store, _, _, _ = make_store(max_sessions=1)
    busy = store.acquire(store.create(SamplingSettings(), 1, []).id)
    with pytest.raises(StoreFull, match="all 1 sessions are busy"):
        store.create(SamplingSettings(), 2, [])
    assert store.get(busy.id) is busy


def test_second_acquire_is_refused_while_busy() -> None:
    store, _, _, _ = make_store()
    session = store.acquire(store.create(SamplingSettings(), 1, []).id)
    with pytest.raises(SessionBusy, match="busy with another Generate call"):
        store.acquire(session.id)
    with pytest.raises(SessionBusy):
        store.delete(session.id)
    store.release(session)
    assert store.acquire(session.id) is session


def test_deleted_and_unknown_ids_have_distinct_messages_and_memory_is_bounded() -> None:
    store, _, _, _ = make_store(max_sessions=10, remember=2)
    ids = [store.create(SamplingSettings(), i, []).id for i in range(3)]
    for session_id in ids:
        store.delete(session_id)
    with pytest.raises(SessionNotFound, match="was deleted"):
        store.get(ids[2])
    with pytest.raises(SessionNotFound, match="not found on this server"):
        store.get(ids[0])  # forgotten: only the 2 most recent removals are remembered
    with pytest.raises(SessionNotFound, match="not found on this server"):
        store.get("0" * 32)


def test_reset_reopens_state_and_sessions_list_most_recent_first() -> None:
    store, engine, clock, _ = make_store()
    a = store.create(SamplingSettings(), 1, [])
    clock.now += 1
    b = store.create(SamplingSettings(), 2, [])
    clock.now += 1
    store.reset(a.id, seed=5, prompt_tokens=[3])
    assert engine.calls[-1] == ("reset", a.slot, 5, [3]) and a.consumed_chars == 1
    assert [s.id for s in store.sessions()] == [a.id, b.id]


def test_per_owner_limit_evicts_the_owners_own_idle_session_and_refuses_when_all_busy() -> None:
    engine, clock, removed = RecordingEngine(), Clock(), []
    store = SessionStore(engine, 10, 100.0, clock=clock, on_removed=removed.append, per_owner_limit=2)
    other = store.create(SamplingSettings(), 1, [], owner="bob")
    first = store.create(SamplingSettings(), 1, [], owner="alice")
    clock.now += 1
    second = store.create(SamplingSettings(), 1, [], owner="alice")
    clock.now += 1
    third = store.create(SamplingSettings(), 1, [], owner="alice")  # alice's oldest idle one goes
    assert {s.id for s in store.sessions("alice")} == {second.id, third.id}
    assert store.get(other.id, "bob") is other and removed == ["evicted"]
    with pytest.raises(SessionNotFound, match="--max-sessions-per-key"):
        store.get(first.id, "alice")
    store.acquire(second.id, "alice")
    store.acquire(third.id, "alice")
    with pytest.raises(StoreFull, match="alice holds its limit of 2 sessions"):
        store.create(SamplingSettings(), 1, [], owner="alice")
    bobs = store.create(SamplingSettings(), 1, [], owner="bob")  # bob is not limited by alice
    assert store.get(bobs.id, "bob") is bobs and removed == ["evicted"]  # and his session took nothing


def test_another_owners_session_is_indistinguishable_from_an_unknown_one() -> None:
    store, _, _, _ = make_store()
    session = store.create(SamplingSettings(), 1, [], owner="alice")
    with pytest.raises(SessionNotFound) as theirs:
        store.get(session.id, "bob")
    with pytest.raises(SessionNotFound) as unknown:
        store.get("f" * 32, "bob")
    assert str(theirs.value) == str(unknown.value).replace("f" * 32, session.id)
    store.delete(session.id, owner="alice")
    with pytest.raises(SessionNotFound, match="was deleted"):
        store.get(session.id, "alice")
    with pytest.raises(SessionNotFound, match="not found on this server"):
        store.get(session.id, "bob")  # why it is gone is for its owner only
