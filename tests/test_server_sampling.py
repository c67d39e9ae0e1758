"""Sampling: greedy, temperature, top-k and top-p cut the distribution as documented."""

from __future__ import annotations

import numpy as np
import pytest

from server.sampling import SamplingSettings, choose_token, new_generator

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
        rng = new_generator(1234)
        runs.append([choose_token(LOGITS, settings, rng.random()) for _ in range(50)])
    assert runs[0] == runs[1]
    other = new_generator(4321)
    assert runs[0] != [choose_token(LOGITS, settings, other.random()) for _ in range(50)]
