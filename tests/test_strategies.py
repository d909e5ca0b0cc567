"""Aggregation strategies against hand-computed values, for every strategy."""

from __future__ import annotations

import numpy as np
import pytest

from hetlora_core.adapter import LoraAdapter
from hetlora_core.config import StrategyConfig
from hetlora_core.methods.full_ft import average_tensors
from hetlora_core.strategies import ClientUpdate, aggregate
from hetlora_core.svd import svd_factor

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


@pytest.mark.parametrize("untrained", ["keep", "zero"])
def test_factor_averaging_mixed_ranks_non_square(untrained):
    """Mixed ranks on an out 5 x in 7 module against a dense reference: component j of client k
    weighs ``W[k, j] = p_k`` if ``j < r_k`` else 0."""
    g, r_max = np.random.default_rng(3), 6

    def mk(r: int) -> LoraAdapter:
        return LoraAdapter({M: g.standard_normal((r, 7), np.float32)}, {M: g.standard_normal((5, r), np.float32)}, 1.0)

    prev = mk(r_max)
    ups = [ClientUpdate(f"c{k}", mk(r), 10 + k) for k, r in enumerate([1, 4, 2, 4])]  # nobody trains components 4, 5
    new, info = aggregate(prev, ups, StrategyConfig(untrained_components=untrained), r_max)
    p = [info.weights[M][u.client_id] for u in ups]
    W = np.array([[p[k] if j < u.adapter.rank else 0.0 for j in range(r_max)] for k, u in enumerate(ups)])
    col = W.sum(0)
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


def test_a_component_one_client_trained_enters_b_a_at_its_weight_squared():
    """The paper's zero padding: component 2 is trained by c alone, so the global's ``B[:, 2] A[2]``
    is ``p_c^2`` times c's own (not ``p_c`` times, nor the previous global's 7s mixed in): the damping
    of a rarely trained tail that the removed ``strategy.normalisation: rank_aware`` undid
    (``averaging.FactorSums.finish`` says why it stays)."""
    prev, ups = three_clients()
    new, info = aggregate(prev, ups, StrategyConfig(), R_MAX)
    pc, c = info.weights[M]["c"], ups[2].adapter
    own = np.outer(c.B[M][:, 2], c.A[M][2])
    assert np.abs(own).max() > 0 and 0 < pc < 1
    assert np.outer(new.B[M][:, 2], new.A[M][2]) == pytest.approx(pc * pc * own, abs=1e-6)


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
    _, ups = three_clients()
    # clip_norm bounds each factor's change from what the client received (robust.factor_clip), so the
    # previous global is one these clients plausibly trained from (B = 0, A near theirs), not three_clients'
    # all-7s global, from which every client's change is large
    prev = one_module([[1, 0], [1, 0], [0, 2]], [[0, 0, 0]] * 2)
    huge = ClientUpdate("evil", one_module([[1, 0]], [[1e6], [0]]), 10)
    new, info = aggregate(prev, [*ups, huge], StrategyConfig(clip_norm=3.0), R_MAX)
    assert info.clipped == ["evil"]
    assert float(np.abs(new.delta(M)).max()) < 5
    unclipped, _ = aggregate(prev, [*ups, huge], StrategyConfig(), R_MAX)
    assert float(np.abs(unclipped.delta(M)).max()) > 1e4


# ---------------------------------------------------------------- grouped paths vs a per-client reference
# The library reduces clients in groups of equal ranks (one stacked reduction per module); these
# references are the straightforward per-client loops over dense, zero-padded factors.

SHAPES = {"p": (24, 30), "q": (36, 16), "v": (12, 30)}  # module -> (out, in), all different


def _mk(g: np.random.Generator, ranks: dict[str, int], zero_b: bool = False) -> LoraAdapter:
    return LoraAdapter({m: g.standard_normal((ranks[m], i), np.float32) for m, (o, i) in SHAPES.items()},
                       {m: (np.zeros if zero_b else lambda s, d: g.standard_normal(s, d))((o, ranks[m]), np.float32)
                        for m, (o, i) in SHAPES.items()}, 1.5)


def mixed_clients(seed: int = 0, k: int = 17, r_max: int = 6) -> tuple[LoraAdapter, list[ClientUpdate]]:
    """``k`` clients of ranks 1..r_max - 1 (component r_max - 1 is never trained), a few with
    per-module ranks (module pruning), sample counts 1..; the previous global is random."""
    g = np.random.default_rng(seed)
    prev = _mk(g, dict.fromkeys(SHAPES, r_max))
    ups = []
    for c in range(k):
        r = int(g.integers(1, r_max))
        ranks = {m: (max(1, r - i) if c % 5 == 0 else r) for i, m in enumerate(SHAPES)}
        ups.append(ClientUpdate(f"c{c:02d}", _mk(g, ranks), int(g.integers(1, 100))))
    return prev, ups


