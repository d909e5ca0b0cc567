"""Aggregation strategies against hand-computed values, for every strategy."""

from __future__ import annotations

import numpy as np
import pytest

from hetlora_core.adapter import LoraAdapter
from hetlora_core.config import StrategyConfig
from hetlora_core.strategies import ClientUpdate, aggregate, average_tensors, svd_factor

M = "m"
R_MAX = 3


def one_module(A: list[list[float]], B: list[list[float]]) -> LoraAdapter:
    return LoraAdapter({M: np.array(A, np.float32)}, {M: np.array(B, np.float32)}, 1.0)


def three_clients() -> tuple[LoraAdapter, list[ClientUpdate]]:
    """Ranks 1, 2, 3 with in = out = 2; the previous global is all 7s (to see 'keep')."""
    prev = one_module([[7, 7]] * 3, [[7, 7, 7]] * 2)
    c1 = one_module([[1, 0]], [[1], [0]])  # B A = [[1,0],[0,0]], ||.||_F = 1
    c2 = one_module([[0, 1], [1, 0]], [[0, 0], [2, 0]])  # B A = [[0,0],[0,2]], norm 2
    c3 = one_module([[1, 1], [0, 0], [0, 2]], [[1, 0, 0], [0, 0, 1]])  # B A = [[1,1],[0,2]], norm sqrt(6)
    return prev, [ClientUpdate("a", c1, 10), ClientUpdate("b", c2, 30), ClientUpdate("c", c3, 60)]


def manual_average(updates, p, r_max=R_MAX):
    A = sum(p[k] * u.adapter.pad(r_max).A[M].astype(np.float64) for k, u in enumerate(updates))
    B = sum(p[k] * u.adapter.pad(r_max).B[M].astype(np.float64) for k, u in enumerate(updates))
    return A.astype(np.float32), B.astype(np.float32)


@pytest.mark.parametrize("name, cfg_kw, weights", [
    ("hetlora", {}, [1, 2, 6 ** 0.5]),
    ("hetlora", {"sparsity_weights": False}, [1, 1, 1]),
    ("hetlora", {"sample_weighted": True}, [10 * 1, 30 * 2, 60 * 6 ** 0.5]),
    ("zero_pad", {}, [1, 1, 1]),
    ("homlora", {}, [10, 30, 60]),
])
def test_factor_averaging_matches_hand_computation(name, cfg_kw, weights):
    prev, ups = three_clients()
    cfg = StrategyConfig(name=name, untrained_components="zero", **cfg_kw)
    new, info = aggregate(prev, ups, cfg, R_MAX)
    p = [w / sum(weights) for w in weights]
    A, B = manual_average(ups, p)
    assert np.allclose(new.A[M], A, atol=1e-6) and np.allclose(new.B[M], B, atol=1e-6)
    assert new.A[M].dtype == new.B[M].dtype == np.float32
    assert sum(info.weights[M].values()) == pytest.approx(1.0)
    assert [info.weights[M][c] for c in "abc"] == pytest.approx(p)


@pytest.mark.parametrize("normalisation", ["paper", "rank_aware"])
@pytest.mark.parametrize("untrained", ["keep", "zero"])
def test_factor_averaging_mixed_ranks_non_square(normalisation, untrained):
    """Mixed ranks on an out 5 x in 7 module against a dense reference: component j of client k
    weighs ``W[k, j] = p_k`` if ``j < r_k`` else 0 (columns normalised when rank-aware)."""
    g, r_max = np.random.default_rng(3), 6

    def mk(r: int) -> LoraAdapter:
        return LoraAdapter({M: g.standard_normal((r, 7), np.float32)}, {M: g.standard_normal((5, r), np.float32)}, 1.0)

    prev = mk(r_max)
    ups = [ClientUpdate(f"c{k}", mk(r), 10 + k) for k, r in enumerate([1, 4, 2, 4])]  # nobody trains components 4, 5
    new, info = aggregate(prev, ups, StrategyConfig(normalisation=normalisation, untrained_components=untrained), r_max)
    p = [info.weights[M][u.client_id] for u in ups]
    W = np.array([[p[k] if j < u.adapter.rank else 0.0 for j in range(r_max)] for k, u in enumerate(ups)])
    col = W.sum(0)
    if normalisation == "rank_aware":
        W = W / np.where(col > 0, col, 1.0)
    A = sum(W[k][:, None] * u.adapter.pad(r_max).A[M] for k, u in enumerate(ups))
    B = sum(W[k][None, :] * u.adapter.pad(r_max).B[M] for k, u in enumerate(ups))
    if untrained == "keep":
        A[col == 0], B[:, col == 0] = prev.A[M][col == 0], prev.B[M][:, col == 0]
    assert new.ranks == {M: r_max} and new.B[M].flags.c_contiguous
    assert np.allclose(new.A[M], A, atol=1e-6) and np.allclose(new.B[M], B, atol=1e-6)


def test_hetlora_explicit_numbers():
    """p = (1, 2, sqrt 6)/(3 + sqrt 6); component 0 of A is p_a [1,0] + p_b [0,1] + p_c [1,1]."""
    prev, ups = three_clients()
    new, _ = aggregate(prev, ups, StrategyConfig(untrained_components="zero"), R_MAX)
    z = 3 + 6 ** 0.5
    pa, pb, pc = 1 / z, 2 / z, 6 ** 0.5 / z
    assert new.A[M][0].tolist() == pytest.approx([pa + pc, pb + pc])
    assert new.A[M][2].tolist() == pytest.approx([0, 2 * pc])  # only client c trained component 2
    assert new.B[M][:, 1].tolist() == pytest.approx([0, 0])  # b's B column 1 is zero, c's too


