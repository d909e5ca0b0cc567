"""Server aggregation strategies as pure functions over adapters (no model, no I/O).

Three code paths cover every method of HETLORA.md:

* factor averaging (``hetlora``, ``zero_pad``, ``homlora``): zero-pad each client's ``A_k``, ``B_k``
  to ``r_max`` and average with weights ``p_k`` -- sparsity weights ``||B_k A_k||_F`` (HetLoRA),
  uniform (zero-padding baseline, and the HetLoRA "no sparsity weights" ablation) or sample counts
  (HomLoRA FedAvg). Options: weights per module or per client, sample counts multiplied in, and
  what happens to components no client trained.
* reconstruction + SVD (``recon_svd``, FlexLoRA): average ``dW_k = s B_k A_k`` by sample counts and
  factor the result by SVD with balanced factors, so truncating to r is the best rank-r approximation.
* full fine-tuning FedAvg (``full_ft``): ``methods.full_ft.average_tensors`` over full weight deltas.

The SVD half of Recon+SVD lives in ``svd.py``, the factor averaging's sums in ``averaging.py``, the batched delta norms in ``norms.py``, the
weighted-sum kernel and scratch buffers in ``reduce.py``.

Everything is numpy (float32 within a cache-sized chunk of clients, float64 across chunks, float32
results): the aggregate step loads no torch.

Clients are reduced in *groups*: clients with the same per-module ranks, in batches of at most
``GROUP_BYTES`` of factors (``rank_groups``). Per module, a group is reduced in L2-sized chunks: one
copy into a reused float32 stack and one GEMV of the weights against it (``reduce.weighted_pair_into``),
or for Recon+SVD one GEMM of the stacked factors, instead of a Python loop over clients and modules. The weights
need only a few numbers per client (``ClientFacts``: ranks, sample count, delta norms), so
``Aggregation`` can also be fed group by group: the aggregate step keeps the facts of every upload
and then holds one group of decoded uploads at a time (``steps/aggregate.py``; or keeps them all within
``strategy.keep_uploads_mb``). ``aggregate`` is the
same object fed from memory, so both give the same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .adapter import AdapterError, LoraAdapter
from .averaging import FactorSums
from .config import StrategyConfig
from .norms import delta_norms_many, stack_norms
from .reduce import Chunk
from .robust import FactorClip, apply_factor_clip, factor_clip
from .svd import DeltaSums

# A group holds at most this many bytes of float32 factors (or one client, if it alone is larger):
# the most the streaming aggregate step holds decoded at once; a group is copied into a float64 stack
# one module at a time (2x that module's share of it). Larger groups mean fewer, larger reductions:
# factor averaging of 300 SmolLM2 q/v clients measured 5.5x / 5.1x / 4.8x the numpy floor with
# groups of 32 / 64 / 128 MiB (6.7x / 8.7x / 10.9x with 16 / 8 / 4 MiB; one run, machine shared).
GROUP_BYTES = 64 * 2**20


@dataclass
class ClientUpdate:
    """What the server receives from one client: its (possibly pruned) adapter and sample count."""

    client_id: str
    adapter: LoraAdapter
    num_samples: int


@dataclass
class AggregationInfo:
    """Weights actually used, for results.json and metrics. ``weights[module][client]``."""

    weights: dict[str, dict[str, float]] = field(default_factory=dict)
    client_weights: dict[str, float] = field(default_factory=dict)  # mean over modules
    fallback: str = ""  # why the configured weighting was replaced (e.g. all norms zero)
    clipped: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ClientFacts:
    """What the weights, the clipping and the grouping need from one client; everything else is
    read from its adapter group by group. ``norms`` (``||s B A||_F`` per module, after clipping)
    is computed only when the sparsity weights or the clipping need it."""

    client_id: str
    num_samples: int
    ranks: dict[str, int]
    nbytes: int  # float32 factor bytes
    norms: dict[str, float] | None = None
    clip: float | None = None  # the factor B is scaled by (update-norm clipping), None if not clipped
    # Factor averaging under clip_norm: the factor changes' scales (robust.factor_clip), applied before ``clip``
    factor_clip: FactorClip | None = None


def weighting(cfg: StrategyConfig) -> str:
    """Which weights the factor-averaging path uses for this strategy."""
    if cfg.name == "hetlora":
        return "sparsity" if cfg.sparsity_weights else "uniform"
    return {"zero_pad": "uniform", "homlora": "samples"}.get(cfg.name, "samples")


def clip_factor(norms: Mapping[str, float], clip_norm: float | None) -> float | None:
    """``clip_norm / ||update||`` for a client whose total ``||s B A||_F`` over modules exceeds
    ``clip_norm``, else None."""
    if clip_norm is None:
        return None
    norm = math.sqrt(sum(n * n for n in norms.values()))
    return clip_norm / norm if norm > clip_norm else None


def clip_adapter(adapter: LoraAdapter, factor: float | None) -> LoraAdapter:
    """The adapter with B scaled by ``factor`` (a new object; A is shared, never written), or itself."""
    if factor is None:
        return adapter
    return LoraAdapter(dict(adapter.A), {m: b * factor for m, b in adapter.B.items()}, adapter.scale)


def needs_norms(cfg: StrategyConfig) -> bool:
    """Whether ``client_facts`` measures the clients' delta norms under ``cfg`` (weights or clipping)."""
    return (cfg.name != "recon_svd" and weighting(cfg) == "sparsity") or cfg.clip_norm is not None


