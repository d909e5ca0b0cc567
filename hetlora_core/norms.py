"""``||s B A||_F`` per module for many adapters at once: the sparsity weights of HetLoRA and the
update-norm clipping. numpy only (the aggregate step loads no torch).

Why this shape of computation: ``||B A||_F^2 = sum((B^T B) * (A A^T))`` needs two r x r Gram
matrices, ``r^2 (in + out)`` multiply-adds per module and client, never the out x in product. That
is compute-bound (about r/2 multiply-adds per float read) and the matrices are too small for BLAS to
run near its peak, so it dominated HetLoRA's aggregation (10.8x the numpy floor at 1000 SmolLM2
clients, per client and float64). Here the modules of equal shapes (every q_proj of every client of
one rank) go through one batched float32 matmul per chunk (~1.5x the float64 speed, one call per
chunk instead of one per client), and only the r x r Hadamard sums run in float64.

Accuracy: the factors are float32 (exact inputs); a float32 Gram entry is off by about
``sqrt(n) * 6e-8`` of ``|a_i| |a_j|``, so the norm is off by ~1e-7 relative unless ``B A`` nearly
cancels (its norm far below ``sum_i |a_i| |b_i|``, the norm without cancellation). Such a module is
recomputed in float64 (``CANCELLATION``), so the weights keep ~1e-6 relative accuracy everywhere
(tests/test_norms.py compares with the dense float64 ``||B @ A||``).

One adapter (``LoraAdapter.delta_norms``, what the streaming aggregate step computes upload by
upload) goes through this same code, so it gives the same bits as a batch: the step and the
in-memory ``strategies.aggregate`` agree byte for byte.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from . import ckernels

# A module whose float32 ``||B A||^2`` is below this fraction of ``(sum_i |a_i| |b_i|)^2`` (its value
# without cancellation; random factors sit at ~1/r, so ranks above ~100 would always take the float64
# route: correct, only slower) is recomputed in float64: there the float32 Gram's rounding could
# exceed ~1e-6 of the result.
CANCELLATION = 1e-2
# Clients per batched matmul: a chunk's float32 stacks stay within ~1 MiB (this CPU's L2).
CHUNK_BYTES = 1 << 20


def _gram_sq(a: np.ndarray, b: np.ndarray, compiled: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """``||B_k A_k||_F^2`` for stacks ``a`` (c, r, in) and ``b`` (c, out, r), in the dtype of the
    stacks for the Gram matrices and float64 for their Hadamard sums; float32 results where the
    cancellation test fails are recomputed in float64. ``compiled``: ``(sq, diag)`` of these clients
    from ``ckernels.gram_sq_list`` (then ``a`` and ``b`` are read only for the float64 recomputation)."""
    c = len(a)
    if compiled is None and a.dtype == np.float32:
        compiled = ckernels.gram_sq(a, b)  # both Grams of a client in one compiled pass
    if compiled is not None:
        sq, diag = compiled
    else:
        with np.errstate(over="ignore", invalid="ignore"):  # float32 overflow is caught below, not warned about
            ga = np.matmul(a, a.transpose(0, 2, 1)).astype(np.float64)
            gb = np.matmul(b.transpose(0, 2, 1), b).astype(np.float64)
            sq = (ga * gb).reshape(c, -1).sum(axis=1)  # row by row: a client's bits do not depend on its chunk
            diag = np.sqrt(np.abs(np.diagonal(ga, axis1=1, axis2=2) * np.diagonal(gb, axis1=1, axis2=2))).sum(axis=1)
    if a[0].dtype != np.float64:
        # Security: untrusted factors near float32's range overflow a float32 Gram (inf, or nan
        # from inf - inf): those are recomputed in float64 like the cancelling ones, so a huge
        # update gets its true (huge, finite) norm and is judged by it, never by a nan.
        bad = np.flatnonzero(~np.isfinite(sq) | ~np.isfinite(diag) | (sq < CANCELLATION * diag * diag))
        if bad.size:
            sq[bad] = _gram_sq(np.stack([a[i] for i in bad]).astype(np.float64), np.stack([b[i] for i in bad]).astype(np.float64))
    return sq


def delta_norms_many(adapters: Sequence[tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray], float]]) -> list[dict[str, float]]:
    """``||s B A||_F`` per module of every ``(A, B, scale)`` triple, modules in sorted order (as
    ``LoraAdapter.modules``: callers sum these in dict order). Modules of equal (A, B) shapes, across
    all adapters and modules, are stacked and reduced together in chunks of ``CHUNK_BYTES``."""
    same: dict[tuple[tuple[int, ...], tuple[int, ...]], list[tuple[int, str]]] = {}
    for k, (A, B, _) in enumerate(adapters):
        for m in A:
            same.setdefault((A[m].shape, B[m].shape), []).append((k, m))
    sq: dict[tuple[int, str], float] = {}
    buf_a, buf_b = np.empty(0, np.float32), np.empty(0, np.float32)  # reused stacks: a chunk allocates nothing
    for ((r, in_f), (out_f, _)), items in same.items():
        chunk = max(1, CHUNK_BYTES // max(1, 4 * r * (in_f + out_f)))
        for s in range(0, len(items), chunk):
            part = items[s:s + chunk]
            xa, xb = [adapters[k][0][m] for k, m in part], [adapters[k][1][m] for k, m in part]
            if all(x.dtype == np.float32 for x in xa) and all(x.dtype == np.float32 for x in xb):
                if buf_a.size < len(part) * r * in_f or buf_b.size < len(part) * out_f * r:
                    buf_a, buf_b = np.empty(chunk * r * in_f, np.float32), np.empty(chunk * out_f * r, np.float32)
                # np.stack's layout from one concatenate (np.stack adds Python work per array)
                a = np.concatenate(xa, axis=0, out=buf_a[:len(part) * r * in_f].reshape(len(part) * r, in_f))
                b = np.concatenate(xb, axis=0, out=buf_b[:len(part) * out_f * r].reshape(len(part) * out_f, r))
            else:  # wider inputs: float64 throughout, no precision dropped
                a = np.concatenate(xa, axis=0, dtype=np.float64)
                b = np.concatenate(xb, axis=0, dtype=np.float64)
            sq.update(zip(part, _gram_sq(a.reshape(len(part), r, in_f), b.reshape(len(part), out_f, r)).tolist(), strict=True))
    # abs(scale) * sqrt(sq): the same IEEE operations as ``stack_norms``'s arrays, so the same bits
    return [{m: abs(scale) * math.sqrt(max(sq[(k, m)], 0.0)) for m in sorted(A)} for k, (A, _, scale) in enumerate(adapters)]


def stack_norms(a: np.ndarray | Sequence[np.ndarray], b: np.ndarray | Sequence[np.ndarray], scales: np.ndarray) -> np.ndarray:
    """``||s_k B_k A_k||_F`` of a chunk of factors ``a`` (c arrays r x in, or their stack (c, r, in))
    and ``b`` (c arrays out x r), float64: the factor averaging measures HetLoRA's sparsity weights on
    the chunks it reads anyway (``reduce.weighted_pair_into``). Bit for bit ``delta_norms_many``'s
    numbers (a client's bits do not depend on its chunk, nor on whether its factors were stacked: the
    compiled kernel runs the same code per client), so the streaming step, which has them from its
    first pass, gets the same weights."""
    compiled = None if isinstance(a, np.ndarray) or isinstance(b, np.ndarray) else ckernels.gram_sq_list(a, b)
    if compiled is None:
        a, b = np.asarray(a), np.asarray(b)  # a list that the kernel refused: stacked
        if a.dtype != np.float32 or b.dtype != np.float32:
            a, b = a.astype(np.float64), b.astype(np.float64)
    sq = _gram_sq(a, b, compiled)  # type: ignore[arg-type]  # a list only with ``compiled`` (read for recomputations)
    return np.abs(np.asarray(scales, np.float64)) * np.sqrt(np.maximum(sq, 0.0))
