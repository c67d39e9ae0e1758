"""Choosing the next character from logits with a session's own settings and random stream.

One uniform number per sampled character, drawn from the session's generator
(inverse-CDF sampling): a session's text depends only on its seed, state and
settings, never on which other sessions share the batch. Greedy draws nothing.

The counter-based stream (stream_key / uniforms_at / RandomStream) makes the
uniform for draw n a pure function of (seed, n): SplitMix64's finaliser applied
to key + (n + 1) * golden-ratio gamma. Why a counter rather than a stateful
generator: a character that was generated but never delivered is undone by
winding the counter back, with no generator state to snapshot; a session's
numbers cannot depend on other sessions or on batch order, since nothing is
shared; and the session record needs only seed + position. It also vectorises:
one uint64 array expression serves a whole batch.

Two samplers: sample_tokens is the one the server runs (scheduler.py calls it
once per iteration for the whole batch, in one NumPy pass); choose_token is the
one-row reference implementation, which the server never calls. Tests hold
sample_tokens to it row by row (the very same token, bit for bit) and use it in
plain reference loops to compute the text a session must produce.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from server.engine import sampling_screen
from server.engine.sampling_screen import screen_uncut, worth_screening


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 1.0  # 0 = greedy argmax
    top_k: int = 0  # 0 = no limit
    top_p: float = 1.0  # 1 = no limit

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def samples_plainly(self, vocab_size: int) -> bool:
        """Samples with the temperature alone: neither greedy nor cut by top_k or top_p."""
        return not self.greedy and not 0 < self.top_k < vocab_size and self.top_p >= 1.0


DEFAULT_SETTINGS = SamplingSettings()


def choose_token(logits: np.ndarray, settings: SamplingSettings, uniform: float) -> int:
    """Token id for logits [V] given a uniform number in [0, 1); `uniform` is ignored when greedy.

    The reference definition, one row at a time; the server samples with
    sample_tokens, which must agree with it exactly. Greedy picks the first
    maximum (as numpy and torch argmax do). Otherwise softmax(logits /
    temperature) in float64, cut to the top_k most likely and then to the
    smallest most-likely set with mass >= top_p, renormalised.
    """
    if settings.greedy:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / settings.temperature  # [V]
    weights = np.exp(scaled - scaled.max())  # unnormalised probabilities, max = 1
    top_k = settings.top_k if 0 < settings.top_k < len(logits) else 0  # k >= V cuts nothing
    if top_k == 0 and settings.top_p >= 1.0:
        cdf = np.cumsum(weights)  # [V], in token-id order
        # searchsorted(cdf, u * total, "right") capped at V - 1, written as a count of cdf[:V-1] <= the
        # target: the same index for any real cdf, and 0 for a NaN one (odd logits), as every sampler.
        return int(np.count_nonzero(cdf[:-1] <= uniform * cdf[-1]))
    # Most likely first; ties keep token-id order so the cut is deterministic.
    order = np.argsort(-scaled, kind="stable")  # [V]
    sorted_weights = weights[order]
    keep = top_k or len(order)
    cdf = np.cumsum(sorted_weights[:keep])  # [keep]
    if settings.top_p < 1.0:
        # Smallest prefix whose share of the (top-k) mass reaches top_p.
        keep = min(keep, int(np.searchsorted(cdf / cdf[-1], settings.top_p, side="left")) + 1)
        cdf = cdf[:keep]
    index = min(int(np.searchsorted(cdf, uniform * cdf[-1], side="right")), keep - 1)
    return int(order[index])


# SplitMix64 constants. Arithmetic is done on uint64 *arrays*, which wrap
# silently modulo 2**64; numpy uint64 scalars would warn on overflow instead.
_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # 2**64 / golden ratio, odd
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on a uint64 array (a bijection with strong avalanche)."""
    z = (z ^ (z >> np.uint64(30))) * _MUL1
    z = (z ^ (z >> np.uint64(27))) * _MUL2
    return z ^ (z >> np.uint64(31))


def stream_key(seed: int) -> int:
    """64-bit stream key for a seed in [0, 2**64): mixed so nearby seeds give unrelated streams."""
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return int(_mix(np.array([seed], dtype=np.uint64))[0])


