"""The undo window (server/engine/scheduling/undo_window.py) against a plain dict doing the same:
single entries and blocks of consecutive keys, acknowledgements dropping keys, copies on own()."""

from __future__ import annotations

import random

import numpy as np

from server.engine.scheduling.undo_window import UndoWindow


def test_the_window_reads_as_a_dict_of_its_states() -> None:
    for seed in range(20):
        rng = random.Random(seed)
        window, reference, floor, next_key = UndoWindow(), {}, 1, 1
        call = np.arange(64 * 2 * 3, dtype=np.float32).reshape(64, 2, 3) + seed  # a call's inputs [K, L, H]
        for _ in range(200):
            action = rng.random()
            if action < 0.35:  # an ordinary step: one state
                state = call[rng.randrange(64)]
                window[next_key] = state
                reference[next_key] = state
                next_key += 1
            elif action < 0.6:  # a stretch's call: a block of consecutive keys
                n = rng.randrange(0, 17)
                start = rng.randrange(0, 64 - n + 1)
                window.put_block(next_key, call[start:start + n])
                reference.update({next_key + i: call[start + i] for i in range(n)})
                next_key += n
            elif action < 0.9:  # an acknowledgement
                floor = max(floor, rng.randrange(1, next_key + 1))
                window.drop_below(floor)
                reference = {k: v for k, v in reference.items() if k >= floor}
            else:  # a stall or a finish: every state its own copy
                window.own()
                assert all(state.base is None for state in window.values())
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