def measurable(cfg: StrategyConfig) -> bool:
    """Whether ``Aggregation(measure=True)`` applies: per-module sparsity weights, no clipping."""
    return cfg.name != "recon_svd" and weighting(cfg) == "sparsity" and cfg.weight_granularity == "module" and cfg.clip_norm is None


def client_facts(update: ClientUpdate, cfg: StrategyConfig, prev: LoraAdapter | None = None,
                 norms: Mapping[str, float] | None = None) -> ClientFacts:
    """The facts of one client under ``cfg``: clipping decided here (it depends on the client and the
    previous global ``prev`` alone), norms measured on the clipped adapter, as the weights see it.
    ``norms``: the adapter's ``delta_norms()`` if the caller has them already (saves computing them again).

    Factor averaging averages A and B separately, so ``clip_norm`` bounds each factor's change from
    what the client received too (``robust.factor_clip``, which needs ``prev``); Recon+SVD averages the
    products, where scaling B alone bounds the whole update."""
    a = update.adapter
    fc = None
    if cfg.clip_norm is not None and cfg.name != "recon_svd":
        if prev is None:
            raise ValueError("clip_norm under factor averaging needs the previous global: client_facts(update, cfg, prev)")
        received = prev.truncate(a.ranks)
        fc = factor_clip(a, received, cfg.clip_norm)
        if fc is not None:
            a, norms = apply_factor_clip(a, received, fc), None
    sparsity = cfg.name != "recon_svd" and weighting(cfg) == "sparsity"
    if norms is None and needs_norms(cfg):
        norms = a.delta_norms()
    norms = dict(norms) if norms is not None and needs_norms(cfg) else None
    f = clip_factor(norms, cfg.clip_norm) if norms is not None else None
    if f is not None and sparsity:
        norms = clip_adapter(a, f).delta_norms()
    return ClientFacts(update.client_id, update.num_samples, a.ranks, a.nbytes(), norms if sparsity else None, f, fc)


SAMPLE_FALLBACK = "all sparsity norms zero: sample-count weights"


