"""The factor-averaging half of the LoRA aggregation (HetLoRA, zero-padding, HomLoRA): running
float64 sums of the zero-padded factors, fed module by module and rank group
by rank group. Kept apart from ``strategies`` (the weights, the groups, the ``Aggregation`` driver)
so each file holds one concern, as ``svd`` holds Recon+SVD's half; numpy only."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .adapter import AdapterError, LoraAdapter
from .config import StrategyConfig
from .reduce import Chunk, Scratch, Weigh, weighted_pair_into


class FactorSums:
    """Running float64 sums ``sum_k W[k, j] pad(A_k)``, ``sum_k W[k, j] pad(B_k)`` and the column
    weights ``sum_k W[k, j]`` per module at ``r_max`` (component j of client k weighs
    ``W[k, j] = p_k`` if ``j < r_k`` else 0, its zero padding). B is accumulated
    transposed (component j = row j of both sums), so every update of a sum runs over contiguous
    rows. A module's sums are allocated at its first group and freed when it is finished (fed module
    by module, the allocator then hands the next module the same, already mapped, memory)."""

    def __init__(self, prev_global: LoraAdapter, r_max: int, cfg: StrategyConfig) -> None:
        self.prev, self.r_max, self.cfg = prev_global, r_max, cfg
        self._sums: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # module -> (a, bt, col)
        self._done: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # module -> (A, B) float32
        self._scratch32 = Scratch(np.float32)

    def add(self, adapters: Sequence[LoraAdapter], w: Mapping[str, np.ndarray]) -> None:
        """Add a group of adapters of equal per-module ranks with weights ``w[module]`` (one per
        adapter), module by module. Each module's sums see the same operations whatever order the
        modules and groups come in (``add_module``), so the result does not depend on it."""
        ranks = adapters[0].ranks
        if any(a.ranks != ranks for a in adapters[1:]):
            raise AdapterError("a group's adapters must have equal per-module ranks (see rank_groups)")
        for m in ranks:
            self.add_module(m, adapters, w[m])

    def add_module(self, m: str, adapters: Sequence[LoraAdapter], w: np.ndarray | Weigh) -> np.ndarray:
        """Module ``m`` of a group (equal ranks there): A and B reduced chunk by chunk in one
        ``weighted_pair_into`` (B into B^T's sum through a transposed view: B as stored, no
        transposing copy). ``w``: the weights, one per adapter, or a ``Weigh`` that measures them on
        each chunk's stacks (HetLoRA's norms, computed where the factors are copied anyway).
        Returns the weights used (float64)."""
        if m not in self._sums:
            self._sums[m] = (np.zeros((self.r_max, self.prev.A[m].shape[1])), np.zeros((self.r_max, self.prev.B[m].shape[0])),
                             np.zeros(self.r_max))
        a, bt, col = self._sums[m]
        r = adapters[0].A[m].shape[0]
        if callable(w):
            measure, ws = w, np.zeros(len(adapters))

            def weigh(sa: Chunk, sb: Chunk, s: int) -> np.ndarray:
                ws[s:s + len(sa)] = measure(sa, sb, s)
                return ws[s:s + len(sa)]
            weighted_pair_into(a[:r], bt[:r].T, [x.A[m] for x in adapters], [x.B[m] for x in adapters], weigh, self._scratch32)
        else:
            ws = np.asarray(w, dtype=np.float64)
            weighted_pair_into(a[:r], bt[:r].T, [x.A[m] for x in adapters], [x.B[m] for x in adapters], ws, self._scratch32)
        col[:r] += ws.sum()
        return ws

    def reset(self, m: str) -> None:
        """Forget module ``m``'s sums (its weights are to be replaced: ``Aggregation``'s fallback)."""
        self._sums.pop(m, None)

    def finish(self, m: str, divisor: float = 1.0) -> None:
        """Module ``m``'s float32 factors; its float64 sums are freed. The sums are divided by
        ``divisor`` first (HetLoRA adds unnormalised sparsity weights, the norms themselves, and
        divides by their total here). W is used as is: the paper's formula, zero padding, so a
        component only client k trained enters ``B A`` at p_k^2 times that client's own.

        Issue 16's ``strategy.normalisation: rank_aware`` undid that damping and was removed: per-column
        renormalisation diverged, a sqrt split over both factors and padding with the previous global's
        components (its last form) stayed behind the paper: 77.02 vs 67.28 perplexity on CPU (12.2% +- 3.4%
        s.e., docs/results.md, 3 seeds), 58.94 vs 54.30 on an H200 (8.0% +- 1.5%, docs/results-gpu.md, 2
        seeds; rising after round ~10). The p_k^2 damping of a rarely trained tail regularises it.

        Components with ``sum_k W[k, j] == 0`` keep the previous global value
        (``untrained_components = "keep"``) or become zero (``"zero"``, paper-literal)."""
        if m in self._done:
            return
        r_max, in_f, out_f = self.r_max, self.prev.A[m].shape[1], self.prev.B[m].shape[0]
        a, bt, col = self._sums.pop(m, None) or (np.zeros((r_max, in_f)), np.zeros((r_max, out_f)), np.zeros(r_max))
        if divisor != 1.0:
            for x in (a, bt, col):
                x /= divisor
        untrained = col == 0
        if self.cfg.untrained_components == "keep" and untrained.any():
            a[untrained] = self.prev.A[m][untrained]
            bt[untrained] = self.prev.B[m][:, untrained].T
        self._done[m] = (a.astype(np.float32), np.ascontiguousarray(bt.T, dtype=np.float32))

    def result(self) -> LoraAdapter:
        for m in self.prev.modules:
            if m not in self._done:
                self.finish(m)
        return LoraAdapter({m: self._done[m][0] for m in self.prev.modules}, {m: self._done[m][1] for m in self.prev.modules},
                           self.prev.scale)
