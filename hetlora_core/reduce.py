"""Low-level float64 accumulation shared by the aggregation paths (``strategies``, ``svd``,
``methods.full_ft``): reused scratch buffers, so reducing a group of clients allocates nothing per
client. numpy only: the aggregate step imports no torch."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from . import ckernels


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

# Clients per chunk of the compiled route's weighed calls (``_pair_in_place``): a chunk's factors (~1 MiB,
# this CPU's L2) are mostly still cached when the weighted sums read them again after the weights were
# measured on them (256 KiB chunks measured 1.4x slower: fewer clients per pass over the sums).
CHUNK_BYTES_C = 1 << 20

# ``weigh(a, b, start)``: the weights of the chunk of clients ``start..`` from its factors ``a`` (c
# arrays r x in: a list, or a stack (c, r, in)) and ``b`` (c arrays out x r), for a caller whose
# weights depend on the factors (HetLoRA's ||B A||_F)
Chunk = np.ndarray | Sequence[np.ndarray]
Weigh = Callable[[Chunk, Chunk, int], np.ndarray]


def _pair_in_place(acc_a: np.ndarray, acc_b: np.ndarray, xa: Sequence[np.ndarray], xb: Sequence[np.ndarray],
                   w: np.ndarray | Weigh) -> bool:
    """``weighted_pair_into`` through the compiled kernels (``ckernels.wsum_into``): the clients'
    arrays read where they are, no stack copy, float64 sums (eight clients per pass over the sum).
    Chunks of ``CHUNK_BYTES_C`` (shapes alone fix them, so the weights-given and the weighed calls
    add the same numbers in the same order: the same bytes). False, before anything is added or
    weighed, where the kernels or the arrays do not allow it (then the numpy route runs)."""
    (r, in_f), out_f = xa[0].shape, xb[0].shape[0]
    if acc_a.dtype != np.float64 or not acc_a.flags.c_contiguous or acc_b.dtype != np.float64 or acc_b.shape != (out_f, r):
        return False
    pa, pb = ckernels.addresses(xa, (r, in_f)), ckernels.addresses(xb, (out_f, r))  # every array checked up front
    if pa is None or pb is None:
        return False
    # Weights given: the whole group in one call per factor. Weighed: chunks of CHUNK_BYTES_C, a multiple
    # of the kernel's 8 clients per pass, so both add the same numbers in the same order (same bytes).
    c = len(xa) if not callable(w) else 8 * max(1, CHUNK_BYTES_C // (32 * r * (in_f + out_f)))
    sum_b = np.zeros((out_f, r))  # B's own layout; added into acc_b (a transposed view, as FactorSums passes it) once
    for s in range(0, len(xa), c):
        ws = np.asarray(w(xa[s:s + c], xb[s:s + c], s) if callable(w) else w[s:s + c], np.float64)
        ok = ckernels.wsum_into(acc_a, pa[s:s + c], ws) and ckernels.wsum_into(sum_b, pb[s:s + c], ws)
        if not ok:  # cannot happen after the checks above (kept as a hard stop, not a silent partial sum)
            raise RuntimeError("compiled weighted sum refused arrays it had accepted")
    acc_b += sum_b
    return True


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
    never overflow float32.

    Where the compiled kernels run (``ckernels``), ``_pair_in_place`` does all of this without the
    stacks: the clients' arrays are read in place and summed in float64 (no float32 partial sums, so
    no weight scaling), ~0.6x the time of this route at 1000 SmolLM2 clients."""
    k, (r, in_f), out_f = len(xa), xa[0].shape, xb[0].shape[0]
    if ckernels.available() and _pair_in_place(acc_a, acc_b, xa, xb, w):
        return
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