def test_rank_aware_normalisation():
    """Component 2 is trained only by c: rank-aware gives it weight 1 instead of p_c."""
    prev, ups = three_clients()
    new, _ = aggregate(prev, ups, StrategyConfig(normalisation="rank_aware"), R_MAX)
    assert new.A[M][2].tolist() == pytest.approx([0, 2])
    z = 2 + 6 ** 0.5  # component 1 is trained by b and c
    assert new.A[M][1].tolist() == pytest.approx([2 / z * 1, 0])


def test_untrained_components_keep_or_zero():
    prev, ups = three_clients()
    low = ups[:2]  # ranks 1 and 2: nobody trained component 2
    keep, _ = aggregate(prev, low, StrategyConfig(), R_MAX)
    zero, _ = aggregate(prev, low, StrategyConfig(untrained_components="zero"), R_MAX)
    assert keep.A[M][2].tolist() == [7, 7] and keep.B[M][:, 2].tolist() == [7, 7]
    assert zero.A[M][2].tolist() == [0, 0] and zero.B[M][:, 2].tolist() == [0, 0]


def test_identical_clients_give_back_the_same_adapter():
    prev, ups = three_clients()
    same = [ClientUpdate(c, ups[2].adapter, n) for c, n in (("x", 1), ("y", 5), ("z", 9))]
    for name in ("hetlora", "zero_pad", "homlora"):
        new, info = aggregate(prev, same, StrategyConfig(name=name), R_MAX)
        assert np.allclose(new.A[M], ups[2].adapter.A[M]) and np.allclose(new.B[M], ups[2].adapter.B[M])
        assert sum(info.client_weights.values()) == pytest.approx(1.0)
    new, _ = aggregate(prev, same, StrategyConfig(name="recon_svd"), R_MAX)
    assert np.allclose(new.delta(M), ups[2].adapter.delta(M), atol=1e-5)


def test_all_zero_updates_do_not_divide_by_zero():
    prev, ups = three_clients()
    zeros = [ClientUpdate(u.client_id, LoraAdapter(u.adapter.A, {M: np.zeros_like(u.adapter.B[M])}, 1.0), u.num_samples)
             for u in ups]
    new, info = aggregate(prev, zeros, StrategyConfig(name="hetlora"), R_MAX)
    assert np.isfinite(new.A[M]).all() and np.count_nonzero(new.B[M]) == 0
    assert "sample-count" in info.fallback
    assert [info.weights[M][c] for c in "abc"] == pytest.approx([0.1, 0.3, 0.6])


def test_per_client_granularity_uses_norm_over_all_modules():
    g = np.random.default_rng(0)

    def mk(r: int) -> LoraAdapter:
        return LoraAdapter({"p": g.standard_normal((r, 3), np.float32), "q": g.standard_normal((r, 3), np.float32)},
                           {"p": g.standard_normal((3, r), np.float32), "q": g.standard_normal((3, r), np.float32)}, 1.0)

    a, b = mk(2), mk(3)
    prev = b.clone()
    _, info = aggregate(prev, [ClientUpdate("a", a, 1), ClientUpdate("b", b, 1)], StrategyConfig(weight_granularity="client"), 3)
    na = sum(v * v for v in a.delta_norms().values()) ** 0.5
    nb = sum(v * v for v in b.delta_norms().values()) ** 0.5
    assert info.weights["p"]["a"] == pytest.approx(na / (na + nb)) == pytest.approx(info.weights["q"]["a"])


def test_recon_svd_is_the_best_rank_r_approximation():
    prev, ups = three_clients()
    new, info = aggregate(prev, ups, StrategyConfig(name="recon_svd"), R_MAX)
    w = [0.1, 0.3, 0.6]
    target = sum(wk * u.adapter.delta(M).astype(np.float64) for wk, u in zip(w, ups, strict=True))
    assert np.allclose(new.delta(M), target, atol=1e-5)  # rank 2 <= r_max: exact
    for r in (1, 2):
        U, S, Vh = np.linalg.svd(target)
        best = U[:, :r] @ np.diag(S[:r]) @ Vh[:r]
        got = new.truncate(r).delta(M).astype(np.float64)
        assert np.linalg.norm(got - target) == pytest.approx(float(np.linalg.norm(best - target)), abs=1e-5)
    assert [info.weights[M][c] for c in "abc"] == pytest.approx(w)


def test_svd_factor_random_matrix():
    d = np.random.default_rng(1).standard_normal((20, 12), np.float32)
    A, B = svd_factor(d, 5, scale=2.0)
    assert A.dtype == B.dtype == np.float32 and A.shape == (5, 12) and B.shape == (20, 5)
    S = np.linalg.svd(d.astype(np.float64), compute_uv=False)
    err = np.linalg.norm(2.0 * B.astype(np.float64) @ A.astype(np.float64) - d)
    assert float(err) == pytest.approx(float(np.sqrt((S[5:] ** 2).sum())), rel=1e-5)


def test_full_ft_average_and_clipping():
    d1, d2 = {"w": np.ones((2, 2), np.float32)}, {"w": np.full((2, 2), 3.0, np.float32)}
    avg = average_tensors([d1, d2], [1, 3])["w"]
    assert avg.tolist() == [[2.5, 2.5], [2.5, 2.5]] and avg.dtype == np.float32
    prev, ups = three_clients()
    huge = ClientUpdate("evil", one_module([[1, 0]], [[1e6], [0]]), 10)
    new, info = aggregate(prev, [*ups, huge], StrategyConfig(clip_norm=3.0), R_MAX)
    assert info.clipped == ["evil"]
    assert float(np.abs(new.delta(M)).max()) < 5
    unclipped, _ = aggregate(prev, [*ups, huge], StrategyConfig(), R_MAX)
    assert float(np.abs(unclipped.delta(M)).max()) > 1e4
