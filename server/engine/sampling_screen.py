"""A float32 screen for the float64 sampler: which rows' draws it already knows, exactly.

sampling.sample_uncut (the server's sampler for plain-temperature rows, and the check of
every character a stretch graph drew) computes, per row, in float64:

    s = x / T;  w = exp(s - max s);  c = cumsum(w);  token = #{j < V-1 : c[j] <= u * c[V-1]}

and the project's rule is that every draw equals that float64 result bit for bit. Over a
large batch those [B, V] float64 passes are most of an iteration's per-row cost (at B = 1024,
V = 65: 8 passes over 66k doubles). The screen runs the same arithmetic in float32 (half the
bytes, twice the SIMD lanes) and proves, row by row, that the float64 result is the token it
found: the token is decided by which two cdf entries the target falls between, and where the
target is further from both than the two computations can differ, both pick the same token.
The rows it cannot prove (a target within about 2^-14 of a boundary, relative, or odd input)
are left to the float64 path, so every token is the float64 one.

Why the margin is safe. C[j] and tau = u * C[V-1] are the exact real values for the row's
float32 logits x and float64 temperature T; D is the row's spread, min(-min d32, 88).

  float32 side, computed as d = fl(fl(x - max x) * fl(1 / T)), e = exp(d), c = running sum:
  - d is (x - max x) / T times three roundings: |d32 - d| <= |d| * 3.0001 * 2^-24.
  - exp32's relative error is at most 2^-21 (8 ULP) for normal results (NumPy's kernels are
    within 4 ULP; tests/test_sampling_screen.py checks this build densely, and the whole range
    [-104, 0] was checked exhaustively: 3.6 ULP). A normal result has |d| <= 87.4, and
    |d| <= D(1 + 2^-22) anyway, so e = W * (1 + r) with |r| <= D * 3.001 * 2^-24 + 2^-21; a
    result below 2^-126 is within 2^-124 of W (absolute; flushed subnormals too, if a thread
    flushes them): A = 2^-110 covers V of those.
  - the blocked running sum adds each term through at most h = b + K - 1 roundings (b entries
    per block, K blocks): with non-negative terms, within gamma_h = h * 2^-24 * 1.001 of the
    exact sum (subnormals included). u32 * c[V-1] adds two roundings (2^-22 covers them).
    So c32 and t32 are within R32 = 1.001 * (D * 3.001 * 2^-24 + 2^-21 + gamma_h) + 2^-22
    (relative) + A of C and tau; with D <= 88 and h <= 512, R32 < 2^-14.
  float64 side, for a row with |max x| / T <= 2^20 (checked; others fall back): each weight
  that matters has |s| <= 2^21 + 2^11, so |d64 - d| <= 3 * 2^-53 * (2^21 + 2^11) < 7.2e-10,
  exp64 adds at most 2^-40 (NumPy: a few ULP), the sum gamma_64 < 7.2e-15: R64 < 2^-30.
  Then with R = R32 + 2^-30 and q = (1 + R) / (1 - R): q^2 - 1 <= 4.001 R < 4.01 R = kappa and
  A * (q + 1)^2 < 2^-100 = ABS, so c32[i-1] * (1 + kappa) + ABS < t32 proves c64[i-1] <= t64,
  and t32 * (1 + kappa) + ABS < c32[i] proves c64[i] > t64 (both cdfs are non-decreasing, so the
  float64 count is i). Those tests run in float64, whose own rounding (2^-52) is far inside the
  0.009 R of slack in kappa.
  NaN logits, or an infinite maximum, make a comparison false (the row falls back; a -inf
  logit under a finite maximum is a weight of 0, and provable); temperatures whose
  reciprocal float32 cannot hold within its relative rounding fall back too.

  The compiled screen works in base 2: b = fl(fl(x - max x) * fl(log2(e) / T)), the weight
  2^b. That is d * log2(e) with the same three float32 roundings (log2(e) / T is computed in
  float64, 2^-52, before its one rounding to float32), and 2^b = e^(b ln 2) is e^d times
  e^(d theta) with |theta| <= 3.0001 * 2^-24: the same term D * 3.001 * 2^-24 as above. Its
  exp2 is within 2^-21 of 2^b like exp32 (checked at every float32 it is used on), inputs
  below -125 become 2^-125 (within 2^-124 of the weight, absolute), and D is taken as
  -min b * ln 2 * (1 + 2^-20), which covers b's roundings.

Two implementations of the same screen, under the same bound: screen_compiled (sampling_kernel.c
and sampling_screen32.c, built by setup.py where a C compiler is found: each tile of 16 rows
stays in the first-level cache through every step, and its running sum is sequential, h = V)
and screen_numpy (NumPy passes over the [V, N] batch, the running sum blocked). The compiled
one also checks each row it cannot prove in float64 (sampling_check64.c): NumPy's own
arithmetic but for exp (libm's against NumPy's, both within a few ULP), with a margin of
about 2^-36 relative, which leaves only targets on a boundary, NaN and infinities unproven
(about one row in 10^9 against 0.1-1%). screen_uncut takes the compiled one
when it is built and the vocabulary is at most MAX_DEPTH; a proven row's token is the float64
one whichever ran, so the choice never changes a draw.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

try:
    from server.engine import _sampling_kernel
except ImportError:  # built only where setup.py found a C compiler: NumPy screens then
    _sampling_kernel = None

MAX_DEPTH = 512  # most roundings the running sum puts a term through (b + K - 1) for the bound above
ABS = 2.0**-100  # absolute margin: weights under float32's normal range
MAX_SCALED = 2.0**19  # |max logit| / T above this: the float64 side's bound is not shown; fall back
RECIPROCAL_RANGE = (2.0**-100, 2.0**100)  # 1 / T outside it: fl32(1 / T) may lose its relative rounding
_PAIR = np.array([[-1], [0]], np.int32)  # [2, 1]: a row's entries either side of its target
TRANSPOSE_ROWS = 256  # rows of logits transposed per copy (a whole [1024, 65] batch at once: 2x as slow)


@lru_cache(maxsize=None)
def scan_blocks(vocab: int) -> tuple[int, int]:
    """(entries per block b, blocks K) of the blocked running sum over V entries, K * b >= V: the
    fewest vector calls ((b - 1) + (K - 1)), padding counted as half a call per entry."""
    return min(((b, -(-vocab // b)) for b in range(1, vocab + 1)),
               key=lambda bk: (bk[0] - 1) + (bk[1] - 1) + (bk[0] * bk[1] - vocab) / 2)


COMPILED = _sampling_kernel is not None  # sampling_kernel.c is built (see screen_uncut)
NUMPY_SCREEN_ROWS = 128  # NumPy's screen pays from this many rows; the compiled one from 1 (2 us at 1 to 16)


def worth_screening(rows: int, vocab: int) -> bool:
    """Whether screen_uncut is faster than the float64 sampler for [rows, vocab] float32 logits."""
    return rows >= 1 and ((COMPILED and 2 <= vocab <= MAX_DEPTH) or rows >= NUMPY_SCREEN_ROWS)


def screen_uncut(logits: np.ndarray, temperature: np.ndarray, uniforms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The float32 screen of sample_uncut: logits [N, V] float32, temperature [N] float64 (> 0), uniforms
    [N] -> (token ids int64 [N], proven bool [N]). Where proven, the token is the one the float64
    sampler draws, bit for bit (see the module's docstring); elsewhere it means nothing."""
    if COMPILED and 2 <= logits.shape[1] <= MAX_DEPTH:
        return screen_compiled(logits, temperature, uniforms)
    return screen_numpy(logits, temperature, uniforms)