def reference_factor_clip(a: LoraAdapter, prev: LoraAdapter, c: float) -> LoraAdapter:
    """clip_norm's bound on each factor's change (robust.factor_clip), with dense float64 norms."""
    r = prev.truncate(a.ranks)
    f64 = {m: (a.A[m].astype(np.float64) - r.A[m], a.B[m].astype(np.float64) - r.B[m]) for m in SHAPES}
    da = np.sqrt(sum(np.linalg.norm(dA) ** 2 for dA, _ in f64.values()))
    ar = np.sqrt(sum(np.linalg.norm(r.A[m].astype(np.float64)) ** 2 for m in SHAPES))
    ea = a.scale * np.sqrt(sum((np.linalg.norm(dA) * np.linalg.norm(r.B[m].astype(np.float64), 2)) ** 2 for m, (dA, _) in f64.items()))
    eb = a.scale * np.sqrt(sum((np.linalg.norm(dB) * np.linalg.norm(r.A[m].astype(np.float64), 2)) ** 2 for m, (_, dB) in f64.items()))
    ta, tb = min(1.0, ar / da if da else 1.0, c / ea if ea else 1.0), min(1.0, c / eb if eb else 1.0)
    return LoraAdapter({m: (r.A[m] + ta * f64[m][0]).astype(np.float32) if ta < 1 else a.A[m] for m in SHAPES},
                       {m: (r.B[m] + tb * f64[m][1]).astype(np.float32) if tb < 1 else a.B[m] for m in SHAPES}, a.scale)


def reference_weights(updates, cfg: StrategyConfig, prev: LoraAdapter | None = None) -> tuple[dict[str, np.ndarray], list[ClientUpdate]]:
    """Clipping, then p[m] per client: norms from the dense product (not the Gram form)."""
    def dense_norms(a: LoraAdapter) -> dict[str, float]:
        return {m: float(np.linalg.norm(a.scale * a.B[m].astype(np.float64) @ a.A[m].astype(np.float64))) for m in SHAPES}

    clipped = []
    for u in updates:
        total = sum(v * v for v in dense_norms(u.adapter).values()) ** 0.5
        a = u.adapter
        if cfg.clip_norm is not None and prev is not None:
            a = reference_factor_clip(a, prev, cfg.clip_norm)
            total = sum(v * v for v in dense_norms(a).values()) ** 0.5
        if cfg.clip_norm is not None and total > cfg.clip_norm:
            a = LoraAdapter(a.A, {m: b * (cfg.clip_norm / total) for m, b in a.B.items()}, a.scale)
        clipped.append(ClientUpdate(u.client_id, a, u.num_samples))
    n = np.array([u.num_samples for u in clipped], np.float64)
    kind = {"zero_pad": "uniform", "homlora": "samples", "recon_svd": "samples"}.get(
        cfg.name, "sparsity" if cfg.sparsity_weights else "uniform")
    p = {}
    for m in SHAPES:
        if kind == "uniform":
            s = np.ones(len(n))
        elif kind == "samples":
            s = n.copy()
        else:
            norms = [dense_norms(u.adapter) for u in clipped]
            s = np.array([sum(v * v for v in d.values()) ** 0.5 if cfg.weight_granularity == "client" else d[m] for d in norms])
            if cfg.sample_weighted:
                s = s * n
            if s.sum() == 0:
                s = n.copy()
        p[m] = s / s.sum()
    return p, clipped


def reference_average(prev: LoraAdapter, updates, cfg: StrategyConfig, r_max: int) -> tuple[LoraAdapter, dict[str, np.ndarray]]:
    p, clipped = reference_weights(updates, cfg, prev)
    A, B = {}, {}
    for m in SHAPES:
        W = np.zeros((len(clipped), r_max))
        a, b = np.zeros((r_max, SHAPES[m][1])), np.zeros((SHAPES[m][0], r_max))
        for k, u in enumerate(clipped):
            r = u.adapter.A[m].shape[0]
            W[k, :r] = p[m][k]
            pad = u.adapter.pad(r_max)
            a += W[k][:, None] * pad.A[m].astype(np.float64)
            b += W[k][None, :] * pad.B[m].astype(np.float64)
        col = W.sum(0)
        if cfg.untrained_components == "keep":
            a[col == 0], b[:, col == 0] = prev.A[m][col == 0], prev.B[m][:, col == 0]
        A[m], B[m] = a.astype(np.float32), b.astype(np.float32)
    return LoraAdapter(A, B, prev.scale), p


