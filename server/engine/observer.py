"""What the engine reports as it runs (the server's metrics implement it): one protocol that the
scheduler and its stepping strategies all import, so none of them imports the scheduler."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from server.engine.prefix_cache import PrefixCache


class StepObserver(Protocol):
    def observe_step(self, batch_size: int, seconds: float) -> None: ...
    def observe_lookahead(self, total: int, most: int) -> None: ...
    def observe_prefix_cache(self, hit: bool, skipped_chars: int, cache: PrefixCache) -> None: ...
    def observe_stretch(self, sampled: int, kept: int) -> None: ...