def screen_compiled(logits: np.ndarray, temperature: np.ndarray, uniforms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """screen_uncut in compiled code (sampling_kernel.c); vocabularies of 2 to MAX_DEPTH entries."""
    if _sampling_kernel is None:
        raise RuntimeError("the compiled screen is not built: reinstall charstream where a C compiler is found")
    count, vocab = logits.shape
    tokens = np.empty(count, np.int64)  # [N]
    proven = np.empty(count, bool)  # [N]
    _sampling_kernel.screen(np.ascontiguousarray(logits, np.float32), vocab,
                          np.ascontiguousarray(temperature, np.float64), np.ascontiguousarray(uniforms, np.float64),
                          tokens, proven)
    return tokens, proven


def uniforms_compiled(keys: np.ndarray, positions: np.ndarray, out: np.ndarray) -> None:
    """sampling.uniforms_at in compiled code, into out: keys uint64 [N], positions int64 or uint64 [N]."""
    _sampling_kernel.uniforms(keys, positions, out)


def screen_numpy(logits: np.ndarray, temperature: np.ndarray, uniforms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """screen_uncut in NumPy passes over the [V, N] batch (any vocabulary up to about 65,000)."""
    count, vocab = logits.shape
    reciprocal = 1.0 / temperature  # [N] float64
    # The [V, N] layout, C order: reductions and the running sum are vector calls over all rows at
    # once. (np.array(logits.T) would keep each entry's row strided: 1.5x as slow.)
    block, blocks = scan_blocks(vocab)
    depth = block + blocks - 1  # h: the most roundings the running sum puts a term through
    if depth > MAX_DEPTH:  # (a vocabulary of about 65,000) the bound above is not shown
        return np.zeros(count, np.int64), np.zeros(count, bool)
    padded = block * blocks  # P >= V: entries past V pad the last block
    weights = np.empty((padded, count), np.float32)  # [P, N]
    for start in range(0, count, TRANSPOSE_ROWS):  # in chunks: a whole batch at once misses the caches
        weights[:vocab, start: start + TRANSPOSE_ROWS] = logits[start: start + TRANSPOSE_ROWS].T  # [V, C]
    weights[vocab:] = -np.inf  # weight exactly 0: their running sum is each row's total
    top = np.maximum.reduce(weights, axis=0)  # [N] float32, max x
    weights -= top  # x - max x, <= 0
    weights *= reciprocal.astype(np.float32)
    spread = np.minimum.reduce(weights[:vocab], axis=0)  # [N]: -D, the padding left out
    np.exp(weights, out=weights)  # [P, N], 1 at each row's maximum
    # The running sum, blocked, into cdf[j, k] = c[k * b + j]: within every block at once (b calls),
    # then the blocks' totals (K - 1 calls), then each block's other entries plus the total before
    # it (one call): about 2 sqrt(V) vector calls, not V, none of them on overlapping memory (which
    # NumPy would copy first). The additions' order is not a sequential sum's, which the bound
    # allows (non-negative terms, any order); each row's sums still never decrease with v.
    entries = weights.reshape(blocks, block, count)  # [K, b, N], a view: entry v at (v // b, v % b)
    cdf = np.empty((block, blocks, count), np.float32)  # [b, K, N]
    cdf[0] = entries[:, 0]
    for j in range(1, block):
        np.add(cdf[j - 1], entries[:, j], out=cdf[j])  # [K, N]
    last = cdf[block - 1]  # [K, N]: each block's sum, then the running sum through it
    for k in range(1, blocks):
        np.add(last[k - 1], last[k], out=last[k])  # [N]
    if blocks > 1:
        cdf[: block - 1, 1:] += last[:-1]  # [b - 1, K - 1, N]
    target = np.asarray(uniforms, np.float64).astype(np.float32) * last[-1]  # [N] float32
    # How many of c[0 .. V-2] are <= target (c never decreases: the first index above it): the
    # blocks' last entries wholly <= target, then within the next block; capped at V - 1 (entries
    # V-1 and after equal the total, and count only when all the others do).
    whole = np.minimum(np.add.reduce(last <= target, axis=0, dtype=np.int32), blocks - 1)  # [N]
    columns = np.arange(count)
    flat = cdf.ravel()  # [P * N]: c[k * b + j] of row n at (j * K + k) * N + n
    at = whole * count + columns  # [N]: block `whole`'s first entry
    within = flat.take(at + (np.arange(block) * (blocks * count))[:, None])  # [b, N]
    index = np.minimum(whole * block + np.add.reduce(within <= target, axis=0, dtype=np.int32), vocab - 1)  # [N]
    pair = np.maximum(index + _PAIR, 0)  # [2, N]: entries i - 1 (0 at i = 0: unused then) and i
    block_of, in_block = np.divmod(pair, block)  # [2, N]
    below, above = flat.take((in_block * blocks + block_of) * count + columns).astype(np.float64)  # c32[i-1], c32[i]
    # 1 + kappa per row: kappa = 4.01 R, R = 1.001 * (D * 3.001 * 2^-24 + 2^-21 + gamma_h) + 2^-22 + 2^-30.
    widen = np.maximum(spread, -88.0, dtype=np.float64)  # [N], -D (NaN stays NaN: no proof)
    widen *= -4.01 * 1.001 * 3.001 * 2.0**-24
    widen += 1.0 + 4.01 * (1.001 * (2.0**-21 + depth * 2.0**-24 * 1.001) + 2.0**-22 + 2.0**-30)
    t64 = target.astype(np.float64)  # [N]
    proven = (index == 0) | (below * widen + ABS < t64)  # [N]: c64[i-1] <= t64 (unused at i = 0)
    proven &= (index == vocab - 1) | (t64 * widen + ABS < above)  # c64[i] > t64
    proven &= np.abs(top.astype(np.float64)) * reciprocal <= MAX_SCALED  # False for NaN, inf
    proven &= (reciprocal >= RECIPROCAL_RANGE[0]) & (reciprocal <= RECIPROCAL_RANGE[1])
    return index.astype(np.int64), proven