def _normalise(s: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, float, str]:
    """Sparsity weights ``s`` (one module, all clients) -> ``(p, total, fallback)``: ``p = s / total``,
    or sample-count weights (total 1.0) and a note where the total is zero or not finite (HETLORA.md
    step 5: round 0's B are all zero)."""
    total = float(s.sum())
    if total > 0 and math.isfinite(total):
        return s / total, total, ""
    return n / n.sum(), 1.0, SAMPLE_FALLBACK


def _raw_weights(n: np.ndarray, norms: Sequence[Mapping[str, float]] | None, modules: Sequence[str],
                 cfg: StrategyConfig) -> tuple[dict[str, np.ndarray], dict[str, float], dict[str, np.ndarray], str]:
    """``(u, total, p, fallback)`` per module: the weights the sums add (``u``; for sparsity weights
    the unnormalised norms, else ``p``), what the sums are divided by at the end (``total``), the
    normalised weights ``p = u / total`` and a fallback note."""
    kind = weighting(cfg)
    if kind in ("uniform", "samples"):
        p = np.full(len(n), 1.0 / len(n)) if kind == "uniform" else n / n.sum()
        return dict.fromkeys(modules, p), dict.fromkeys(modules, 1.0), dict.fromkeys(modules, p), ""
    if norms is None:
        raise ValueError("sparsity weights need every client's delta norms")
    if cfg.weight_granularity == "client":
        per_client = np.array([math.sqrt(sum(v * v for v in d.values())) for d in norms])
        raw = dict.fromkeys(modules, per_client)
    else:
        raw = {m: np.array([d[m] for d in norms]) for m in modules}
    u, totals, p, fallback = {}, {}, {}, ""
    for m, s in raw.items():
        if cfg.sample_weighted:
            s = s * n
        p[m], totals[m], note = _normalise(s, n)
        u[m] = p[m] if note else s
        fallback = note or fallback
    return u, totals, p, fallback


def _weights(n: np.ndarray, norms: Sequence[Mapping[str, float]] | None, modules: Sequence[str],
             cfg: StrategyConfig) -> tuple[dict[str, np.ndarray], str]:
    """``p[module]`` from sample counts ``n`` and (sparsity weighting) per-client module norms."""
    _, _, p, fallback = _raw_weights(n, norms, modules, cfg)
    return p, fallback


def client_weights(updates: Sequence[ClientUpdate], cfg: StrategyConfig) -> tuple[dict[str, np.ndarray], str]:
    """Weights ``p[module]``, float64 arrays of shape (K,) summing to 1, and a fallback note.

    Sparsity weights ``S_k = ||B_k A_k||_F`` per module (or, per client, the norm over all modules);
    if every ``S_k`` is zero (round 0: all B are zero) fall back to sample-count weights."""
    n = np.array([u.num_samples for u in updates], dtype=np.float64)
    norms = delta_norms_many([(u.adapter.A, u.adapter.B, u.adapter.scale) for u in updates]) if weighting(cfg) == "sparsity" else None
    return _weights(n, norms, updates[0].adapter.modules, cfg)


def rank_groups(facts: Sequence[ClientFacts], max_bytes: int | None = None, by_rank: bool = True) -> list[list[int]]:
    """Client indices in groups of equal per-module ranks (signatures in order of first appearance,
    clients in input order) of at most ``max_bytes`` (default ``GROUP_BYTES``) each, or one client.
    ``by_rank=False`` (Recon+SVD, whose stacks take any ranks): groups of consecutive clients by bytes
    alone. Why: a group's GEMMs run over at most ``svd.GEMM_K`` components, and the rank groups of
    1000 clients at ranks 2..16 are narrow (134-1072 components each), so every module paid ~2x the
    GEMMs, float64 adds and overflow checks it needs."""
    max_bytes = GROUP_BYTES if max_bytes is None else max_bytes
    by_sig: dict[tuple[tuple[str, int], ...], list[int]] = {}
    for i, f in enumerate(facts):
        by_sig.setdefault(tuple(sorted(f.ranks.items())) if by_rank else (), []).append(i)
    groups: list[list[int]] = []
    for members in by_sig.values():
        cur: list[int] = []
        size = 0
        for i in members:
            if cur and size + facts[i].nbytes > max_bytes:
                groups.append(cur)
                cur, size = [], 0
            cur.append(i)
            size += facts[i].nbytes
        groups.append(cur)
    return groups


