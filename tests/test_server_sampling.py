"""Sampling: the reference choose_token cuts the distribution (greedy, temperature, top-k,
top-p) as documented; sample_tokens, the batched sampler the server runs, matches it exactly;
the counter stream is pure and uniform."""

from __future__ import annotations

import numpy as np
import pytest

from server.engine.sampling import (
    RandomStream,
    SamplingSettings,
    choose_token,
    sample_batch,
    sample_plain_row,
    sample_tokens,
    sample_uncut,
    stream_key,
    uniform_at,
    uniforms_at,
)

LOGITS = np.array([1.0, 3.0, 2.0, 3.0, -1.0, 0.5], dtype=np.float32)  # ties at ids 1 and 3


def _softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    return p / p.sum()


def _histogram(settings: SamplingSettings, n: int = 20_000) -> np.ndarray:
    """Token counts over an even grid of uniforms: inverse-CDF sampling makes them exact."""
    counts = np.zeros(len(LOGITS), dtype=np.int64)
    for i in range(n):
        counts[choose_token(LOGITS, settings, (i + 0.5) / n)] += 1
    return counts


def test_greedy_takes_the_first_maximum_and_ignores_the_uniform() -> None:
    greedy = SamplingSettings(temperature=0.0)
    assert {choose_token(LOGITS, greedy, u) for u in (0.0, 0.3, 0.999)} == {1}


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_plain_sampling_follows_softmax_of_logits_over_temperature(temperature: float) -> None:
    n = 20_000
    counts = _histogram(SamplingSettings(temperature=temperature), n)
    expected = _softmax(LOGITS, temperature) * n
    assert np.all(np.abs(counts - expected) <= 1.0)


def test_top_k_keeps_only_the_k_most_likely_renormalised() -> None:
    n = 20_000
    counts = _histogram(SamplingSettings(temperature=1.0, top_k=3), n)
    kept = [1, 3, 2]  # the two tied maxima (id order), then logit 2.0
    assert set(np.flatnonzero(counts)) == set(kept)
    p = _softmax(LOGITS[kept], 1.0) * n
    assert np.all(np.abs(counts[kept] - p) <= 1.0)


def test_top_p_keeps_the_smallest_set_reaching_the_mass() -> None:
    probs = _softmax(LOGITS, 1.0)
    # ids 1 and 3 hold ~0.66 of the mass; 0.6 needs both, 0.3 needs only the first (id 1).
    assert probs[1] + probs[3] > 0.6 > probs[1]
    assert set(np.flatnonzero(_histogram(SamplingSettings(top_p=0.6)))) == {1, 3}
    assert set(np.flatnonzero(_histogram(SamplingSettings(top_p=0.3)))) == {1}


def test_top_k_larger_than_the_vocabulary_means_no_limit() -> None:
    assert np.array_equal(_histogram(SamplingSettings(top_k=100)), _histogram(SamplingSettings()))


def test_a_seed_gives_the_same_stream() -> None:
    settings = SamplingSettings(temperature=1.3, top_k=4, top_p=0.9)
    runs = []
    for _ in range(2):
        stream = RandomStream(1234)
        runs.append([choose_token(LOGITS, settings, stream.next()) for _ in range(50)])
    assert runs[0] == runs[1]
    other = RandomStream(4321)
    assert runs[0] != [choose_token(LOGITS, settings, other.next()) for _ in range(50)]


def _mixed_batch(rng: np.random.Generator, rows: int, vocab: int) -> tuple[np.ndarray, ...]:
    """Random logits and settings covering every branch of choose_token, ties included."""
    logits = rng.normal(0.0, 3.0, size=(rows, vocab))
    kind = rng.integers(0, 3, size=rows)
    logits[kind == 1] = np.round(logits[kind == 1], 1)  # near ties, some exact
    logits[kind == 2] = rng.integers(-2, 3, size=(int(np.sum(kind == 2)), vocab))  # many exact ties
    logits = logits.astype(np.float32)  # [B, V]
    temperature = np.exp(rng.uniform(np.log(0.05), np.log(5.0), size=rows))  # [B]
    temperature[rng.random(rows) < 0.15] = 0.0  # greedy
    temperature[rng.random(rows) < 0.03] = 1e-3  # tiny: one token holds all the mass
    temperature[rng.random(rows) < 0.03] = 1e3  # huge: nearly flat
    top_k = rng.choice(np.array([0, 0, 0, 1, 2, 3, vocab - 1, vocab, vocab + 7]), size=rows)
    top_k = np.where(rng.random(rows) < 0.2, rng.integers(1, vocab + 1, size=rows), top_k).astype(np.int64)
    top_p = rng.choice(np.array([1.0, 1.0, 1.5, 0.95, 0.9, 0.5, 0.1, 1e-9]), size=rows)
    top_p = np.where(rng.random(rows) < 0.2, rng.random(rows), top_p)  # [B]
    # 0.0 and just below 1.0 are the edges; 1.0 itself (outside the contract) exercises the final clip.
    uniforms = rng.choice(np.array([0.0, np.nextafter(1.0, 0.0), 1.0 - 1e-12, 0.5, 1.0]), size=rows)
    uniforms = np.where(rng.random(rows) < 0.7, rng.random(rows), uniforms)  # [B]
    return logits, temperature, top_k, top_p, uniforms