@pytest.mark.parametrize("cfg_kw", [
    {"name": "hetlora"}, {"name": "hetlora", "weight_granularity": "client"}, {"name": "hetlora", "sample_weighted": True},
    {"name": "hetlora", "sparsity_weights": False}, {"name": "zero_pad"}, {"name": "homlora"},
    {"name": "hetlora", "clip_norm": 4.0}, {"name": "hetlora", "weight_granularity": "client", "clip_norm": 4.0},
])
@pytest.mark.parametrize("untrained", ["keep", "zero"])
@pytest.mark.parametrize("group_bytes", [None, 3000])  # default groups; or one to three clients per group
def test_grouped_factor_averaging_matches_the_per_client_reference(cfg_kw, untrained, group_bytes, monkeypatch):
    import hetlora_core.reduce as reduce
    import hetlora_core.strategies as strategies

    if group_bytes:  # small groups, and several float32 chunks per group (reduce.weighted_sum_into)
        monkeypatch.setattr(strategies, "GROUP_BYTES", group_bytes)
        monkeypatch.setattr(reduce, "CHUNK_BYTES", 200)
    prev, ups = mixed_clients()
    r_max = 6
    cfg = StrategyConfig(untrained_components=untrained, **cfg_kw)
    new, info = aggregate(prev, ups, cfg, r_max)
    ref, p = reference_average(prev, ups, cfg, r_max)
    for m in SHAPES:
        assert new.A[m].dtype == new.B[m].dtype == np.float32 and new.B[m].flags.c_contiguous
        assert np.allclose(new.A[m], ref.A[m], rtol=1e-6, atol=1e-6) and np.allclose(new.B[m], ref.B[m], rtol=1e-6, atol=1e-6)
        # float32 Gram norms (norms.py) vs the dense float64 reference: ~1e-7 relative, bound 1e-6
        assert [info.weights[m][u.client_id] for u in ups] == pytest.approx(p[m].tolist(), rel=1e-6, abs=1e-12)
    assert info.client_weights == pytest.approx({u.client_id: float(np.mean([p[m][k] for m in SHAPES])) for k, u in enumerate(ups)})
    if cfg.clip_norm:
        assert info.clipped and info.clipped == [u.client_id for u in ups if u.client_id in info.clipped]
    if untrained == "keep":  # nobody trains component r_max - 1: the previous global's value stays
        assert all(np.array_equal(new.A[m][-1], prev.A[m][-1]) for m in SHAPES)


def test_average_factors_grouped_matches_reference_with_given_weights():
    import hetlora_core.strategies as strategies

    prev, ups = mixed_clients(seed=1, k=9)
    p = {m: np.random.default_rng(2).random(len(ups)) for m in SHAPES}
    cfg = StrategyConfig(untrained_components="zero")
    got = strategies.average_factors(prev, ups, p, cfg, 6)
    for m in SHAPES:
        a = sum(p[m][k] * u.adapter.pad(6).A[m].astype(np.float64) for k, u in enumerate(ups))
        b = sum(p[m][k] * u.adapter.pad(6).B[m].astype(np.float64) for k, u in enumerate(ups))
        assert np.allclose(got.A[m], a, rtol=1e-6, atol=1e-6) and np.allclose(got.B[m], b, rtol=1e-6, atol=1e-6)


def test_fallback_to_sample_weights_when_every_norm_is_zero_grouped():
    g = np.random.default_rng(4)
    prev = _mk(g, dict.fromkeys(SHAPES, 4))
    ups = [ClientUpdate(f"z{k}", _mk(g, dict.fromkeys(SHAPES, 1 + k % 3), zero_b=True), 10 * (k + 1)) for k in range(5)]
    new, info = aggregate(prev, ups, StrategyConfig(), 4)
    ref, p = reference_average(prev, ups, StrategyConfig(), 4)
    assert "sample-count" in info.fallback
    assert all(np.allclose(new.A[m], ref.A[m], atol=1e-6) for m in SHAPES)


