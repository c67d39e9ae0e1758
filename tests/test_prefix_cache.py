"""Tests for server.engine.prefix_cache: longest-prefix lookup, LRU byte budget, copies."""

from __future__ import annotations

import random
from collections import OrderedDict

import numpy as np
import pytest

from server.engine.prefix_cache import (
    ENTRY_OVERHEAD_BYTES,
    CachedPrefix,
    PrefixCache,
    entry_nbytes,
)

HIDDEN_SHAPE = (1, 8)
VOCAB = 5
ARRAYS_BYTES = (8 + VOCAB) * 4


def state(seed: float) -> tuple[np.ndarray, np.ndarray]:
    hidden = np.full(HIDDEN_SHAPE, seed, dtype=np.float32)
    logits = np.arange(VOCAB, dtype=np.float32) + seed
    return hidden, logits


def cost(text: str) -> int:
    return ARRAYS_BYTES + len(text.encode("utf-8")) + ENTRY_OVERHEAD_BYTES


def put(cache: PrefixCache, text: str, seed: float = 0.0) -> None:
    cache.insert(text, *state(seed))


def looked_up(cache: PrefixCache, text: str) -> str | None:
    found = cache.lookup(text)
    return None if found is None else found.text


# --- longest-prefix matching -------------------------------------------------


def test_longest_prefix_wins():
    cache = PrefixCache(max_bytes=10_000)
    for i, text in enumerate(["Th", "The quick", "The", "The q", "Thx"]):
        put(cache, text, seed=float(i))
    found = cache.lookup("The quick brown fox")
    assert found is not None
    assert found.text == "The quick"
    assert found.hidden[0, 0] == 1.0  # the state stored with "The quick"
    assert looked_up(cache, "The qu") == "The q"
    assert looked_up(cache, "The") == "The"
    assert looked_up(cache, "Thy") == "Th"


def test_exact_full_match():
    cache = PrefixCache(max_bytes=10_000)
    put(cache, "hello", seed=3.0)
    found = cache.lookup("hello")
    assert isinstance(found, CachedPrefix)
    assert found.text == "hello"
    np.testing.assert_array_equal(found.logits, state(3.0)[1])


def test_text_differing_in_last_char_misses():
    cache = PrefixCache(max_bytes=10_000)
    put(cache, "hello")
    assert cache.lookup("hellx") is None
    assert cache.lookup("hellx and more") is None


def test_cached_text_longer_than_query_misses():
    cache = PrefixCache(max_bytes=10_000)
    put(cache, "hello world")
    assert cache.lookup("hello") is None
    assert cache.lookup("") is None


def test_min_chars_is_respected_for_insert_and_lookup():
    cache = PrefixCache(max_bytes=10_000, min_chars=3)
    put(cache, "ab")
    assert cache.entries == 0 and cache.bytes == 0
    put(cache, "abc")
    assert cache.entries == 1
    assert cache.lookup("ab") is None
    assert looked_up(cache, "abcd") == "abc"


def test_many_lengths_brute_force_agreement():
    rng = random.Random(7)
    cache = PrefixCache(max_bytes=10**9)
    cached = {"".join(rng.choice("ab") for _ in range(rng.randint(1, 12))) for _ in range(200)}
    for text in cached:
        put(cache, text)
    for _ in range(300):
        query = "".join(rng.choice("ab") for _ in range(rng.randint(0, 14)))
        matches = [t for t in cached if query.startswith(t)]
        assert looked_up(cache, query) == (max(matches, key=len) if matches else None)


# --- LRU eviction by bytes ---------------------------------------------------


def test_insert_evicts_least_recently_inserted_first():
    cache = PrefixCache(max_bytes=3 * cost("a"))
    for text in ["a", "b", "c"]:
        put(cache, text)
    put(cache, "d")
    assert cache.texts() == ["b", "c", "d"]
    assert cache.evictions == 1
    assert cache.bytes == 3 * cost("a")


def test_lookup_refreshes_recency():
    cache = PrefixCache(max_bytes=3 * cost("a"))
    for text in ["a", "b", "c"]:
        put(cache, text)
    assert looked_up(cache, "a") == "a"
    put(cache, "d")
    assert cache.texts() == ["c", "a", "d"]
    assert "b" not in cache


def test_eviction_frees_enough_bytes_for_a_bigger_entry():
    big = "x" * 40
    cache = PrefixCache(max_bytes=3 * cost("a") + 10)
    for text in ["a", "b", "c"]:
        put(cache, text)
    put(cache, big)  # needs room of one small entry plus 39 more bytes
    assert cache.texts() == ["c", big]
    assert cache.evictions == 2
    assert cache.bytes == cost("c") + cost(big) <= cache.max_bytes


def test_reinsert_replaces_and_refreshes_without_eviction():
    cache = PrefixCache(max_bytes=2 * cost("a"))
    put(cache, "a", seed=1.0)
    put(cache, "b")
    put(cache, "a", seed=9.0)
    assert cache.texts() == ["b", "a"]
    assert cache.entries == 2 and cache.evictions == 0
    assert cache.bytes == 2 * cost("a")
    assert cache.lookup("a").hidden[0, 0] == 9.0


def test_oversize_entry_is_not_stored_and_evicts_nothing():
    cache = PrefixCache(max_bytes=2 * cost("a"))
    put(cache, "a")
    put(cache, "b")
    huge = np.zeros((1, 1000), dtype=np.float32)
    cache.insert("c", huge, state(0.0)[1])
    assert cache.texts() == ["a", "b"]
    assert cache.evictions == 0
    assert cache.lookup("c") is None


