"""Rank-aware aggregation (``strategy.normalisation: rank_aware``): a component trained by few
clients moves by their weighted update, neither shrunk by ``p_k^2`` (the paper's zero padding) nor
taken at full strength from one client (the first form of this option, which renormalised each
column over its trainers and diverged: issue 16). See ``averaging.FactorSums.finish``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from hetlora_core.adapter import LoraAdapter
from hetlora_core.config import StrategyConfig
from hetlora_core.strategies import ClientUpdate, aggregate

M = "m"
IN, OUT, R_MAX = 12, 10, 4


def _prev(g: np.random.Generator) -> LoraAdapter:
    """A round-0 global: A random (LoRA init), B zero."""
    return LoraAdapter({M: g.standard_normal((R_MAX, IN)).astype(np.float32) / math.sqrt(IN)},
                       {M: np.zeros((OUT, R_MAX), np.float32)}, 1.0)


def _trained(prev: LoraAdapter, r: int, g: np.random.Generator, da: float) -> LoraAdapter:
    """What a client of rank ``r`` returns: the global truncated to ``r``, B moved by a random
    update, A by ``da`` times one (``da = 0``: A left as received)."""
    got = prev.truncate(r)
    return LoraAdapter({M: got.A[M] + da * g.standard_normal((r, IN)).astype(np.float32) / math.sqrt(IN)},
                       {M: got.B[M] + 0.1 * g.standard_normal((OUT, r)).astype(np.float32)}, 1.0)


def _tail(ad: LoraAdapter, start: int) -> float:
    """``||B[:, start:] A[start:]||_F`` in float64."""
    return float(np.linalg.norm(ad.B[M][:, start:].astype(np.float64) @ ad.A[M][start:].astype(np.float64)))


def _round(da: float, seed: int = 0) -> tuple[LoraAdapter, list[ClientUpdate]]:
    """Two rank-1 clients and one rank-4 client: components 1..3 (the tail) are trained by the
    rank-4 client alone."""
    g = np.random.default_rng(seed)
    prev = _prev(g)
    return prev, [ClientUpdate(f"c{k}", _trained(prev, r, g, da), 10) for k, r in enumerate([1, 1, R_MAX])]


def test_lone_trainer_tail_moves_by_its_weight_not_its_square_nor_in_full():
    """A left as received: the tail's B A is exactly ``p_k`` times the client's own (B moved from
    zero by ``p_k`` times its update), the paper's ``p_k^2`` times; the old renormalisation gave
    1 times, i.e. the client's full update as if every client agreed with it."""
    prev, ups = _round(da=0.0)
    own = _tail(ups[2].adapter, 1)
    ra, info = aggregate(prev, ups, StrategyConfig(normalisation="rank_aware"), R_MAX)
    paper, _ = aggregate(prev, ups, StrategyConfig(), R_MAX)
    p = info.weights[M]["c2"]
    assert 0.2 < p < 0.9  # the sparsity weight: a real share, neither all nor nothing
    assert _tail(ra, 1) == pytest.approx(p * own, rel=1e-5)
    assert _tail(paper, 1) == pytest.approx(p * p * own, rel=1e-5)


@pytest.mark.parametrize("seed", range(5))
def test_lone_trainer_tail_not_amplified_and_not_damped_to_the_paper(seed):
    """A and B both trained: the global's tail is smaller than the client's own (no
    amplification: the old renormalisation made it equal, every round) and larger than the
    paper's ``p_k^2``-damped one."""
    prev, ups = _round(da=0.5, seed=seed)
    own = _tail(ups[2].adapter, 1)
    ra, info = aggregate(prev, ups, StrategyConfig(normalisation="rank_aware"), R_MAX)
    paper, _ = aggregate(prev, ups, StrategyConfig(), R_MAX)
    p = info.weights[M]["c2"]
    assert _tail(paper, 1) < _tail(ra, 1) < (p + 0.5 * (1 - p)) * own  # well below the client's own


def test_tail_growth_over_rounds_stays_below_the_lone_trainer_s():
    """A lone rank-4 client pushes its tail the same way every round (as Adam's sign-like steps
    did on SmolLM2); the low components are trained by everybody. Old renormalisation: the global
    tail equals the client's, which starts from it, so it grows by a full update each round; here
    it grows by ``p_k`` of one."""
    g = np.random.default_rng(7)
    glob = _prev(g)
    push = 0.1 * g.standard_normal((OUT, R_MAX - 1)).astype(np.float32)
    cfg = StrategyConfig(normalisation="rank_aware", sparsity_weights=False)  # p = 1/3 each
    for _ in range(4):
        ups = []
        for k, r in enumerate([1, 1, R_MAX]):
            a = _trained(glob, r, g, da=0.0)
            if r == R_MAX:
                a.B[M][:, 1:] += push
            ups.append(ClientUpdate(f"c{k}", a, 10))
        own = _tail(ups[2].adapter, 1)
        glob, _ = aggregate(glob, ups, cfg, R_MAX)
        assert _tail(glob, 1) < 0.9 * own
    tail_b = glob.B[M][:, 1:].astype(np.float64)
    assert np.linalg.norm(tail_b) < 0.5 * np.linalg.norm(4 * push)  # ~4/3 pushes, not 4