def _facts_of(updates: Sequence[ClientUpdate]) -> list[ClientFacts]:
    return [ClientFacts(u.client_id, u.num_samples, u.adapter.ranks, u.adapter.nbytes()) for u in updates]


def average_factors(prev_global: LoraAdapter, updates: Sequence[ClientUpdate], p: dict[str, np.ndarray],
                    cfg: StrategyConfig, r_max: int) -> LoraAdapter:
    """``B_g = sum_k p_k pad(B_k)``, ``A_g = sum_k p_k pad(A_k)`` per module, component by component.

    Component j of client k gets weight ``W[k, j] = p_k`` if ``j < r_k`` else 0 (its zero padding:
    the paper's formula; ``FactorSums.finish`` says why no other normalisation is offered).
    Components with ``sum_k W[k, j] == 0`` keep the previous global value (``untrained_components
    = "keep"``) or become zero (``"zero"``, paper-literal; then they can never train again).
    Clients are reduced group by group (``rank_groups``), float64 sums of float32 chunks, float32 result."""
    sums = FactorSums(prev_global, r_max, cfg)
    groups = [(idx, [updates[i].adapter for i in idx]) for idx in rank_groups(_facts_of(updates))]
    for m in prev_global.modules:  # module by module: one module's sums live at a time
        for idx, adapters in groups:
            sums.add_module(m, adapters, p[m][idx])
        sums.finish(m)
    return sums.result()


def recon_svd(prev_global: LoraAdapter, updates: Sequence[ClientUpdate], r_max: int) -> tuple[LoraAdapter, dict[str, np.ndarray]]:
    """FlexLoRA: ``dW = sum_k n_k/n * s B_k A_k`` per module, refactored at ``r_max`` by SVD."""
    n = np.array([u.num_samples for u in updates], dtype=np.float64)
    w = n / n.sum()
    facts = _facts_of(updates)
    sums = DeltaSums(prev_global, r_max, {m: sum(f.ranks[m] for f in facts) for m in prev_global.modules})
    groups = [(idx, [updates[i].adapter for i in idx]) for idx in rank_groups(facts, by_rank=False)]
    for m in prev_global.modules:  # module by module, as in average_factors
        for idx, adapters in groups:
            sums.add_module(m, adapters, w[idx])
        sums.finish(m)
    return sums.result(), {m: w for m in prev_global.modules}