@pytest.mark.parametrize("vocab", [65, 6, 2])
def test_batched_sampling_matches_choose_token_row_by_row(vocab: int) -> None:
    rng = np.random.default_rng(vocab)
    logits, temperature, top_k, top_p, uniforms = _mixed_batch(rng, 3000, vocab)
    got = sample_tokens(logits, temperature, top_k, top_p, uniforms)
    assert got.dtype == np.int64 and got.shape == (3000,)
    expected = [
        choose_token(logits[i], SamplingSettings(temperature[i], int(top_k[i]), top_p[i]), uniforms[i])
        for i in range(len(logits))
    ]
    mismatched = np.flatnonzero(got != np.array(expected))
    assert mismatched.size == 0, f"rows {mismatched[:10]} differ"


@pytest.mark.parametrize("vocab", [65, 6, 2])
def test_batched_sampling_without_cuts_matches_choose_token_row_by_row(vocab: int) -> None:
    """Temperature-only batches (greedy rows mixed in) take the sampler's no-sort path."""
    rng = np.random.default_rng(100 + vocab)
    logits, temperature, _, _, uniforms = _mixed_batch(rng, 3000, vocab)
    top_k = rng.choice(np.array([0, vocab, vocab + 7]), size=3000).astype(np.int64)  # cuts nothing
    top_p = rng.choice(np.array([1.0, 1.5]), size=3000)  # cuts nothing
    got = sample_tokens(logits, temperature, top_k, top_p, uniforms)
    expected = [
        choose_token(logits[i], SamplingSettings(temperature[i], int(top_k[i]), top_p[i]), uniforms[i])
        for i in range(len(logits))
    ]
    mismatched = np.flatnonzero(got != np.array(expected))
    assert mismatched.size == 0, f"rows {mismatched[:10]} differ"
    sampling = temperature > 0
    uncut = sample_uncut(logits[sampling], temperature[sampling], uniforms[sampling])
    mismatched = np.flatnonzero(uncut != np.array(expected)[sampling])
    assert mismatched.size == 0, f"sample_uncut: rows {mismatched[:10]} differ"
    # Any leading shape: a stretch's draws [K, B, V] with their rows' temperatures [B], or one row [V].
    rows = np.flatnonzero(sampling)[:12]  # [12] = [K=3, B=4]
    stretch = sample_uncut(logits[rows].reshape(3, 4, vocab), temperature[rows[:4]],
                           uniforms[rows].reshape(3, 4))  # temperature of row b in every k
    for k, b in np.ndindex(3, 4):
        i = rows[4 * k + b]
        assert stretch[k, b] == choose_token(logits[i], SamplingSettings(temperature[rows[b]]), uniforms[i])
    assert sample_uncut(logits[rows[0]], temperature[rows[0]], uniforms[rows[0]]) == expected[rows[0]]


@pytest.mark.parametrize("vocab", [65, 6, 2])
def test_the_one_row_sampler_matches_choose_token(vocab: int) -> None:
    """A lone stream's path (sample_plain_row), edge uniforms included."""
    rng = np.random.default_rng(200 + vocab)
    logits, temperature, _, _, uniforms = _mixed_batch(rng, 3000, vocab)
    rows = np.flatnonzero(temperature > 0)
    got = [sample_plain_row(logits[i], float(temperature[i]), float(uniforms[i])) for i in rows]
    expected = [choose_token(logits[i], SamplingSettings(float(temperature[i])), float(uniforms[i])) for i in rows]
    mismatched = np.flatnonzero(np.array(got) != np.array(expected))
    assert mismatched.size == 0, f"rows {rows[mismatched[:10]]} differ"


def test_scalar_uniform_is_the_vectorised_one() -> None:
    rng = np.random.default_rng(5)
    keys = rng.integers(0, 2**64, size=500, dtype=np.uint64)
    positions = rng.integers(0, 2**40, size=500).astype(np.uint64)
    positions[:3] = [0, 1, 2**61 - 1]
    expected = uniforms_at(keys, positions)
    assert [uniform_at(int(k), int(p)) for k, p in zip(keys, positions)] == expected.tolist()


def test_batched_sampling_of_only_greedy_rows_is_argmax() -> None:
    logits = np.array([LOGITS, LOGITS[::-1]])
    zeros = np.zeros(2)
    got = sample_tokens(logits, zeros, np.zeros(2, dtype=np.int64), np.ones(2), zeros)
    assert got.tolist() == [1, 2]  # the first of the tied maxima in each row


