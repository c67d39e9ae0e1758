"""Cache of recurrent state after a prompt prefix, so sessions can skip re-reading it.

A GRU's state after consuming a text from a zero state is small (hidden [L, H]
plus the logits [V] after the last character), while consuming a long prompt
costs one model step per character. Many sessions share a prompt prefix (a
system preamble, a few-shot header), so the engine keeps "state after text T"
and a new session whose prompt starts with a cached T starts from that state.

Only the engine thread touches the cache, so there are no locks.

Lookup finds the longest cached text that is a prefix of the query. Entries are
grouped by text length and the distinct lengths are kept sorted, so a lookup
probes one dict per distinct cached length no longer than the query, longest
first, instead of comparing the query against every entry or hashing every one
of its prefixes. Eviction is least recently used, bounded by a byte budget.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

# Charged per entry on top of the arrays and text: covers the dataclass, dict
# slots and array headers, so that many tiny entries still cost something.
ENTRY_OVERHEAD_BYTES = 128


@dataclass(frozen=True)
class CachedPrefix:
    """State after consuming `text` from a zero state. The arrays are read-only."""

    text: str
    hidden: np.ndarray  # [L, H] float32
    logits: np.ndarray  # [V] float32
    nbytes: int  # what this entry counts against the cache budget


def entry_nbytes(text: str, hidden: np.ndarray, logits: np.ndarray) -> int:
    """Budget charge of one entry: float32 arrays + UTF-8 text + a fixed overhead."""
    hidden_bytes = int(np.prod(np.shape(hidden), dtype=np.int64)) * 4
    logits_bytes = int(np.prod(np.shape(logits), dtype=np.int64)) * 4
    return hidden_bytes + logits_bytes + len(text.encode("utf-8")) + ENTRY_OVERHEAD_BYTES


def _frozen_copy(array: np.ndarray) -> np.ndarray:
    # A private contiguous copy: the caller keeps mutating its own state buffers
    # after inserting, and readers must not be able to corrupt a shared entry.
    out = np.array(array, dtype=np.float32, order="C", copy=True)
    out.flags.writeable = False
    return out


class PrefixCache:
    """Longest-prefix cache of recurrent state, LRU-evicted under a byte budget.

    max_bytes == 0 disables the cache: lookups miss and inserts do nothing.
    Texts shorter than min_chars are neither stored nor matched, since skipping
    a handful of characters is not worth an entry.
    """

    def __init__(self, max_bytes: int, min_chars: int = 1) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        if min_chars < 1:
            raise ValueError(f"min_chars must be >= 1, got {min_chars}")
        self.max_bytes = max_bytes
        self.min_chars = min_chars
        # All entries, least recently used first.
        self._lru: OrderedDict[str, CachedPrefix] = OrderedDict()
        # length -> {text: entry}; every dict here is non-empty.
        self._by_len: dict[int, dict[str, CachedPrefix]] = {}
        # Sorted distinct keys of _by_len.
        self._lengths: list[int] = []
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0

    @property
    def bytes(self) -> int:
        return self._bytes

    @property
    def entries(self) -> int:
        return len(self._lru)

    @property
    def hits(self) -> int:
        return self._hits

    @property
    def misses(self) -> int:
        return self._misses

    @property
    def evictions(self) -> int:
        return self._evictions

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, text: object) -> bool:
        """Exact membership; does not count as a lookup or refresh recency."""
        return text in self._lru

    def texts(self) -> list[str]:
        """Cached texts, least recently used first (for inspection and metrics)."""
        return list(self._lru)

    def lookup(self, text: str) -> CachedPrefix | None:
        """The longest cached text that is a prefix of `text` (or `text` itself).

        A hit becomes the most recently used entry. Counts one hit or one miss.
        """
        found = self._find_longest_prefix(text)
        if found is None:
            self._misses += 1
            return None
        self._lru.move_to_end(found.text)
        self._hits += 1
        return found

    def _find_longest_prefix(self, text: str) -> CachedPrefix | None:
        if len(text) < self.min_chars:
            return None
        # Only lengths <= len(text) can be prefixes; probe them longest first so
        # the first hit is the longest match.
        index = bisect.bisect_right(self._lengths, len(text))
        for length in reversed(self._lengths[:index]):
            entry = self._by_len[length].get(text[:length])
            if entry is not None:
                return entry
        return None

    def insert(self, text: str, hidden: np.ndarray, logits: np.ndarray) -> None:
        """Store copies of the state after `text`, then evict LRU entries to fit.

        Re-inserting a cached text replaces its state and makes it most recently
        used. An entry that alone exceeds max_bytes is not stored and, so that a
        useless insert cannot flush the cache, evicts nothing.
        """
        if self.max_bytes == 0 or len(text) < self.min_chars:
            return
        nbytes = entry_nbytes(text, hidden, logits)
        if nbytes > self.max_bytes:
            return
        entry = CachedPrefix(text=text, hidden=_frozen_copy(hidden), logits=_frozen_copy(logits), nbytes=nbytes)
        if text in self._lru:
            self._remove(text)
        self._add(entry)
        # The new entry is most recently used and fits alone, so it survives this.
        while self._bytes > self.max_bytes:
            oldest = next(iter(self._lru))
            self._remove(oldest)
            self._evictions += 1

    def clear(self) -> None:
        """Drop every entry; counters are kept, as they describe the cache's lifetime."""
        self._lru.clear()
        self._by_len.clear()
        self._lengths.clear()
        self._bytes = 0

    def _add(self, entry: CachedPrefix) -> None:
        length = len(entry.text)
        bucket = self._by_len.get(length)
        if bucket is None:
            bucket = self._by_len[length] = {}
            bisect.insort(self._lengths, length)
        bucket[entry.text] = entry
        self._lru[entry.text] = entry
        self._bytes += entry.nbytes

    def _remove(self, text: str) -> None:
        entry = self._lru.pop(text)
        length = len(text)
        bucket = self._by_len[length]
        del bucket[text]
        if not bucket:
            # Drop empty buckets so lookups never probe lengths with no entries.
            del self._by_len[length]
            del self._lengths[bisect.bisect_left(self._lengths, length)]
        self._bytes -= entry.nbytes
