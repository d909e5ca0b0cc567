"""Rank self-pruning (HETLORA.md steps 3 and 4): the tail score and the prune decision.

For a module received at rank r the tail is components ``t = floor(gamma * r) .. r-1``. Training
adds ``lam * sum_m score_m`` with ``score_m = ||B[:, t:]||_F * ||A[t:, :]||_F`` (product of norms,
default) or ``||B[:, t:] @ A[t:, :]||_F`` (norm of the product); that differentiable penalty is
``regulariser.regulariser`` on the torch side. After training, if the score went down compared with
the modules as received, the client drops its tail: ``r <- max(r_min, t)``.
All functions here are pure over numpy arrays: the prune step needs no model and loads no torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .adapter import LoraAdapter
from .config import PruningConfig


def tail_start(rank: int, gamma: float) -> int:
    """First tail component: floor(gamma * r). With gamma=0.99 and r <= 100 that is r - 1."""
    return int(math.floor(gamma * rank + 1e-9))


def tail_score(A: np.ndarray, B: np.ndarray, start: int, kind: str) -> float:
    """Tail score of one module (A: r x in, B: out x r), in float32 like the training-time
    regulariser, so the decision compares the quantity training pushed down."""
    a_tail, b_tail = A[start:], B[:, start:]
    if kind == "product_of_norms":
        return float(np.linalg.norm(b_tail) * np.linalg.norm(a_tail))
    if kind == "norm_of_product":
        return float(np.linalg.norm(b_tail @ a_tail))
    raise ValueError(f"unknown pruning score {kind!r}")


def tail_scores(A: Mapping[str, np.ndarray], B: Mapping[str, np.ndarray], received_ranks: Mapping[str, int],
                cfg: PruningConfig) -> dict[str, float]:
    """Per-module tail scores, with each tail fixed by the rank the module was *received* at."""
    return {m: tail_score(A[m], B[m], tail_start(received_ranks[m], cfg.gamma), cfg.score) for m in A}


@dataclass(frozen=True)
class PruneDecision:
    old_ranks: dict[str, int]  # as received
    new_ranks: dict[str, int]  # after the decision
    score_before: float
    score_after: float

    @property
    def pruned(self) -> bool:
        return self.components_pruned > 0

    @property
    def components_pruned(self) -> int:
        return sum(self.old_ranks[m] - r for m, r in self.new_ranks.items())


def decide(received: LoraAdapter, trained: LoraAdapter, cfg: PruningConfig, r_min: int) -> PruneDecision:
    """Compare the tail score as received and as trained; prune where it decreased.

    ``cfg.decision == "client"``: one decision over the sum of all modules' scores (default);
    ``"module"``: each module decides alone. A rank never drops below ``r_min``. In round 0 the
    received B is zero, so the score before is 0, it cannot decrease, and nothing is pruned."""
    ranks = received.ranks
    before = tail_scores(received.A, received.B, ranks, cfg)
    after = tail_scores(trained.A, trained.B, ranks, cfg)
    target = {m: max(r_min, tail_start(r, cfg.gamma)) for m, r in ranks.items()}
    if not cfg.enabled:
        new = dict(ranks)
    elif cfg.decision == "client":
        shrink = sum(after.values()) < sum(before.values())
        new = {m: (target[m] if shrink else r) for m, r in ranks.items()}
    else:
        new = {m: (target[m] if after[m] < before[m] else r) for m, r in ranks.items()}
    return PruneDecision(dict(ranks), new, sum(before.values()), sum(after.values()))


def self_prune(received: LoraAdapter, trained: LoraAdapter, cfg: PruningConfig, r_min: int) -> tuple[LoraAdapter, PruneDecision]:
    """The prune step of a client: decide, then drop trailing components (B columns, A rows)."""
    d = decide(received, trained, cfg, r_min)
    return (trained.truncate(d.new_ranks) if d.pruned else trained), d
