"""Low-level float64 accumulation shared by the aggregation paths (``strategies``, ``svd``,
``methods.full_ft``): reused scratch buffers, so reducing a group of clients allocates nothing per
client. numpy only: the aggregate step imports no torch."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

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


# Clients per chunk of ``weighted_pair_into``: each factor's float32 stack about 1 MiB (this CPU's L2),
# so a stack is written and read in cache, not through memory. (1 MiB for both stacks together, i.e.
# half the clients per chunk, made zero-padding's reduction ~17% slower: twice the calls per client.)
CHUNK_BYTES = 2 << 20

# ``weigh(a, b, start)``: the weights of the chunk of clients ``start..`` from its stacks ``a`` (c, r, in)
# and ``b`` (c, out, r), for a caller whose weights depend on the factors (HetLoRA's ||B A||_F)
Weigh = Callable[[np.ndarray, np.ndarray, int], np.ndarray]


def weighted_pair_into(acc_a: np.ndarray, acc_b: np.ndarray, xa: Sequence[np.ndarray], xb: Sequence[np.ndarray],
                       w: np.ndarray | Weigh, scratch: Scratch) -> None:
    """``acc_a += sum_k w[k] * xa[k]`` and ``acc_b += sum_k w[k] * xb[k]`` for equal-shape float32
    factors ``xa`` (r, in) and ``xb`` (out, r) into float64 ``acc_a``, ``acc_b`` of their shapes (any
    strides: a transposed view works). Clients go in chunks of ``CHUNK_BYTES`` of both factors: one
    copy of each into a reused float32 stack, one float32 GEMV with the weights per factor, one add
    into the accumulator. Why float32 inside a chunk: the inputs are float32 (exact), a chunk sums a
    few to ~100 terms (rounding ~1e-7 relative to the chunk's sum, below the float32 result's
    resolution), and a float64 cast copy and GEMV read twice the bytes (this reduction was ~5x the
    numpy bandwidth floor that way). Across chunks the sum is float64.

    Why A and B in one chunk: ``w`` may be a function of the chunk's stacks (``Weigh``), so HetLoRA's
    sparsity weights are measured on the stacks the averaging copies anyway (one copy of every
    factor, not two). The weights are scaled per chunk by a power of two (exact) so that they sum to under 1 before
    the float32 cast, so unnormalised weights (norms up to float64's range, from untrusted uploads)
    never overflow float32."""
    k, (r, in_f), out_f = len(xa), xa[0].shape, xb[0].shape[0]
    c = max(1, CHUNK_BYTES // (4 * r * (in_f + out_f)))
    stack_a, stack_b = scratch.get("pair-a", min(c, k) * r * in_f), scratch.get("pair-b", min(c, k) * out_f * r)
    res_a, res_b = scratch.get("pair-res-a", r * in_f), scratch.get("pair-res-b", out_f * r)
    for s in range(0, k, c):
        n = min(c, k - s)
        a = np.concatenate(xa[s:s + n], axis=0, out=stack_a[:n * r * in_f].reshape(n * r, in_f))
        b = np.concatenate(xb[s:s + n], axis=0, out=stack_b[:n * out_f * r].reshape(n * out_f, r))
        ws = np.asarray(w(a.reshape(n, r, in_f), b.reshape(n, out_f, r), s) if callable(w) else w[s:s + n], np.float64)
        # By the sum, not the max: the scaled weights then add up to at most 1, so a chunk's float32
        # partial sums stay within its largest entry, as with normalised weights (hostile uploads).
        top = float(np.abs(ws).sum())
        e = math.frexp(top)[1] if 0 < top < math.inf else 0
        w32 = np.ldexp(ws, -e).astype(np.float32)
        np.dot(w32, a.reshape(n, r * in_f), out=res_a)
        np.dot(w32, b.reshape(n, out_f * r), out=res_b)
        if e:  # float64 products: the scale-back may leave float32's range
            acc_a += np.float64(2.0 ** e) * res_a.reshape(r, in_f)
            acc_b += np.float64(2.0 ** e) * res_b.reshape(out_f, r)
        else:
            acc_a += res_a.reshape(r, in_f)
            acc_b += res_b.reshape(out_f, r)