class Aggregation:
    """One LoRA aggregation, fed group by group. The weights, the clipping and the groups follow
    from the clients' facts alone, so a caller may hold one group's adapters at a time: call
    ``add`` for every entry of ``groups``, in that order (the order fixes the float64 sums, hence
    the bytes), then ``result``. ``aggregate`` does exactly this from memory.

    ``measure=True`` (``aggregate``, every adapter in memory, HetLoRA's per-module sparsity weights
    without clipping): the facts carry no norms; ``add_all`` measures them on the averaging's own
    chunk stacks (``norms.stack_norms``) and adds the unnormalised norms, dividing each module's sums
    by their total at the end -- which is what the streaming path does with the norms its facts
    carry, so both give the same bytes, and every factor is copied once instead of twice."""

    def __init__(self, prev_global: LoraAdapter, facts: Sequence[ClientFacts], cfg: StrategyConfig, r_max: int,
                 measure: bool = False) -> None:
        if not facts:
            raise AdapterError("aggregate: no client updates to aggregate")
        if cfg.name == "full_ft":
            raise ValueError("full_ft aggregates full weight deltas: call average_tensors")
        modules = prev_global.modules
        expected = set(modules)
        for f in facts:
            if f.ranks.keys() != expected:
                raise AdapterError(f"client {f.client_id}: modules differ from the global adapter's")
            if max(f.ranks.values()) > r_max:
                raise AdapterError(f"client {f.client_id}: rank {max(f.ranks.values())} > r_max {r_max}")
        self.facts, self.cfg, self.prev = list(facts), cfg, prev_global
        n = np.array([f.num_samples for f in facts], dtype=np.float64)
        self.n, self.fallback = n, ""
        self._sums: FactorSums | DeltaSums
        self.measure = measure
        if measure and not measurable(cfg):
            raise ValueError("measure=True is for per-module sparsity weights without clipping")
        if cfg.name == "recon_svd":
            w = n / n.sum()
            self.p = {m: w for m in modules}
            self._u, self._total = self.p, dict.fromkeys(modules, 1.0)
            self._sums = DeltaSums(prev_global, r_max, {m: sum(f.ranks[m] for f in facts) for m in modules})
        else:
            norms = [f.norms for f in facts]
            if weighting(cfg) == "sparsity" and not measure and any(d is None for d in norms):
                raise ValueError("sparsity weights need every client's delta norms: make the facts with client_facts(update, cfg)")
            if measure:  # known after add_all
                self.p, self._u, self._total = {}, {}, {}
            else:
                self._u, self._total, self.p, self.fallback = _raw_weights(
                    n, [d for d in norms if d is not None] if weighting(cfg) == "sparsity" else None, modules, cfg)
            self._sums = FactorSums(prev_global, r_max, cfg)
        self.groups = rank_groups(self.facts, by_rank=cfg.name != "recon_svd")
        self._added = [False] * len(self.facts)

    def add(self, indices: Sequence[int], adapters: Sequence[LoraAdapter]) -> None:
        """Add clients ``indices`` (an entry of ``groups``) whose adapters are ``adapters``; the
        clipping decided in their facts is applied here."""
        if self.measure:
            raise ValueError("measure=True measures the norms in add_all: add every client at once")
        idx, clipped = self._take(indices, adapters)
        if isinstance(self._sums, DeltaSums):
            self._sums.add(clipped, next(iter(self.p.values()))[idx])
        else:
            self._sums.add(clipped, {m: w[idx] for m, w in self._u.items()})

    def add_all(self, adapters: Sequence[LoraAdapter]) -> None:
        """Add every client at once (``adapters[i]`` is client i's), module by module: the same
        operations on each module's sums as ``add`` group by group, so the same bytes, with a
        module's sums kept in cache across the groups."""
        if len(adapters) != len(self.facts):
            raise ValueError(f"{len(self.facts)} clients but {len(adapters)} adapters")
        taken = [self._take(g, [adapters[i] for i in g]) for g in self.groups]
        for m in self.prev.modules:
            if self.measure and isinstance(self._sums, FactorSums):
                self._measured_module(m, taken)
                continue
            for idx, clipped in taken:
                self._sums.add_module(m, clipped, self._u[m][idx])
            if isinstance(self._sums, FactorSums):
                self._sums.finish(m, self._total[m])
            else:
                self._sums.finish(m)

    def _measured_module(self, m: str, taken: list[tuple[list[int], list[LoraAdapter]]]) -> None:
        """Module ``m`` under ``measure``: each chunk's norms from its stacks, added unnormalised; the
        weights follow, as ``_raw_weights`` makes them from the facts. If they fall back (every norm
        zero) the module is added again with the sample-count weights."""
        assert isinstance(self._sums, FactorSums)
        s = np.zeros(len(self.facts))
        for idx, clipped in taken:
            scales = np.array([a.scale for a in clipped], np.float64)
            n = self.n[idx] if self.cfg.sample_weighted else None

            def measure(a: Chunk, b: Chunk, start: int, idx: list[int] = idx, scales: np.ndarray = scales,
                        n: np.ndarray | None = n) -> np.ndarray:
                u = stack_norms(a, b, scales[start:start + len(a)])
                return u if n is None else u * n[start:start + len(a)]
            s[idx] = self._sums.add_module(m, clipped, measure)
        self.p[m], self._total[m], note = _normalise(s, self.n)
        self._u[m] = self.p[m] if note else s
        if note:
            self._sums.reset(m)
            for idx, clipped in taken:
                self._sums.add_module(m, clipped, self._u[m][idx])
            self.fallback = note
        self._sums.finish(m, self._total[m])

    def _take(self, indices: Sequence[int], adapters: Sequence[LoraAdapter]) -> tuple[list[int], list[LoraAdapter]]:
        if len(indices) != len(adapters):
            raise ValueError(f"{len(indices)} client indices but {len(adapters)} adapters")
        clipped = []
        for i, a in zip(indices, adapters, strict=True):
            f = self.facts[i]
            if self._added[i]:
                raise ValueError(f"client {f.client_id} was added twice")
            if a.ranks != f.ranks:
                raise AdapterError(f"client {f.client_id}: ranks {a.ranks} differ from its facts' {f.ranks}")
            if f.factor_clip is not None:
                a = apply_factor_clip(a, self.prev.truncate(a.ranks), f.factor_clip)
            clipped.append(clip_adapter(a, f.clip))
        for i in indices:
            self._added[i] = True
        return list(indices), clipped

    def result(self) -> tuple[LoraAdapter, AggregationInfo]:
        missing = [f.client_id for f, done in zip(self.facts, self._added, strict=True) if not done]
        if missing:
            raise ValueError(f"aggregation incomplete: clients {missing[:5]} were never added")
        if isinstance(self._sums, FactorSums):
            for m in self.prev.modules:
                self._sums.finish(m, self._total[m])  # a module not finished yet (fed by add)
        new = self._sums.result()
        ids = [f.client_id for f in self.facts]
        p = self.p
        info = AggregationInfo(fallback=self.fallback, clipped=[f.client_id for f in self.facts
                                                                         if f.clip is not None or f.factor_clip is not None])
        info.weights = {m: dict(zip(ids, p[m].tolist(), strict=True)) for m in p}
        # the mean over modules, summed in module order (the bits of a Python sum over the modules), by array
        total = np.zeros(len(ids))
        for w in p.values():
            total += w
        info.client_weights = dict(zip(ids, (total / len(p)).tolist(), strict=True))
        return new, info


