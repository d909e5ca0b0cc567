"""The training-time tail regulariser (HETLORA.md step 3): ``lam * sum_m score_m`` over the live,
differentiable LoRA tensors of a client's peft model.

It is the torch twin of ``pruning.tail_score`` (same tails, same two scores), kept apart so that the
model-free prune and aggregate steps import no torch: only local training needs gradients.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .config import PruningConfig
from .pruning import tail_start


def tail_score(A: torch.Tensor, B: torch.Tensor, start: int, kind: str) -> torch.Tensor:
    """Differentiable tail score of one module (A: r x in, B: out x r), in float32."""
    a_tail, b_tail = A[start:].float(), B[:, start:].float()
    if kind == "product_of_norms":
        return torch.linalg.vector_norm(b_tail) * torch.linalg.vector_norm(a_tail)
    if kind == "norm_of_product":
        return torch.linalg.matrix_norm(b_tail @ a_tail)
    raise ValueError(f"unknown pruning score {kind!r}")


def regulariser(A: Mapping[str, torch.Tensor], B: Mapping[str, torch.Tensor], received_ranks: Mapping[str, int],
                cfg: PruningConfig, r_min: int) -> torch.Tensor | None:
    """``lam * sum_m score_m`` with each tail fixed by the rank the module was *received* at, or None
    when it does not apply (pruning off, lam = 0, or every module already at r_min with
    ``regularize_at_r_min`` off: it cannot prune, so the penalty only hurts)."""
    if not cfg.enabled or cfg.lam == 0:
        return None
    mods = [m for m in A if cfg.regularize_at_r_min or received_ranks[m] > r_min]
    if not mods:
        return None
    scores = [tail_score(A[m], B[m], tail_start(received_ranks[m], cfg.gamma), cfg.score) for m in mods]
    return cfg.lam * torch.stack(scores).sum()