def best_rank(delta: np.ndarray, r: int) -> np.ndarray:
    U, S, Vh = np.linalg.svd(delta, full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vh[:r]


@pytest.mark.parametrize("k, group_bytes", [(2, None), (3, 3000), (17, None), (17, 3000)])  # few clients: the low-rank route
def test_recon_svd_stacked_gemm_matches_the_per_client_reference(k, group_bytes, monkeypatch):
    import hetlora_core.strategies as strategies
    import hetlora_core.svd as svd

    if group_bytes:  # small groups, and several float32 GEMMs per group (svd.GEMM_K)
        monkeypatch.setattr(strategies, "GROUP_BYTES", group_bytes)
        monkeypatch.setattr(svd, "GEMM_K", 3)
    prev, ups = mixed_clients(seed=5, k=k)
    r_max = 6
    new, info = aggregate(prev, ups, StrategyConfig(name="recon_svd"), r_max)
    n = np.array([u.num_samples for u in ups], np.float64)
    w = n / n.sum()
    for m in SHAPES:
        ref = sum(wk * u.adapter.scale * u.adapter.B[m].astype(np.float64) @ u.adapter.A[m].astype(np.float64)
                  for wk, u in zip(w, ups, strict=True))
        got = new.delta(m).astype(np.float64)
        assert np.allclose(got, best_rank(ref, r_max), atol=1e-5), m
        for r in (1, 2, 3):  # every truncation is the best rank-r approximation
            assert np.linalg.norm(new.truncate(r).delta(m) - ref) == pytest.approx(np.linalg.norm(best_rank(ref, r) - ref), abs=1e-5)
        # balanced factors: |B[:, j]| == |A[j]| for every component
        assert np.allclose(np.linalg.norm(new.B[m], axis=0), np.linalg.norm(new.A[m], axis=1), rtol=1e-5, atol=1e-6)
        assert [info.weights[m][u.client_id] for u in ups] == pytest.approx(w.tolist())
    small = {m for m, (o, i) in SHAPES.items() if 2 * sum(u.adapter.A[m].shape[0] for u in ups) <= min(o, i)}
    if k in (2, 17):  # the cases exercise both routes: QR of the stacked factors, or the dense sum
        assert bool(small) == (k == 2)


def test_recon_svd_with_all_zero_updates_is_zero():
    g = np.random.default_rng(6)
    prev = _mk(g, dict.fromkeys(SHAPES, 4))
    ups = [ClientUpdate(f"z{k}", _mk(g, dict.fromkeys(SHAPES, 1), zero_b=True), 3) for k in range(2)]
    new, _ = aggregate(prev, ups, StrategyConfig(name="recon_svd"), 4)
    assert all(np.count_nonzero(new.delta(m)) == 0 and np.isfinite(new.A[m]).all() for m in SHAPES)


def test_rank_groups_split_by_rank_signature_and_bytes():
    from hetlora_core.strategies import ClientFacts, rank_groups

    def f(i: int, r: int, nbytes: int, **ranks: int) -> ClientFacts:
        return ClientFacts(f"c{i}", 1, {"a": r, "b": ranks.get("b", r)}, nbytes)

    facts = [f(0, 2, 10), f(1, 4, 10), f(2, 2, 10), f(3, 2, 10, b=1), f(4, 4, 10), f(5, 2, 10), f(6, 4, 100)]
    assert rank_groups(facts) == [[0, 2, 5], [1, 4, 6], [3]]
    assert rank_groups(facts, max_bytes=20) == [[0, 2], [5], [1, 4], [6], [3]]  # a client larger than the cap is a group


def test_aggregation_fed_group_by_group_checks_what_it_is_fed():
    from hetlora_core.adapter import AdapterError
    from hetlora_core.strategies import Aggregation, client_facts

    prev, ups = mixed_clients(seed=7, k=6)
    cfg = StrategyConfig()
    agg = Aggregation(prev, [client_facts(u, cfg) for u in ups], cfg, 6)
    g0 = agg.groups[0]
    with pytest.raises(AdapterError, match="differ from its facts"):
        agg.add(g0, [ups[(i + 1) % len(ups)].adapter if ups[(i + 1) % len(ups)].adapter.ranks != ups[i].adapter.ranks
                     else _mk(np.random.default_rng(0), dict.fromkeys(SHAPES, 5)) for i in g0])
    agg = Aggregation(prev, [client_facts(u, cfg) for u in ups], cfg, 6)
    agg.add(g0, [ups[i].adapter for i in g0])
    with pytest.raises(ValueError, match="never added"):
        agg.result()
    with pytest.raises(ValueError, match="added twice"):
        agg.add(g0, [ups[i].adapter for i in g0])