def uniforms_at(keys: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Uniform in [0, 1) at each (key, position): keys uint64 [B], positions [B] -> float64 [B]."""
    keys = np.atleast_1d(np.asarray(keys, dtype=np.uint64))  # [B]
    positions = np.atleast_1d(np.asarray(positions))
    if sampling_screen.COMPILED and keys.size > 1 and positions.shape == keys.shape:  # the same bits, one pass
        if positions.dtype not in (np.int64, np.uint64):
            positions = positions.astype(np.uint64)
        out = np.empty(keys.shape, np.float64)
        sampling_screen.uniforms_compiled(np.ascontiguousarray(keys), np.ascontiguousarray(positions), out)
        return out
    counters = positions.astype(np.uint64) + np.uint64(1)  # [B] (broadcasting against keys)
    bits = _mix(keys + counters * _GAMMA)  # [B], the SplitMix64 output for state key + n*gamma
    # Top 53 bits -> an exact double in [0, 1); never 1.0.
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53  # [B]


@dataclass
class RandomStream:
    """One session's counter-based stream: rewind by setting `position` back."""

    seed: int
    position: int = 0

    @property
    def key(self) -> int:
        return stream_key(self.seed)

    def next(self) -> float:
        """The uniform at the current position, then advance by one."""
        u = uniforms_at(np.array([self.key], dtype=np.uint64), np.array([self.position], dtype=np.uint64))
        self.position += 1
        return float(u[0])


def sample_tokens(
    logits: np.ndarray,
    temperature: np.ndarray,
    top_k: np.ndarray,
    top_p: np.ndarray,
    uniforms: np.ndarray,
) -> np.ndarray:
    """The server's sampler, every row at once: logits [B, V], per-row settings [B] -> token ids int64 [B].

    Row i gives exactly choose_token(logits[i], SamplingSettings(temperature[i],
    top_k[i], top_p[i]), uniforms[i]): the same float64 operations in the same
    order, so even ties and rounding land identically.
    """
    logits = np.asarray(logits)  # [B, V]
    temperature = np.asarray(temperature, dtype=np.float64)  # [B]
    vocab = logits.shape[1]
    tokens = np.argmax(logits, axis=1).astype(np.int64)  # [B]; greedy = first maximum of the raw logits
    rows = np.flatnonzero(temperature != 0.0)  # [S] rows that sample; greedy rows never divide by 0
    if rows.size == 0:
        return tokens
    scaled = logits[rows].astype(np.float64) / temperature[rows, None]  # [S, V]
    weights = np.exp(scaled - scaled.max(axis=1, keepdims=True))  # [S, V], max = 1
    k = np.asarray(top_k, dtype=np.int64)[rows]  # [S]
    p = np.asarray(top_p, dtype=np.float64)[rows]  # [S]
    keep = np.where((k > 0) & (k < vocab), k, vocab)  # [S]; k = 0 or k >= V keeps all
    cut = (keep < vocab) | (p < 1.0)  # [S]; the rest sample in token-id order
    u = np.asarray(uniforms, dtype=np.float64)[rows, None]  # [S, 1]
    if not cut.any():
        tokens[rows] = _inverse_cdf(weights, u[:, 0])
        return tokens
    columns = np.arange(vocab)  # [V]
    # Uncut rows keep token-id order; cut rows go most likely first (stable: ties in id order).
    order = np.tile(columns, (rows.size, 1))  # [S, V]
    order[cut] = np.argsort(-scaled[cut], axis=1, kind="stable")  # [C, V], sorted only where needed
    ordered = np.take_along_axis(weights, order, axis=1)  # [S, V]
    # Zero weights past the top-k cut: adding 0.0 leaves every prefix sum, and the total, unchanged.
    ordered[columns >= keep[:, None]] = 0.0
    cdf = np.cumsum(ordered, axis=1)  # [S, V]; sequential per row, as the 1-D cumsum
    # top_p: searchsorted(cdf / total, p, "left") = count strictly below p. Padded
    # entries equal total, so their share is exactly 1.0, never below a p < 1.
    below = np.sum(cdf / cdf[:, -1:] < p[:, None], axis=1)  # [S]
    keep = np.where(p < 1.0, np.minimum(keep, below + 1), keep)  # [S]
    total = np.take_along_axis(cdf, keep[:, None] - 1, axis=1)  # [S, 1], mass of the kept prefix
    target = u * total  # [S, 1]
    # searchsorted(cdf[:keep], target, "right") = count of kept entries <= target.
    index = np.sum((cdf <= target) & (columns < keep[:, None]), axis=1)  # [S]
    index = np.minimum(index, keep - 1)  # [S]; as choose_token: only u = 1.0 would overshoot
    tokens[rows] = np.take_along_axis(order, index[:, None], axis=1)[:, 0]
    return tokens


def sample_uncut(logits: np.ndarray, temperature: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """sample_tokens for rows that all sample with a temperature alone (temperature > 0, no top-k
    or top-p cut): logits [..., V], temperature broadcasting to [...], uniforms [...] -> token ids
    int64 [...] (a batch [B, V], or a stretch's draws [K, B, V] with the rows' temperatures [B]).

    The scheduler's path for the common case, and the check of every character a stretch
    graph drew (stretch.py): a few ufunc calls (no reduction wrappers, no reshapes), where
    small arrays spend more time in call overhead than in arithmetic, and more still right
    after a model call has pushed NumPy's code out of the caches. The same float64
    operations as sample_tokens (maximum.reduce is max, add.accumulate is cumsum), so the
    same tokens bit for bit. A float32 batch is screened in float32 first (any size with the
    compiled screen, from 128 rows with NumPy's), and only the rows the screen cannot prove are
    computed in float64 (sampling_screen.py): the same tokens."""
    logits = np.asarray(logits)
    if logits.ndim == 2 and logits.dtype == np.float32 and worth_screening(*logits.shape):
        temperature = np.asarray(temperature, np.float64)
        if temperature.shape != (len(logits),):  # (np.broadcast_to costs more than a [B] array's arithmetic)
            temperature = np.broadcast_to(temperature, (len(logits),))
        tokens, proven = screen_uncut(logits, temperature, uniforms)  # [B], [B]
        if not np.logical_and.reduce(proven):
            unproven = (~proven).nonzero()[0]  # [F]: 0.1-1% of the rows with NumPy's screen, ~0 compiled
            tokens[unproven] = _sample_uncut_float64(logits[unproven], temperature[unproven],
                                                     np.asarray(uniforms)[unproven])  # [F]
        return tokens
    return _sample_uncut_float64(logits, temperature, uniforms)


def _sample_uncut_float64(logits: np.ndarray, temperature: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """sample_uncut's float64 definition, every row computed (the reference's operations)."""
    if logits.ndim == 2 and len(logits) >= COLUMN_ROWS:
        return _sample_uncut_columns(logits, temperature, uniforms)
    # In place, one buffer: the same values as the expressions of sample_tokens, fewer allocations.
    weights = logits.astype(np.float64)  # [..., V]
    weights /= np.asarray(temperature, np.float64)[..., None]
    weights -= np.maximum.reduce(weights, axis=-1, keepdims=True)
    np.exp(weights, out=weights)  # [..., V], max = 1
    return _inverse_cdf(weights, uniforms)


COLUMN_ROWS = 128  # from this many rows sample_uncut works on the transposed batch (_sample_uncut_columns)


def _sample_uncut_columns(logits: np.ndarray, temperature: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """sample_uncut for a batch [B, V] laid out as [V, B]: the running sum and the reductions then
    go along the first axis, one vector operation over all B rows per vocabulary entry, where
    along the last axis NumPy loops over the rows (a third of the time at B = 1024). Every element
    sees the same float64 operations in the same order (the sum is still sequential over V for
    each row), so the tokens are the same bit for bit."""
    weights = np.array(logits.T, np.float64)  # [V, B], contiguous
    weights /= np.asarray(temperature, np.float64)
    weights -= np.maximum.reduce(weights, axis=0)
    np.exp(weights, out=weights)  # [V, B], max = 1 per column
    cdf = weights  # the running sum in place, one vector add per vocabulary entry: add.accumulate
    for v in range(1, len(cdf)):  # along axis 0 takes ~9x as long for the same sums (NumPy 2.x)
        np.add(cdf[v - 1], cdf[v], out=cdf[v])  # [B]
    # searchsorted(cdf, u * total, "right") capped at V - 1 = how many of cdf[:V-1] are <= u * total
    # (cdf is non-decreasing: when its last entry is <= the target, so are all the others).
    target = np.asarray(uniforms, np.float64) * cdf[-1]  # [B]
    return np.add.reduce(cdf[:-1] <= target, axis=0, dtype=np.int32).astype(np.int64)  # [B]


def sample_plain_row(logits: np.ndarray, temperature: float, uniform: float) -> int:
    """choose_token for one row that samples with a temperature alone: logits [V] -> token id.

    A batch of one, the common case of a lone stream, in a third of sample_uncut's time:
    the same float64 operations on one row, called as ufuncs (no reduction wrappers)."""
    weights = logits.astype(np.float64)  # [V]
    weights /= temperature
    weights -= np.maximum.reduce(weights)
    np.exp(weights, out=weights)  # max = 1
    cdf = np.add.accumulate(weights)  # [V], as np.cumsum
    return int(np.add.reduce(cdf[:-1] <= uniform * cdf[-1]))  # choose_token's count: 0 for a NaN cdf


def _inverse_cdf(weights: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Token-id order, no cut: weights [..., V], uniforms u [...] -> token ids int64 [...]. As
    choose_token's plain branch: searchsorted(cdf, u * total, "right") = how many cdf entries
    are <= u * total. Ufunc calls only (add.accumulate is cumsum): no reduction wrappers."""
    cdf = np.add.accumulate(weights, axis=-1)  # [..., V]; sequential per row, as the 1-D cumsum
    index = np.add.reduce(cdf <= u[..., None] * cdf[..., -1:], axis=-1, dtype=np.int64)  # [...]
    return np.minimum(index, weights.shape[-1] - 1)  # only u = 1.0 would overshoot


def uniform_at(key: int, position: int) -> float:
    """uniforms_at for one (key, position), in Python integers: for small batches, where NumPy's
    per-call overhead dominates. The same SplitMix64 bits, so the same double exactly."""
    mask = 2**64 - 1
    z = (key + (position + 1) * 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    z ^= z >> 31
    return (z >> 11) * 2.0**-53


SMALL_BATCH = 8  # up to this many rows, random numbers are drawn in Python integers (NumPy calls cost more)


def sample_batch(rows: Sequence[np.ndarray], settings: list[SamplingSettings], streams: list[tuple[int, int]],
                 all_plain: bool) -> tuple[list[int], list[int]]:
    """The scheduler's call: each row's logits [V] (a list, or an [R, V] array), settings and
    (stream key, position) -> (token ids, random numbers drawn: 0 greedy, else 1). `all_plain`:
    every row samples with its temperature alone (SamplingSettings.samples_plainly), so
    sample_uncut serves (sample_plain_row for a batch of one)."""
    if all_plain and len(streams) == 1:
        (key, position), = streams
        return [sample_plain_row(rows[0], settings[0].temperature, uniform_at(key, position))], [1]
    logits = np.stack(rows)  # [R, V]
    if len(streams) <= SMALL_BATCH:
        uniforms = np.array([uniform_at(key, position) for key, position in streams])  # [R]
    else:
        uniforms = uniforms_at(np.array([key for key, _ in streams], np.uint64),
                               np.array([position for _, position in streams], np.uint64))  # [R]
    temperature = np.array([s.temperature for s in settings], np.float64)  # [R]
    if all_plain:
        return sample_uncut(logits, temperature, uniforms).tolist(), [1] * len(settings)
    tokens = sample_tokens(logits, temperature, np.array([s.top_k for s in settings], np.int64),
                           np.array([s.top_p for s in settings], np.float64), uniforms)  # [R]
    return tokens.tolist(), [0 if s.greedy else 1 for s in settings]
