"""The undo window (server/engine/scheduling/undo_window.py) against a plain dict doing the same:
single entries and blocks of consecutive keys, acknowledgements dropping keys, copies on own() (blocks that
are arrays of their own kept as they are)."""

from __future__ import annotations

import random

import numpy as np

from server.engine.scheduling.undo_window import UndoWindow


def test_the_window_reads_as_a_dict_of_its_states() -> None:
    for seed in range(20):
        rng = random.Random(seed)
        window, reference, floor, next_key = UndoWindow(), {}, 1, 1
        owned: list[tuple[int, np.ndarray]] = []  # (first key, block) of the blocks put as arrays of their own
        call = np.arange(64 * 2 * 3, dtype=np.float32).reshape(64, 2, 3) + seed  # a call's inputs [K, L, H]
        for _ in range(200):
            action = rng.random()
            if action < 0.35:  # an ordinary step: one state
                state = call[rng.randrange(64)]
                window[next_key] = state
                reference[next_key] = state
                next_key += 1
            elif action < 0.6:  # a block of consecutive keys: a stretch's view of its call, or lane copies
                n = rng.randrange(0, 17)
                start = rng.randrange(0, 64 - n + 1)
                block = call[start:start + n]
                if rng.random() < 0.3:  # the steady lane's copies: an array of its own
                    block = block.copy()
                    owned.append((next_key, block))
                window.put_block(next_key, block)
                reference.update({next_key + i: block[i] for i in range(n)})
                next_key += n
            elif action < 0.9:  # an acknowledgement
                floor = max(floor, rng.randrange(1, next_key + 1))
                window.drop_below(floor)
                reference = {k: v for k, v in reference.items() if k >= floor}
            else:  # a stall or a finish: every state its own copy
                window.own()
                # Every state is its own array, or a row of a block that is (it holds no one else's)
                assert all(state.base is None or (state.base.base is None and state.base is not call)
                           for state in window.values())
                # Blocks of their own are kept as they were put (no copy), while any key of theirs is live.
                live = [(first, block) for first, block in owned if len(block) and first + len(block) > floor]
                kept = [(first, block) for first, block in window._blocks]
                assert all(any(b is block for _, b in kept) for _, block in live)
            assert sorted(window) == sorted(reference) and len(window) == len(reference)
            assert bool(window) == bool(reference)
            for k, state in reference.items():
                assert np.array_equal(window[k], state)
            for k in (floor - 1, next_key):
                try:
                    window[k]
                except KeyError:
                    continue
                raise AssertionError(f"key {k} should be gone or not yet written")
