"""Recurrent state in fixed slots: one (capacity, U) array per state tensor, one row per request.

Today's batch (app/runtime.py `OnnxModel.select` / `concat`) rebuilds every state array of the
whole batch whenever a request joins or leaves: O(B x U) copied per change. Here a request keeps
one slot for its whole life. Joining writes its prefilled state into free slots, leaving only
marks the slot free, and a step reads the active slots and writes the new state back into the
same slots. Host arrays and numpy index assignment (CPU provider); on CUDA the same would be a
Gather / ScatterND on device buffers, which is not written yet.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from app.decode import DecodeGraph, DecodeOutput
from app.runtime import OnnxModel

FloatArray = npt.NDArray[np.float32]
SlotArray = npt.NDArray[np.intp]


class SlotsFullError(Exception):
    """More rows asked to join than there are free slots."""


class SlotStates:
    """State tensors of shape (capacity, U); a row lives in one slot from join to leave."""

    def __init__(self, sizes: list[int], capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.tensors = [np.zeros((capacity, n), np.float32) for n in sizes]
        self._used = np.zeros(capacity, bool)

    @property
    def capacity(self) -> int:
        return int(self._used.shape[0])

    @property
    def active(self) -> int:
        return int(self._used.sum())

    def join(self, states: list[FloatArray]) -> SlotArray:
        """Write m rows of state ((m, U) each) into the lowest free slots; returns them (m,).
        Lowest first keeps the active slots packed, so a batch is often one contiguous run."""
        rows = int(states[0].shape[0])
        free = np.flatnonzero(~self._used)
        if rows > free.shape[0]:
            raise SlotsFullError(f"{rows} rows cannot join: {free.shape[0]} of "
                                 f"{self.capacity} slots are free")
        slots = free[:rows].astype(np.intp)
        self.write(slots, states)
        self._used[slots] = True
        return slots

    def leave(self, slots: SlotArray) -> None:
        """Free the slots; their stale contents are overwritten by the next join."""
        if not np.all(self._used[slots]):
            raise ValueError(f"slots {slots[~self._used[slots]].tolist()} are not in use")
        self._used[slots] = False

    def read(self, slots: SlotArray) -> list[FloatArray]:
        """The states of `slots`, in that order, (B, U) each: views when the slots are one
        ascending run (no copy), else gathered copies."""
        n = int(slots.shape[0])
        if n and int(slots[-1]) - int(slots[0]) == n - 1 and np.all(np.diff(slots) == 1):
            first = int(slots[0])
            return [t[first:first + n] for t in self.tensors]
        return [t[slots] for t in self.tensors]

    def write(self, slots: SlotArray, states: list[FloatArray]) -> None:
        for t, s in zip(self.tensors, states, strict=True):
            t[slots] = s


def step_slots(model: OnnxModel, slots: SlotStates, rows: SlotArray,
               ids: npt.NDArray[np.int32]) -> FloatArray:
    """One step-graph call for the rows in `rows` (ids (B, T)): logits (B, T, V); the new
    state goes back into the same slots."""
    logits, new = model.run_numpy(ids, slots.read(rows))
    slots.write(rows, new)
    return logits


def decode_slots(graph: DecodeGraph, slots: SlotStates, rows: SlotArray,
                 ids: npt.NDArray[np.int32], temperature: FloatArray,
                 top_k: npt.NDArray[np.int64], top_p: FloatArray,
                 uniforms: npt.NDArray[np.float64], details: bool | None = None
                 ) -> DecodeOutput:
    """One decode-graph call (K steps) for the rows in `rows`; states stay in their slots."""
    out = graph.run(ids, slots.read(rows), temperature, top_k, top_p, uniforms, details)
    slots.write(rows, out.states)
    return out
