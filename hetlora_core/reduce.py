"""Low-level float64 accumulation shared by the aggregation paths (``strategies``, ``svd``,
``methods.full_ft``): reused scratch buffers, so reducing a group of clients allocates nothing per
client. numpy only: the aggregate step imports no torch."""

from __future__ import annotations

from collections.abc import Sequence

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


# Clients per weighted reduction in ``weighted_sum_into``: their float32 stack stays within ~1 MiB
# (this CPU's L2), so the stack is written and read in cache, not through memory.
CHUNK_BYTES = 1 << 20


def weighted_sum_into(acc: np.ndarray, xs: Sequence[np.ndarray], w: np.ndarray, scratch: Scratch) -> None:
    """``acc += sum_k w[k] * xs[k]`` for equal-shape arrays ``xs`` (float32 factors) into a float64
    ``acc`` of their shape (any strides: a transposed view works). Clients go in chunks of
    ``CHUNK_BYTES``: one copy into a reused float32 stack, one float32 GEMV with the weights, one add
    into ``acc``. Why float32 inside a chunk: the inputs are float32 (exact), a chunk sums a few to
    ~100 terms (rounding ~1e-7 relative to the chunk's sum, below the float32 result's resolution),
    and the float64 cast copy and GEMV read twice the bytes: this reduction was ~5x the numpy
    bandwidth floor that way. Across chunks the sum is float64."""
    (rows, cols), k = xs[0].shape, len(xs)
    c = max(1, CHUNK_BYTES // (4 * rows * cols))
    stack = scratch.get("wsum-stack", min(c, k) * rows * cols)
    res = scratch.get("wsum-res", rows * cols)
    w32 = np.asarray(w, dtype=np.float32)
    for s in range(0, k, c):
        part = xs[s:s + c]
        st = stack[:len(part) * rows * cols]
        np.concatenate(part, axis=0, out=st.reshape(len(part) * rows, cols))
        np.dot(w32[s:s + c], st.reshape(len(part), rows * cols), out=res)
        acc += res.reshape(rows, cols)