def aggregate(prev_global: LoraAdapter, updates: Sequence[ClientUpdate], cfg: StrategyConfig,
              r_max: int) -> tuple[LoraAdapter, AggregationInfo]:
    """One server step for every LoRA strategy. ``prev_global`` (rank r_max) supplies the module
    set and, with ``untrained_components="keep"``, the values of components nobody trained."""
    if not updates:
        raise AdapterError("aggregate: no client updates to aggregate")
    if cfg.name == "full_ft":
        raise ValueError("full_ft aggregates full weight deltas: call average_tensors")
    # modules and ranks are checked by Aggregation, from the facts (the same messages)
    if measurable(cfg):
        agg = Aggregation(prev_global, _facts_of(updates), cfg, r_max, measure=True)  # norms measured while averaging
        agg.add_all([u.adapter for u in updates])
        return agg.result()
    norms: list[dict[str, float] | None] = [None] * len(updates)
    if needs_norms(cfg):  # every client's norms in one batch (norms.py): the same bits as one by one
        norms = list(delta_norms_many([(u.adapter.A, u.adapter.B, u.adapter.scale) for u in updates]))
    agg = Aggregation(prev_global, [client_facts(u, cfg, prev_global, n) for u, n in zip(updates, norms, strict=True)], cfg, r_max)
    agg.add_all([u.adapter for u in updates])
    return agg.result()
