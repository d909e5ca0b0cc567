"""Low-level float64 accumulation shared by the aggregation paths (``strategies``, ``svd``,
``methods.full_ft``): reused scratch buffers, so reducing a group of clients allocates nothing per
client. numpy only: the aggregate step imports no torch."""

from __future__ import annotations

import numpy as np


class Scratch:
    """Reused buffers (float64 unless told; grown on demand), so a group allocates nothing per client."""

    def __init__(self, dtype: type[np.floating] = np.float64) -> None:
        self._bufs: dict[str, np.ndarray] = {}
        self.dtype = dtype

    def get(self, name: str, size: int) -> np.ndarray:
        buf = self._bufs.get(name)
        if buf is None or buf.size < size:
            buf = self._bufs[name] = np.empty(size, self.dtype)
        return buf[:size]


def add_scaled(acc: np.ndarray, x: np.ndarray, w: float, scratch: np.ndarray) -> None:
    """``acc += w * x`` in float64 without allocating: the product goes into ``scratch``."""
    tmp = scratch[:x.size].reshape(x.shape)
    np.multiply(x, w, out=tmp)
    np.add(acc, tmp, out=acc)
