"""A small deterministic stand-in for OnnxModel, for sharp engine unit tests."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


class FakeModel:
    """Vocabulary of V ids; the next id is (last + 1) % V by a wide margin, state counts steps."""

    name = "fake"

    def __init__(self, vocab: int = 7, fail_after: int | None = None) -> None:
        self.v = vocab
        self.calls = 0
        self.batch_sizes: list[int] = []
        self.shapes: list[tuple[int, int]] = []  # (rows, characters) per call
        self.fail_after = fail_after

    def zero_states(self, rows: int) -> npt.NDArray[np.float32]:
        return np.zeros((rows, 1), np.float32)

    def states_from_host(self, arrays: list[npt.NDArray[np.float32]]) -> object:
        return np.asarray(arrays[0], np.float32)

    def states_to_host(self, states: object) -> list[npt.NDArray[np.float32]]:
        return [np.asarray(states, np.float32)]

    def select(self, states: object, rows: npt.NDArray[np.intp]) -> object:
        return np.asarray(states)[rows]

    def concat(self, parts: list[object]) -> object:
        return np.concatenate([np.asarray(p) for p in parts])

    def step(self, ids: npt.NDArray[np.int32], states: object
             ) -> tuple[npt.NDArray[np.float32], object]:
        self.calls += 1
        self.batch_sizes.append(ids.shape[0])
        self.shapes.append((int(ids.shape[0]), int(ids.shape[1])))
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("injected failure")
        b, t = ids.shape
        logits = np.zeros((b, t, self.v), np.float32)
        nxt = (ids + 1) % self.v
        np.put_along_axis(logits, nxt[..., None], 5.0, axis=-1)
        return logits, np.asarray(states) + t
