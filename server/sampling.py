"""Choosing the next character from logits with a session's own settings and random stream.

One uniform number per sampled character, drawn from the session's generator
(inverse-CDF sampling): a session's text depends only on its seed, state and
settings, never on which other sessions share the batch. Greedy draws nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 1.0  # 0 = greedy argmax
    top_k: int = 0  # 0 = no limit
    top_p: float = 1.0  # 1 = no limit

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


DEFAULT_SETTINGS = SamplingSettings()


def new_generator(seed: int) -> np.random.Generator:
    """A session's random stream: PCG64 seeded with a non-negative integer."""
    return np.random.Generator(np.random.PCG64(seed))


def choose_token(logits: np.ndarray, settings: SamplingSettings, uniform: float) -> int:
    """Token id for logits [V] given a uniform number in [0, 1); `uniform` is ignored when greedy.

    Greedy picks the first maximum (as numpy and torch argmax do). Otherwise
    softmax(logits / temperature) in float64, cut to the top_k most likely and
    then to the smallest most-likely set with mass >= top_p, renormalised.
    """
    if settings.greedy:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / settings.temperature  # [V]
    weights = np.exp(scaled - scaled.max())  # unnormalised probabilities, max = 1
    top_k = settings.top_k if 0 < settings.top_k < len(logits) else 0  # k >= V cuts nothing
    if top_k == 0 and settings.top_p >= 1.0:
        cdf = np.cumsum(weights)  # [V], in token-id order
        index = int(np.searchsorted(cdf, uniform * cdf[-1], side="right"))
        return min(index, len(cdf) - 1)
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
