"""Preallocated hidden states for every session slot, and the slot allocator.

A session owns one slot for its lifetime; its hidden state lives at that slot
index in a pool allocated once at start-up, so a step gathers the states of
the sessions it runs by index and scatters the new states back: no per-session
allocation, and on a GPU the states never leave the device.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort


class SlotAllocator:
    """Hands out slot indices 0..size-1; the lowest free slot first."""

    def __init__(self, size: int):
        if size <= 0:
            raise ValueError(f"pool size must be positive, got {size}")
        self.size = size
        self._free = list(range(size - 1, -1, -1))  # a stack: pop() yields the lowest index

    @property
    def free_count(self) -> int:
        return len(self._free)

    def acquire(self) -> int | None:
        """A free slot, or None when every slot is taken."""
        return self._free.pop() if self._free else None

    def release(self, slot: int) -> None:
        self._free.append(slot)


class HostStatePool:
    """States in host memory, [L, S, H] float32 (S = number of slots).

    The last step's new states stay where the model wrote them ("resident") until
    something else needs the pool: a step over the same slots in the same order (the
    steady state of a batch of streams) takes them as they are, with no gather and no
    scatter. Anything else (another batch, a start state, a read) first writes them back.
    """

    def __init__(self, num_layers: int, num_slots: int, hidden_size: int):
        self.states = np.zeros((num_layers, num_slots, hidden_size), dtype=np.float32)
        self._resident_slots: np.ndarray | None = None  # [B]: slots whose newest state is in _resident
        self._resident_key = b""  # _resident_slots' bytes: comparing them is ~15x cheaper than array_equal
        self._resident: np.ndarray | None = None  # [L, B, H]; never written to after the step that made it

    def gather(self, slots: np.ndarray, start_mask: np.ndarray, start_states: np.ndarray | None = None) -> np.ndarray:
        """States of `slots` [B] as an [L, B, H] array the caller must not write to; rows where
        `start_mask` [B] is True come from `start_states` [L, B, H] instead (zeros when it is None)."""
        starts = bool(start_mask.any())
        if not starts and self._resident_slots is not None and _key(slots) == self._resident_key:
            return self._resident  # type: ignore[return-value]
        self._write_back()
        batch = self.states[:, slots, :]  # advanced indexing copies: [L, B, H]
        if starts:
            batch[:, start_mask, :] = 0.0 if start_states is None else start_states[:, start_mask, :]
        return batch

    def scatter(self, slots: np.ndarray, states: np.ndarray) -> None:
        """`states` [L, B, H] are the newest states of `slots` [B] (kept as they are until needed)."""
        key = _key(slots)
        if self._resident_slots is not None and key != self._resident_key:
            self._write_back()
        self._resident_slots, self._resident_key, self._resident = np.array(slots, copy=True), key, states

    def read(self, slots: np.ndarray) -> np.ndarray:
        self._write_back()
        return self.states[:, slots, :]  # [L, B, H]

    def _write_back(self) -> None:
        if self._resident_slots is not None:
            self.states[:, self._resident_slots, :] = self._resident
            self._resident_slots = self._resident = None


def _key(slots: np.ndarray) -> bytes:
    """Equal for equal slot sequences (the scheduler passes int64 [B] every time)."""
    return slots.tobytes() if slots.dtype == np.int64 else np.asarray(slots, np.int64).tobytes()


class DeviceStatePool:
    """States in device memory as ONNX Runtime values, [S, L, H] float32, held twice.

    Slot-major [S, L, H] so that the step graph's ScatterND addresses whole
    slots. Each step reads `current` and writes every slot into `spare` (the
    scatter's output must not alias its input), then the two swap.
    """

    def __init__(self, num_layers: int, num_slots: int, hidden_size: int, device_type: str = "cuda", device_id: int = 0):
        shape = (num_slots, num_layers, hidden_size)
        # One array each: on "cpu" an OrtValue wraps the numpy buffer instead of copying it.
        self.current = ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32), device_type, device_id)
        self.spare = ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32), device_type, device_id)

    def swap(self) -> None:
        self.current, self.spare = self.spare, self.current

    def read(self, slots: np.ndarray) -> np.ndarray:
        """States of `slots` copied to the host as [L, B, H]. Copies the whole pool: used for
        snapshots, for the first prefill chunk of a session continuing from its pooled state (once
        per new prompt, 4 MiB at 1024 default-size sessions), for a stretch's first call after an
        ordinary step (stretch.py, batch_stretch.py; later calls start from the states the last one
        returned), and by tests."""
        return np.ascontiguousarray(self.current.numpy()[slots].transpose(1, 0, 2))
