"""The SVD half of Recon+SVD (FlexLoRA): sums of ``w_k s_k B_k A_k`` per module and their balanced
re-factoring at ``r_max``. Kept apart from ``strategies`` (factor averaging and the weights) so each
file holds one concern; numpy only."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .adapter import LoraAdapter
from .lapack import top_eigh
from .reduce import Scratch


def _balanced(U: np.ndarray, S: np.ndarray, Vh: np.ndarray, rank: int, scale: float,
              shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Rank-``rank`` factors from an SVD (singular values descending): ``B = U_r sqrt(S_r / s)``,
    ``A = sqrt(S_r / s) V_r^T``, zero-padded when fewer than ``rank`` singular values exist."""
    r = min(rank, S.shape[0])
    root = np.sqrt(S[:r] / scale)
    B = np.zeros((shape[0], rank), np.float32)
    A = np.zeros((rank, shape[1]), np.float32)
    B[:, :r], A[:r] = U[:, :r] * root, root[:, None] * Vh[:r]
    return A, B


def svd_factor(delta: np.ndarray, rank: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Balanced rank-``rank`` factors with ``scale * B @ A`` = best rank-r approximation of ``delta``.

    ``B = U_r sqrt(S_r / s)``, ``A = sqrt(S_r / s) V_r^T``: components are ordered by singular
    value, so truncating (B, A) to any r' <= rank is again the best rank-r' approximation."""
    U, S, Vh = np.linalg.svd(delta.astype(np.float64), full_matrices=False)
    return _balanced(U, S, Vh, rank, scale, (delta.shape[0], delta.shape[1]))


def _low_rank_svd(Bc: np.ndarray, Ac: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The leading ``rank`` singular triplets of ``Bc @ Ac`` (out x R by R x in, R small) without
    forming it: ``Bc = Q_b R_b``, ``Ac^T = Q_a R_a``, so ``Bc Ac = Q_b (R_b R_a^T) Q_a^T`` and the SVD
    of the R x R core gives the SVD of the product (exact up to rounding, not an approximation)."""
    Qb, Rb = np.linalg.qr(Bc)
    Qa, Ra = np.linalg.qr(Ac.T)
    U, S, Vh = np.linalg.svd(Rb @ Ra.T)
    k = min(rank, S.shape[0])
    return Qb @ U[:, :k], S, Vh[:k] @ Qa.T


def top_svd(delta: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The leading ``rank`` singular triplets of a dense float64 ``delta`` (out x in) from the
    eigendecomposition of its smaller Gram matrix (``delta delta^T`` or ``delta^T delta``), instead of
    a full SVD: ~2x faster at 576 x 576 (66 vs 126 ms, one thread) and only the leading triplets are
    used. Squaring costs accuracy only in the small singular values: an eigenvalue's error is about
    ``eps * sigma_1^2``, so ``sigma_i`` is accurate to ~1e-8 sigma_1 (float64), far below the float32
    factors' resolution. The other side's vectors come from one product (``u_i^T delta = sigma_i
    v_i^T``), so each returned pair is exactly balanced; a (numerically) zero ``sigma_i`` gives a
    zero vector, i.e. zero factors, as the full SVD's would be."""
    out_f, in_f = delta.shape
    k = min(rank, out_f, in_f)
    wide = out_f <= in_f  # eigenvectors of the smaller side; the other side by one product
    _, Q = top_eigh(delta @ delta.T if wide else delta.T @ delta, k)  # the k leading eigenvectors only (lapack.py)
    P = Q.T @ delta if wide else (delta @ Q).T  # rows: sigma_i times the other side's singular vector
    S = np.linalg.norm(P, axis=1)
    S[S <= np.finfo(np.float64).tiny * max(out_f, in_f)] = 0.0  # zero update: zero factors, no 0/0
    P /= np.where(S > 0, S, 1.0)[:, None]
    return (Q, S, P) if wide else (P.T, S, Q.T)


# The dense route's GEMMs run in float32 (the factors are float32: exact inputs; ~2x the float64
# GEMM's speed, 83 vs 40 GFLOP/s on one EPYC core) over at most this many stacked components each,
# and every product is added into the float64 sum: a float32 accumulation over K terms is off by
# ~sqrt(K) * 6e-8 relative, ~2e-6 at this K, below the float32 result's tolerance.
GEMM_K = 1024


class DeltaSums:
    """Recon+SVD's ``dW = sum_k w_k s_k B_k A_k`` per module, fed group by group: GEMMs of the
    column-stacked ``[w_k s_k B_k]`` (out x R) by the row-stacked ``[A_k]`` (R x in), float32, over
    chunks of whole clients of at most ``GEMM_K`` components, into a float64 (out x in) sum, never a dense delta per
    client; ``finish`` takes its leading triplets from the Gram matrix (``top_svd``). Where the round's whole stacked rank
    (``total_ranks``, known from the facts up front) is at most half of min(out, in), the stacked
    factors themselves are kept and ``finish`` factors their product through ``_low_rank_svd``
    (no out x in SVD): the same best rank-r approximation, at a fraction of the cost. A module's
    sum is allocated at its first group and freed when it is finished, as in ``averaging.FactorSums``."""

    def __init__(self, prev_global: LoraAdapter, r_max: int, total_ranks: Mapping[str, int]) -> None:
        self.prev, self.r_max = prev_global, r_max
        self.shapes = {m: (prev_global.B[m].shape[0], prev_global.A[m].shape[1]) for m in prev_global.modules}
        self.low_rank = {m for m, s in self.shapes.items() if 2 * total_ranks[m] <= min(s)}
        self.dense: dict[str, np.ndarray] = {}
        self.stacked: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {}
        self._done: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._scratch32 = Scratch(np.float32)

    def add(self, adapters: Sequence[LoraAdapter], w: np.ndarray) -> None:
        """Add a group with sample weights ``w``, module by module (see ``averaging.FactorSums.add``)."""
        for m in self.shapes:
            self.add_module(m, adapters, w)

    def add_module(self, m: str, adapters: Sequence[LoraAdapter], w: np.ndarray) -> None:
        ws = np.asarray(w, dtype=np.float64) * np.array([a.scale for a in adapters], dtype=np.float64)
        cols = np.repeat(ws, [a.A[m].shape[0] for a in adapters])  # column block k times w_k s_k
        if m in self.low_rank:
            Bc = np.concatenate([a.B[m] for a in adapters], axis=1, dtype=np.float64)
            Bc *= cols
            Bs, As = self.stacked.setdefault(m, ([], []))
            Bs.append(Bc)
            As.append(np.concatenate([a.A[m] for a in adapters], axis=0, dtype=np.float64))
            return
        out_f, in_f = self.shapes[m]
        if m not in self.dense:
            self.dense[m] = np.zeros((out_f, in_f))
        prod = self._scratch32.get("prod", out_f * in_f).reshape(out_f, in_f)
        ranks = [a.A[m].shape[0] for a in adapters]
        i, off = 0, 0
        while i < len(adapters):  # chunks of whole clients, at most GEMM_K components (or one client)
            j, width = i + 1, ranks[i]
            while j < len(adapters) and width + ranks[j] <= GEMM_K:
                width += ranks[j]
                j += 1
            # Reused float32 stacks of a few MiB, not a fresh group-sized pair per group: the step holds
            # a few MiB of stacks instead of one group's module share again (the time did not change
            # measurably in one loaded run)
            # The B stack is built transposed, [B_k^T] (width x out), row block by row block, and handed
            # to sgemm as its transpose (a flag, no copy): numpy's copy of each B_k^T into a contiguous
            # block ran ~2.5x faster than the column stack [B_k] (r floats into each of out rows 4 KiB
            # apart, then a separate column-scaling pass), the weights then scale whole rows, and the
            # GEMM's speed is the same either way (68 GFLOP/s, 576 x 998 x 576, one EPYC core).
            BkT = np.concatenate([a.B[m].T for a in adapters[i:j]], axis=0,
                                 out=self._scratch32.get("B", width * out_f).reshape(width, out_f))
            Ak = np.concatenate([a.A[m] for a in adapters[i:j]], axis=0,
                                out=self._scratch32.get("A", width * in_f).reshape(width, in_f))
            # Security: uploads are untrusted and float32 overflows at 3.4e38. An overflow anywhere
            # (in the weighting of B, a product or a partial sum) leaves an inf or a nan in the result
            # (inf + x = inf, inf - inf = nan), so one sum of it tells (a huge finite sum only costs a
            # needless float64 redo); such a chunk is redone in float64 from the unscaled factors, where
            # the sum stays finite and the outlier is judged as a number, not as an inf. (This replaced a
            # bound from the factors' max-abs, whose temporaries read every stacked factor twice more.)
            with np.errstate(over="ignore", invalid="ignore"):
                BkT *= cols[off:off + width, None].astype(np.float32)
                np.matmul(BkT.T, Ak, out=prod)
                finite = bool(np.isfinite(prod.sum()))
            if finite:
                self.dense[m] += prod
            else:
                Bk64 = np.concatenate([a.B[m] for a in adapters[i:j]], axis=1, dtype=np.float64) * cols[off:off + width]
                self.dense[m] += Bk64 @ Ak.astype(np.float64)
            i, off = j, off + width

    def finish(self, m: str) -> None:
        """Module ``m``'s balanced factors by SVD; its sums are freed."""
        shape = self.shapes[m]
        if m in self.low_rank:
            Bs, As = self.stacked.pop(m, ([np.zeros((shape[0], 1))], [np.zeros((1, shape[1]))]))
            U, S, Vh = _low_rank_svd(np.concatenate(Bs, axis=1), np.concatenate(As, axis=0), self.r_max)
        else:
            U, S, Vh = top_svd(self.dense.pop(m, np.zeros(shape)), self.r_max)
        self._done[m] = _balanced(U, S, Vh, self.r_max, self.prev.scale, shape)

    def result(self) -> LoraAdapter:
        for m in self.shapes:
            if m not in self._done:
                self.finish(m)
        return LoraAdapter({m: self._done[m][0] for m in self.shapes}, {m: self._done[m][1] for m in self.shapes}, self.prev.scale)