def _reference_mix(z: int) -> int:
    """SplitMix64 finaliser in plain Python integers, to check the uint64 wraparound."""
    mask = 2**64 - 1
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def test_counter_stream_is_splitmix64() -> None:
    # Known answer: the first SplitMix64 output from state 0 is 0xE220A8397B1DCDAF.
    assert stream_key(0) == 0
    assert uniforms_at(np.array([0], dtype=np.uint64), np.array([0]))[0] == (0xE220A8397B1DCDAF >> 11) * 2.0**-53
    gamma = 0x9E3779B97F4A7C15
    for seed in (1, 2, 12345, 2**63 + 5, 2**64 - 1):
        key = stream_key(seed)
        assert key == _reference_mix(seed)
        for position in (0, 1, 1000, 2**40):
            bits = _reference_mix((key + (position + 1) * gamma) % 2**64)
            u = uniforms_at(np.array([key], dtype=np.uint64), np.array([position], dtype=np.uint64))
            assert u[0] == (bits >> 11) * 2.0**-53


def test_counter_stream_is_a_pure_function_of_seed_and_position() -> None:
    stream = RandomStream(seed=42)
    drawn = [stream.next() for _ in range(100)]
    assert stream.position == 100
    keys = np.full(100, stream.key, dtype=np.uint64)
    assert drawn == uniforms_at(keys, np.arange(100, dtype=np.int64)).tolist()
    stream.position = 37  # rewinding replays exactly
    assert [stream.next() for _ in range(63)] == drawn[37:]
    # A row's number does not depend on the other rows of the batch.
    mixed_keys = np.array([stream.key, stream_key(7), stream.key], dtype=np.uint64)
    assert uniforms_at(mixed_keys, np.array([5, 5, 99]))[[0, 2]].tolist() == [drawn[5], drawn[99]]
    assert RandomStream(seed=43).next() != drawn[0]
    nearby = [[RandomStream(seed).next() for _ in range(5)] for seed in range(50)]
    assert len({tuple(run) for run in nearby}) == 50


def test_counter_stream_looks_uniform() -> None:
    n = 100_000
    u = uniforms_at(np.full(n, stream_key(2024), dtype=np.uint64), np.arange(n))
    assert u.dtype == np.float64 and np.all((u >= 0.0) & (u < 1.0))
    assert abs(u.mean() - 0.5) < 0.01
    counts = np.bincount((u * 10).astype(np.int64), minlength=10)
    chi_square = float(np.sum((counts - n / 10) ** 2 / (n / 10)))
    assert chi_square < 40.0  # 9 degrees of freedom: p < 1e-5 by chance
    # Across seeds at a fixed position too (the per-session first draws).
    first = uniforms_at(_keys(n), np.zeros(n, dtype=np.int64))
    assert abs(first.mean() - 0.5) < 0.01
    assert np.corrcoef(u[:-1], u[1:])[0, 1] ** 2 < 1e-3  # consecutive draws unrelated


def _keys(n: int) -> np.ndarray:
    return np.array([stream_key(seed) for seed in range(n)], dtype=np.uint64)


def test_plain_settings_are_exactly_those_without_a_cut() -> None:
    assert SamplingSettings(1.0).samples_plainly(65)
    assert SamplingSettings(0.7, top_k=65).samples_plainly(65)  # k >= V cuts nothing
    assert SamplingSettings(0.7, top_p=1.5).samples_plainly(65)
    assert not SamplingSettings(0.0).samples_plainly(65)  # greedy
    assert not SamplingSettings(0.7, top_k=64).samples_plainly(65)
    assert not SamplingSettings(0.7, top_p=0.9).samples_plainly(65)


@pytest.mark.parametrize("rows", [1, 3, 40])  # one row alone; random numbers in Python integers, and in NumPy
@pytest.mark.parametrize("plain", [True, False])
def test_the_schedulers_batch_call_matches_choose_token(rows: int, plain: bool) -> None:
    rng = np.random.default_rng(rows)
    logits = rng.normal(0.0, 3.0, size=(rows, 65)).astype(np.float32)
    choices = [SamplingSettings(1.0), SamplingSettings(0.6)] if plain else \
        [SamplingSettings(0.0), SamplingSettings(0.8, top_k=5), SamplingSettings(1.2, top_p=0.8), SamplingSettings(1.0)]
    settings = [choices[i % len(choices)] for i in range(rows)]
    streams = [(stream_key(i), int(rng.integers(0, 1000))) for i in range(rows)]
    tokens, draws = sample_batch(logits, settings, streams, all_plain=plain)
    expected = [choose_token(logits[i], settings[i], uniform_at(*streams[i])) for i in range(rows)]
    assert tokens == expected
    assert draws == [0 if s.greedy else 1 for s in settings]
