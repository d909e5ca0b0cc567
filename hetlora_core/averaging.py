"""The factor-averaging half of the LoRA aggregation (HetLoRA, zero-padding, HomLoRA): running
float64 sums of the zero-padded (or rank-aware padded) factors, fed module by module and rank group
by rank group. Kept apart from ``strategies`` (the weights, the groups, the ``Aggregation`` driver)
so each file holds one concern, as ``svd`` holds Recon+SVD's half; numpy only."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .adapter import AdapterError, LoraAdapter
from .config import StrategyConfig
from .reduce import Chunk, Scratch, Weigh, weighted_pair_into


class FactorSums:
    """Running float64 sums ``sum_k W[k, j] pad(A_k)``, ``sum_k W[k, j] pad(B_k)``, the column
    weights ``sum_k W[k, j]`` and the total weight ``sum_k p_k`` per module at ``r_max`` (component j
    of client k weighs ``W[k, j] = p_k`` if ``j < r_k`` else 0, its zero padding). B is accumulated
    transposed (component j = row j of both sums), so every update of a sum runs over contiguous
    rows. A module's sums are allocated at its first group and freed when it is finished (fed module
    by module, the allocator then hands the next module the same, already mapped, memory)."""

    def __init__(self, prev_global: LoraAdapter, r_max: int, cfg: StrategyConfig) -> None:
        self.prev, self.r_max, self.cfg = prev_global, r_max, cfg
        self._sums: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}  # module -> (a, bt, col, total)
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
                             np.zeros(self.r_max), np.zeros(1))
        a, bt, col, total = self._sums[m]
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
        total += ws.sum()  # the same float additions as every trained column: equal where all clients trained j
        return ws

    def reset(self, m: str) -> None:
        """Forget module ``m``'s sums (its weights are to be replaced: ``Aggregation``'s fallback)."""
        self._sums.pop(m, None)

    def finish(self, m: str, divisor: float = 1.0) -> None:
        """Module ``m``'s float32 factors; its float64 sums are freed. The sums are divided by
        ``divisor`` first (HetLoRA adds unnormalised sparsity weights, the norms themselves, and
        divides by their total here). ``normalisation="paper"``
        uses W as is (the paper's formula: zero padding). ``"rank_aware"`` pads a client that did
        not train component j (rank, received or pruned, <= j) with the previous global's
        component j -- it trained from that global, so what it did not receive it did not change --
        i.e. adds ``(sum_k p_k - sum_k W[k, j]) * prev[j]`` to both sums. Component j then moves by
        the weighted average of the clients' updates (a non-trainer's is zero): a lone client of
        weight p_k moves it by ~p_k of its update, as FedAvg would, not p_k^2 (paper) nor 1. Where
        every client trained j the added weight is exactly 0.0 (same float sums): the paper's bytes.

        Why not renormalise column j by ``sum_k W[k, j]`` (this option's first form, issue 16): a
        lone client's tail entered at full strength every round; on SmolLM2 (bench ``full``, seed 2)
        the global tail ``||B A||`` went 17.9 -> 25.3 -> 41.0 -> 55.0 in 4 rounds (paper 5.6..8.8,
        this padding 8.0 -> 23.2), final perplexity 80.1 / 121.0 / 127.9 over seeds 0-2 (base
        119.8). A ``sqrt`` split over both factors: 67.6 / 90.4 / 229.5. This padding: 68.3 / 80.6
        / 79.6; the paper's formula: 64.3 / 71.6 / 66.8 (its p_k^2 damping regularises the tail).

        Components with ``sum_k W[k, j] == 0`` keep the previous global value
        (``untrained_components = "keep"``, what rank-aware padding gives anyway when the weights
        sum to 1) or become zero (``"zero"``, paper-literal)."""
        if m in self._done:
            return
        r_max, in_f, out_f = self.r_max, self.prev.A[m].shape[1], self.prev.B[m].shape[0]
        a, bt, col, total = self._sums.pop(m, None) or (np.zeros((r_max, in_f)), np.zeros((r_max, out_f)), np.zeros(r_max), np.zeros(1))
        if divisor != 1.0:  # the same divisions for col and total: equal where every client trained j
            for x in (a, bt, col, total):
                x /= divisor
        untrained = col == 0
        if self.cfg.normalisation == "rank_aware":
            gap = total[0] - col  # the weight of the clients that did not train component j
            for j in np.flatnonzero(gap):  # row by row: no module-sized temporary
                a[j] += gap[j] * self.prev.A[m][j]
                bt[j] += gap[j] * self.prev.B[m][:, j]
            if self.cfg.untrained_components == "zero":
                a[untrained], bt[untrained] = 0.0, 0.0
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