def test_entry_exactly_at_budget_is_stored():
    cache = PrefixCache(max_bytes=cost("abc"))
    put(cache, "abc")
    assert cache.entries == 1 and cache.bytes == cache.max_bytes


class ReferenceLRU:
    """Plain reference: linear scans over an OrderedDict of text -> nbytes."""

    def __init__(self, max_bytes: int, min_chars: int):
        self.max_bytes, self.min_chars = max_bytes, min_chars
        self.items: OrderedDict[str, int] = OrderedDict()
        self.evictions = self.hits = self.misses = 0

    def insert(self, text: str, nbytes: int) -> None:
        if self.max_bytes == 0 or len(text) < self.min_chars or nbytes > self.max_bytes:
            return
        self.items.pop(text, None)
        self.items[text] = nbytes
        while sum(self.items.values()) > self.max_bytes:
            self.items.popitem(last=False)
            self.evictions += 1

    def lookup(self, text: str) -> str | None:
        matches = [t for t in self.items if text.startswith(t) and len(t) >= self.min_chars]
        if not matches:
            self.misses += 1
            return None
        best = max(matches, key=len)
        self.items.move_to_end(best)
        self.hits += 1
        return best


@pytest.mark.parametrize("seed", range(6))
def test_randomized_against_reference(seed):
    rng = random.Random(seed)
    max_bytes = rng.choice([0, 300, 700, 1500])
    min_chars = rng.choice([1, 2])
    cache, ref = PrefixCache(max_bytes, min_chars), ReferenceLRU(max_bytes, min_chars)
    alphabet = "ab\u00e9\u20ac"  # 1-, 2- and 3-byte UTF-8 characters
    for _ in range(1500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))
        if rng.random() < 0.5:
            hidden = np.zeros((1, rng.choice([1, 8, 60])), dtype=np.float32)
            logits = np.zeros(VOCAB, dtype=np.float32)
            cache.insert(text, hidden, logits)
            ref.insert(text, entry_nbytes(text, hidden, logits))
        else:
            assert looked_up(cache, text) == ref.lookup(text)
        assert cache.bytes <= max_bytes
        assert cache.bytes == sum(ref.items.values())
        assert cache.texts() == list(ref.items)
    assert (cache.hits, cache.misses, cache.evictions) == (ref.hits, ref.misses, ref.evictions)
    if max_bytes >= 700:
        assert cache.evictions > 0  # the run really exercised eviction


# --- copies and read-only arrays ---------------------------------------------


def test_stored_arrays_are_copies():
    cache = PrefixCache(max_bytes=10_000)
    hidden, logits = state(1.0)
    cache.insert("abc", hidden, logits)
    hidden[:] = 42.0
    logits[:] = 42.0
    found = cache.lookup("abc")
    np.testing.assert_array_equal(found.hidden, state(1.0)[0])
    np.testing.assert_array_equal(found.logits, state(1.0)[1])


def test_stored_arrays_are_read_only_float32():
    cache = PrefixCache(max_bytes=10_000)
    cache.insert("abc", np.ones(HIDDEN_SHAPE, dtype=np.float64), np.ones(VOCAB, dtype=np.float32))
    found = cache.lookup("abc")
    assert found.hidden.dtype == np.float32 and found.logits.dtype == np.float32
    assert not found.hidden.flags.writeable and not found.logits.flags.writeable
    with pytest.raises(ValueError):
        found.hidden[0, 0] = 5.0
    with pytest.raises(ValueError):
        found.logits[0] = 5.0


# --- counters, disabling, clear ----------------------------------------------


def test_hit_and_miss_counters():
    cache = PrefixCache(max_bytes=10_000)
    put(cache, "ab")
    cache.lookup("abc")
    cache.lookup("abd")
    cache.lookup("x")
    assert (cache.hits, cache.misses, cache.evictions) == (2, 1, 0)


def test_zero_budget_disables_cache():
    cache = PrefixCache(max_bytes=0)
    put(cache, "abc")
    assert cache.entries == 0 and cache.bytes == 0
    assert cache.lookup("abc") is None
    assert cache.misses == 1 and cache.evictions == 0


def test_clear_empties_cache():
    cache = PrefixCache(max_bytes=10_000)
    put(cache, "ab")
    put(cache, "abc")
    cache.clear()
    assert cache.entries == 0 and cache.bytes == 0 and len(cache) == 0
    assert cache.lookup("abcd") is None
    put(cache, "ab")
    assert looked_up(cache, "abcd") == "ab"


def test_invalid_arguments_rejected():
    with pytest.raises(ValueError):
        PrefixCache(max_bytes=-1)
    with pytest.raises(ValueError):
        PrefixCache(max_bytes=10, min_chars=0)


# --- byte accounting ---------------------------------------------------------


def test_unicode_text_counts_utf8_bytes():
    cache = PrefixCache(max_bytes=10_000)
    text = "h\u00e9\u20ac\U0001f600"  # 1 + 2 + 3 + 4 bytes in UTF-8, 4 characters
    put(cache, text)
    found = cache.lookup(text + "!")
    assert found.text == text
    assert found.nbytes == ARRAYS_BYTES + 10 + ENTRY_OVERHEAD_BYTES
    assert cache.bytes == found.nbytes


def test_unicode_bytes_drive_eviction():
    wide = "\u20ac" * 4  # 12 bytes, 4 characters
    cache = PrefixCache(max_bytes=cost("aaaa") + cost(wide) - 1)
    put(cache, "aaaa")
    put(cache, wide)  # would fit if characters were counted instead of bytes
    assert cache.texts() == [wide]
    assert cache.evictions == 1