@pytest.mark.parametrize("untrained", ["keep", "zero"])
@pytest.mark.parametrize("name", ["hetlora", "zero_pad", "homlora"])
def test_equal_ranks_give_the_paper_s_bytes(name, untrained):
    """Every client trained every component: nothing to pad, so rank-aware is the paper's
    formula to the byte (the padding weight is exactly 0.0, not 1e-17)."""
    g = np.random.default_rng(3)
    prev = _prev(g)
    ups = [ClientUpdate(f"c{k}", _trained(prev, R_MAX, g, da=0.5), 10 + 7 * k) for k in range(5)]
    ra, _ = aggregate(prev, ups, StrategyConfig(name=name, normalisation="rank_aware", untrained_components=untrained), R_MAX)
    paper, _ = aggregate(prev, ups, StrategyConfig(name=name, untrained_components=untrained), R_MAX)
    assert ra.A[M].tobytes() == paper.A[M].tobytes() and ra.B[M].tobytes() == paper.B[M].tobytes()


def test_components_trained_by_everybody_are_the_paper_s_in_mixed_ranks():
    """Component 0 is trained by all three clients: only the tail differs from the paper."""
    prev, ups = _round(da=0.5, seed=1)
    ra, _ = aggregate(prev, ups, StrategyConfig(normalisation="rank_aware"), R_MAX)
    paper, _ = aggregate(prev, ups, StrategyConfig(), R_MAX)
    assert np.array_equal(ra.A[M][0], paper.A[M][0]) and np.array_equal(ra.B[M][:, 0], paper.B[M][:, 0])
    assert not np.allclose(ra.A[M][1:], paper.A[M][1:])


@pytest.mark.slow  # two tiny-model simulations: ~10-40 s on a shared 2-core machine
def test_tiny_model_simulate_rank_aware(tmp_path):
    """A few rounds of the tiny model, rank-4 and rank-1 tiers. In every round where one rank-4
    client alone trained the tail, the global's tail ``B A`` stays below that client's (the old
    renormalisation made them equal: this check failed before the fix); the held-out perplexity
    stays finite and within 5% of the paper formula's (the tiny random model barely learns, so
    perplexity alone did not show the divergence at this size)."""
    from hetlora_core import store as st
    from hetlora_core.bench_paper import _TINY
    from hetlora_core.config import HetLoRAConfig, replace
    from hetlora_core.simulate import simulate

    ppl = {}
    for norm in ("paper", "rank_aware"):
        cfg = replace(HetLoRAConfig(experiment=f"ra-{norm}"), **{**_TINY, "federation.rounds": 3, "pruning.enabled": False,
                                                                  "strategy.normalisation": norm})
        out = tmp_path / norm
        simulate(cfg, out, progress=False)
        res = json.loads((out / "results.json").read_text())
        ppl[norm] = [r["global_ppl"] for r in res["rounds"]]
        if norm != "rank_aware":
            continue
        store, lone = st.LocalStore(out / "store"), 0
        for rnd in range(cfg.federation.rounds):
            data, man = st.get_artifact(store, st.global_prefix(cfg.experiment, rnd))
            glob = LoraAdapter.from_bytes(data)
            ups = {c: LoraAdapter.from_bytes(st.get_artifact(store, st.client_prefix(cfg.experiment, rnd, c))[0])
                   for c in man["participants"]}
            large = [a for a in ups.values() if a.rank == cfg.ranks.r_max]
            if len(large) != 1:
                continue
            lone += 1
            for m in glob.modules:
                own = float(np.linalg.norm(large[0].B[m][:, 1:] @ large[0].A[m][1:]))
                got = float(np.linalg.norm(glob.B[m][:, 1:] @ glob.A[m][1:]))
                assert got < 0.95 * own, (rnd, m, got, own)
        assert lone > 0  # the seed's selection has rounds with exactly one rank-4 client
    base = res["baseline_ppl"]
    assert all(math.isfinite(x) for x in ppl["rank_aware"])
    assert ppl["rank_aware"][-1] < 1.05 * ppl["paper"][-1] and ppl["rank_aware"][-1] < 1.05 * base
