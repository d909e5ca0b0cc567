"""Tail regulariser (torch, training time) and prune decision (numpy, model-free)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hetlora_core.adapter import LoraAdapter
from hetlora_core.config import PruningConfig
from hetlora_core.pruning import decide, self_prune, tail_score, tail_start
from hetlora_core.regulariser import regulariser
from hetlora_core.regulariser import tail_score as torch_tail_score


def adapter(rank: int, seed: int = 0) -> LoraAdapter:
    g = np.random.default_rng(seed)
    return LoraAdapter({"p": g.standard_normal((rank, 4), np.float32), "q": g.standard_normal((rank, 5), np.float32)},
                       {"p": g.standard_normal((3, rank), np.float32), "q": g.standard_normal((6, rank), np.float32)}, 1.0)


def tensors(a: LoraAdapter) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return {m: torch.from_numpy(t) for m, t in a.A.items()}, {m: torch.from_numpy(t) for m, t in a.B.items()}


def test_tail_start():
    assert tail_start(10, 0.99) == 9 and tail_start(100, 0.99) == 99 and tail_start(2, 0.99) == 1
    assert tail_start(10, 0.5) == 5 and tail_start(7, 0.5) == 3


@pytest.mark.parametrize("kind", ["product_of_norms", "norm_of_product"])
def test_regulariser_gradient_touches_only_the_tail(kind):
    a = adapter(8)
    A = {m: torch.tensor(t, requires_grad=True) for m, t in a.A.items()}
    B = {m: torch.tensor(t, requires_grad=True) for m, t in a.B.items()}
    cfg = PruningConfig(lam=0.5, gamma=0.75, score=kind)  # tail = components 6, 7
    reg = regulariser(A, B, {"p": 8, "q": 8}, cfg, r_min=2)
    reg.backward()
    for m in A:
        assert torch.count_nonzero(A[m].grad[:6]) == 0 and torch.count_nonzero(B[m].grad[:, :6]) == 0
        assert torch.count_nonzero(A[m].grad[6:]) > 0 and torch.count_nonzero(B[m].grad[:, 6:]) > 0
    expected = 0.5 * sum(tail_score(a.A[m], a.B[m], 6, kind) for m in A)
    assert float(reg.detach()) == pytest.approx(expected, rel=1e-6)
    if kind == "product_of_norms":
        m = "p"
        assert tail_score(a.A[m], a.B[m], 6, kind) == pytest.approx(
            float(np.linalg.norm(a.B[m][:, 6:].astype(np.float64)) * np.linalg.norm(a.A[m][6:].astype(np.float64))), rel=1e-6)


@pytest.mark.parametrize("kind", ["product_of_norms", "norm_of_product"])
@pytest.mark.parametrize("start", [0, 3, 7])
def test_numpy_score_equals_the_torch_score(kind, start):
    """The prune decision (numpy) measures exactly what training pushed down (torch)."""
    a = adapter(8, seed=start)
    A, B = tensors(a)
    for m in a.modules:
        assert tail_score(a.A[m], a.B[m], start, kind) == pytest.approx(float(torch_tail_score(A[m], B[m], start, kind)),
                                                                         rel=1e-6)
    with pytest.raises(ValueError, match="unknown pruning score"):
        tail_score(a.A["p"], a.B["p"], start, "nuclear")


def test_regulariser_skipped_at_r_min_and_when_off():
    A, B = tensors(adapter(2))
    assert regulariser(A, B, {"p": 2, "q": 2}, PruningConfig(), r_min=2) is None
    assert regulariser(A, B, {"p": 2, "q": 2}, PruningConfig(regularize_at_r_min=True), r_min=2) is not None
    assert regulariser(A, B, {"p": 2, "q": 2}, PruningConfig(enabled=False), r_min=1) is None
    assert regulariser(A, B, {"p": 2, "q": 2}, PruningConfig(lam=0.0), r_min=1) is None


def shrink_tail(a: LoraAdapter, start: int, factor: float) -> LoraAdapter:
    b = a.clone()
    for m in b.modules:
        b.A[m][start:] *= factor
    return b


def test_prune_decision_goes_both_ways():
    cfg = PruningConfig(gamma=0.99)
    received = adapter(8)
    pruned, d = self_prune(received, shrink_tail(received, 7, 0.5), cfg, r_min=2)
    assert d.pruned and d.new_ranks == {"p": 7, "q": 7} and pruned.ranks == {"p": 7, "q": 7}
    assert d.components_pruned == 2 and d.score_after < d.score_before
    kept, d2 = self_prune(received, shrink_tail(received, 7, 2.0), cfg, r_min=2)
    assert not d2.pruned and kept.ranks == {"p": 8, "q": 8}


def test_round_zero_never_prunes():
    received = adapter(8)
    received.B = {m: np.zeros_like(b) for m, b in received.B.items()}
    trained = adapter(8, seed=1)
    assert not decide(received, trained, PruningConfig(), r_min=2).pruned


def test_rank_never_below_r_min_and_gamma_half():
    received = adapter(4)
    _, d = self_prune(received, shrink_tail(received, 0, 0.1), PruningConfig(gamma=0.5), r_min=3)
    assert d.new_ranks == {"p": 3, "q": 3}
    r2 = adapter(3)
    _, d = self_prune(r2, shrink_tail(r2, 0, 0.1), PruningConfig(gamma=0.5), r_min=3)
    assert not d.pruned and d.new_ranks == {"p": 3, "q": 3}


def test_per_module_decision():
    received = adapter(6)
    trained = received.clone()
    trained.A["p"][5:] *= 0.1  # p's tail shrinks, q's grows
    trained.A["q"][5:] *= 3.0
    _, d_client = self_prune(received, trained, PruningConfig(), r_min=1)
    _, d_module = self_prune(received, trained, PruningConfig(decision="module"), r_min=1)
    assert d_module.new_ranks == {"p": 5, "q": 6}
    assert len(set(d_client.new_ranks.values())) == 1


def test_pruning_disabled_keeps_rank():
    received = adapter(8)
    _, d = self_prune(received, shrink_tail(received, 7, 0.1), PruningConfig(enabled=False), r_min=2)
    assert not d.pruned
