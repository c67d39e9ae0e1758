"""The float32 screen of the sampler (server/engine/sampling_screen.py): a row it proves draws the
float64 sampler's token, and sample_uncut, which falls back to float64 for the rest, is exact.
Every screen test runs on both implementations, NumPy's and the compiled kernel's
(sampling_kernel.c; its own checks are in test_sampling_kernel.py).

The adversarial cases put the target exactly on, and one ULP either side of, a boundary of
the float64 cdf: the rows where float32 and float64 can disagree. The screen must leave every
such row it cannot decide to the float64 path."""

from __future__ import annotations

from typing import Callable

import numpy as np
import pytest

from server.engine import sampling_screen
from server.engine.sampling import (
    SamplingSettings,
    _sample_uncut_float64,
    choose_token,
    sample_uncut,
)
from server.engine.sampling_screen import screen_compiled, screen_numpy

Screen = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


@pytest.fixture(params=["numpy", "compiled"])
def screen(request: pytest.FixtureRequest) -> Screen:
    if request.param == "compiled" and not sampling_screen.COMPILED:
        pytest.skip("the compiled kernel is not built (no C compiler at install; test_sampling_kernel.py says more)")
    return screen_compiled if request.param == "compiled" else screen_numpy


def _reference(logits: np.ndarray, temperature: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    return _sample_uncut_float64(logits, temperature, uniforms)  # [N], the float64 definition


def _check(screen: Screen, logits: np.ndarray, temperature: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Proven rows agree with float64, sample_uncut agrees everywhere; returns the proven mask."""
    expected = _reference(logits, temperature, uniforms)
    tokens, proven = screen(logits, temperature, uniforms)
    wrong = np.flatnonzero(proven & (tokens != expected))
    assert wrong.size == 0, f"proven rows {wrong[:10]} differ from float64"
    assert np.array_equal(sample_uncut(logits, temperature, uniforms), expected)
    return proven


@pytest.mark.parametrize("vocab", [2, 3, 6, 65, 67, 256, 511, 512])
def test_proven_rows_draw_the_float64_token(screen: Screen, vocab: int) -> None:
    rng = np.random.default_rng(vocab)
    for scale in (0.1, 1.0, 4.0, 30.0):
        count = 2048
        logits = (rng.standard_normal((count, vocab)) * scale).astype(np.float32)  # [N, V]
        logits[: count // 8, 0] = logits[: count // 8, 1]  # ties
        temperature = rng.choice(np.array([1e-3, 0.05, 0.3, 0.8, 1.0, 2.5, 1e3]), size=count)  # [N]
        uniforms = rng.random(count)
        uniforms[:16] = [0.0, np.nextafter(1.0, 0.0)] * 8
        uniforms[16:64] = rng.random(48) * 1e-9  # targets below the smallest weights
        proven = _check(screen, logits, temperature, uniforms)
        assert proven.mean() > 0.5  # the screen does its job on ordinary rows


@pytest.mark.parametrize("vocab", [3, 65])
def test_targets_on_a_float64_boundary(screen: Screen, vocab: int) -> None:
    """u * total exactly on c64[j], and one ULP either side: float32 may land on either side."""
    rng = np.random.default_rng(7 + vocab)
    count = 4096
    logits = (rng.standard_normal((count, vocab)) * 3).astype(np.float32)
    temperature = rng.choice(np.array([0.5, 0.8, 1.3]), size=count)
    scaled = logits.astype(np.float64) / temperature[:, None]
    cdf = np.cumsum(np.exp(scaled - scaled.max(axis=1, keepdims=True)), axis=1)  # [N, V], float64's cdf
    boundary = cdf[np.arange(count), rng.integers(0, vocab - 1, size=count)] / cdf[:, -1]  # [N]
    for uniforms in (boundary, np.nextafter(boundary, 0.0), np.nextafter(boundary, 1.0),
                     boundary * (1 + 1e-7), boundary * (1 - 1e-7)):
        proven = _check(screen, logits, temperature, np.minimum(uniforms, np.nextafter(1.0, 0.0)))
        if uniforms is boundary:  # within the two sides' rounding of a boundary: never proven
            assert not proven.any()

def test_odd_rows_fall_back(screen: Screen) -> None:
    """NaN and infinite logits, and temperatures at the edges, draw float64's tokens."""
    rng = np.random.default_rng(3)
    count, vocab = 256, 65
    logits = rng.standard_normal((count, vocab)).astype(np.float32)
    logits[0, 3] = np.nan
    logits[1, 5] = np.inf
    logits[2, :] = -np.inf
    logits[3, 7] = -np.inf  # one impossible character: still provable
    logits[4, :] = 3e38  # x - max x is exact, the scaled logits are not small
    logits[5, 9] = -3e38
    temperature = np.full(count, 0.8)
    temperature[6:9] = [1.18e-38, 1e-30, 1e300]
    uniforms = rng.random(count)
    with np.errstate(all="ignore"):
        proven = _check(screen, logits, temperature, uniforms)
    assert not proven[[0, 1, 2]].any()  # NaN and infinite values: NumPy's float64 draws them
    assert proven[3]
    # Huge scaled logits and edge temperatures: float32 cannot prove them; the compiled kernel's
    # float64 check can (and _check held its tokens to float64's).
    assert proven[[4, 6, 7, 8]].all() if screen is screen_compiled else not proven[[4, 6, 7, 8]].any()


def test_sample_uncut_matches_choose_token_on_large_batches() -> None:
    """The screen's batch sizes against the one-row reference definition."""
    rng = np.random.default_rng(11)
    count, vocab = 1024, 65
    logits = (rng.standard_normal((count, vocab)) * 2).astype(np.float32)
    temperature = rng.uniform(0.2, 1.5, size=count)
    uniforms = rng.random(count)
    got = sample_uncut(logits, temperature, uniforms)
    expected = [choose_token(logits[i], SamplingSettings(temperature[i]), uniforms[i]) for i in range(count)]
    assert got.tolist() == expected
    # A stretch's check: [K x B, V] with each row's temperature repeated K times.
    k = 4
    drawn = logits[: 64 * k].reshape(k, 64, vocab)
    stretch = sample_uncut(drawn.reshape(k * 64, vocab), np.broadcast_to(temperature[:64], (k, 64)).reshape(-1),
                           uniforms[: 64 * k])
    assert np.array_equal(stretch, _reference(drawn.reshape(k * 64, vocab),
                                              np.tile(temperature[:64], k), uniforms[: 64 * k]))


def test_float32_exp_is_within_the_screens_bound() -> None:
    """The bound assumes NumPy's float32 exp within 2^-21 (relative) for normal results and within
    2^-124 (absolute) below them, on [-104, 0]: checked on this build on one float32 in every 512
    of the range, and on every one of 2^20 near -1e-3 and of 2^20 at the underflow edge."""
    def bits_of(value: float) -> int:
        return int(np.array([value], np.float32).view(np.uint32)[0])

    bits = np.arange(bits_of(-0.0), bits_of(-104.0), 512, dtype=np.uint32)
    edges = [np.arange(bits_of(start), bits_of(start) + 2**20, dtype=np.uint32) for start in (-1e-3, -87.0)]
    x = np.concatenate([bits, *edges]).view(np.float32)
    with np.errstate(under="ignore"):
        got = np.exp(x).astype(np.float64)
    exact = np.exp(x.astype(np.float64))
    normal = exact >= 2.0**-126
    assert np.max(np.abs(got[normal] - exact[normal]) / exact[normal]) <= 2.0**-21
    assert np.max(np.abs(got[~normal] - exact[~normal])) <= 2.0**-124


@pytest.mark.parametrize("count", [1, 2, 7, 16, 33, 127])
def test_small_batches_draw_the_reference_token(count: int) -> None:
    """With the compiled kernel sample_uncut screens batches of any size (NumPy's screen only from
    128 rows): every size against the one-row reference, with targets on float64 boundaries."""
    rng = np.random.default_rng(count)
    vocab = 65
    logits = (rng.standard_normal((count, vocab)) * 3).astype(np.float32)
    temperature = rng.uniform(0.3, 1.5, size=count)
    scaled = logits.astype(np.float64) / temperature[:, None]
    cdf = np.cumsum(np.exp(scaled - scaled.max(axis=1, keepdims=True)), axis=1)
    boundary = cdf[np.arange(count), rng.integers(0, vocab - 1, size=count)] / cdf[:, -1]
    for uniforms in (rng.random(count), np.minimum(boundary, np.nextafter(1.0, 0.0))):
        got = sample_uncut(logits, temperature, uniforms)
        expected = [choose_token(logits[i], SamplingSettings(temperature[i]), uniforms[i]) for i in range(count)]
        assert got.tolist() == expected


@pytest.mark.parametrize("count", [1, 2, 3, 8, 16, 200])
def test_a_row_with_odd_logits_draws_the_same_token_in_any_batch(count: int) -> None:
    """A NaN or infinite logit is never proven, and its row's fallback draw must not depend on how
    many other rows fell back nor differ from the reference."""
    rng = np.random.default_rng(count)
    logits = rng.standard_normal((count, 65)).astype(np.float32)
    temperature, uniforms = np.full(count, 0.8), rng.random(count)
    for odd in (np.nan, np.inf, -np.inf):
        bad = logits.copy()
        bad[0, 5] = odd
        if odd == -np.inf:
            bad[0, :] = -np.inf  # a row with no possible character
        with np.errstate(all="ignore"):
            expected = _reference(bad, temperature, uniforms)
            assert sample_uncut(bad, temperature, uniforms).tolist() == expected.tolist()
            assert choose_token(bad[0], SamplingSettings(0.8), uniforms[0]) == expected[0]


def test_partial_tiles_prove_their_rows() -> None:
    """Batches that leave a tile of 16 rows part full: every real row is screened (proven at the
    usual rate), none is left to float64 for being in a short tile."""
    if not sampling_screen.COMPILED:
        pytest.skip("the compiled kernel is not built")
    rng = np.random.default_rng(2)
    for count in (1, 7, 15, 17, 33):
        logits = (rng.standard_normal((count, 65)) * 2).astype(np.float32)
        temperature, uniforms = np.full(count, 0.8), rng.random(count)
        tokens, proven = screen_compiled(logits, temperature, uniforms)
        assert proven.all(), (count, proven)
        assert np.array_equal(tokens, _reference(logits, temperature, uniforms))


@pytest.mark.parametrize("vocab", [3, 65, 512])
def test_the_kernels_float64_check_settles_rows_float32_cannot(vocab: int) -> None:
    """Targets 10^-7 (relative) from a float64 boundary are inside float32's margin but far outside
    float64's: the compiled kernel proves them with its float64 check, each the float64 token (the
    few that the shift put on another boundary aside), and leaves the targets on a boundary to NumPy."""
    if not sampling_screen.COMPILED:
        pytest.skip("the compiled kernel is not built")
    rng = np.random.default_rng(31 + vocab)
    count = 2048
    logits = (rng.standard_normal((count, vocab)) * 3).astype(np.float32)
    temperature = rng.choice(np.array([0.5, 0.8, 1.3]), size=count)
    scaled = logits.astype(np.float64) / temperature[:, None]
    cdf = np.cumsum(np.exp(scaled - scaled.max(axis=1, keepdims=True)), axis=1)  # [N, V]
    boundary = cdf[np.arange(count), rng.integers(0, vocab - 1, size=count)] / cdf[:, -1]  # [N]
    near = np.minimum(boundary * (1 + rng.choice([-1e-7, 1e-7], size=count)), np.nextafter(1.0, 0.0))
    _, float32_proven = screen_numpy(logits, temperature, near)
    assert float32_proven.mean() < 0.5  # these rows are the float32 screen's hard ones
    target = near * cdf[:, -1]  # [N]
    clear = np.min(np.abs(cdf[:, :-1] - target[:, None]), axis=1) > 1e-9 * target  # off every boundary
    assert clear.mean() > 0.99
    assert _check(screen_compiled, logits, temperature, near)[clear].all()
    on = np.minimum(boundary, np.nextafter(1.0, 0.0))
    assert not _check(screen_compiled, logits, temperature, on).any()
