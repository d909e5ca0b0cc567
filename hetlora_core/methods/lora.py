"""The LoRA family: HetLoRA, zero-padding, HomLoRA and Recon+SVD (FlexLoRA).

They share the state (a ``LoraAdapter`` at r_max), truncation on the way to a client and the
upload validation; they differ only in the aggregation math (``strategies.aggregate`` picks the
weights or the SVD path from ``StrategyConfig``) and in whether clients self-prune.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .. import robust, strategies
from ..adapter import AdapterError, LoraAdapter, init_global
from ..pruning import PruneDecision, self_prune
from .base import _HEADER_SLACK, Aggregated, ClientUpdate, Method, Spec, Stream

if TYPE_CHECKING:
    from ..evaluation import EvalResult


class _LoraStream(Stream):
    """``strategies.Aggregation`` behind the method interface."""

    def __init__(self, agg: strategies.Aggregation) -> None:
        self.agg, self.groups = agg, agg.groups

    def add(self, indices: list[int], states: list[LoraAdapter]) -> None:
        self.agg.add(indices, states)

    def result(self) -> Aggregated:
        new, info = self.agg.result()
        return Aggregated(new, info.client_weights, info.fallback, info.clipped)


class LoraMethod(Method):
    trains_lora = True
    streams = True  # the weights need only each client's facts (ranks, samples, delta norms)

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self._initial: dict[Any, LoraAdapter] = {}  # round 0's initial global by spec (summarise under clip_norm)
        self._norms_of: tuple[LoraAdapter, dict[str, float]] | None = None  # update_norms' delta norms, for summarise

    @property
    def prunes(self) -> bool:
        return self.name == "hetlora" and self.cfg.pruning.enabled

    # ------------------------------------------------------------ model-free
    def initial_global(self, spec: Spec) -> LoraAdapter:
        c = self.cfg
        return init_global({m: (int(s[0]), int(s[1])) for m, s in spec.items()}, c.ranks.r_max, c.model.lora_scale,
                           c.federation.seed)

    def decode(self, data: bytes, spec: Spec | None, where: str, max_rank: int | None = None) -> LoraAdapter:
        c = self.cfg
        r_max = c.ranks.r_max if max_rank is None else min(max_rank, c.ranks.r_max)
        lora_spec = None if spec is None else {m: (int(s[0]), int(s[1])) for m, s in spec.items()}
        return LoraAdapter.from_bytes(data, lora_spec, c.ranks.r_min, r_max, c.model.lora_scale, where=where)

    def encode(self, state: LoraAdapter) -> bytes:
        return state.to_bytes()

    def spec_of(self, state: LoraAdapter) -> Spec:
        return {m: (int(state.B[m].shape[0]), int(state.A[m].shape[1])) for m in state.modules}

    def aggregate(self, prev: LoraAdapter, updates: list[ClientUpdate]) -> Aggregated:
        ups = [strategies.ClientUpdate(u.client_id, u.state, u.num_samples) for u in updates]
        new, info = strategies.aggregate(prev, ups, self.cfg.strategy, self.cfg.ranks.r_max)
        return Aggregated(new, info.client_weights, info.fallback, info.clipped)

    def summarise(self, update: ClientUpdate, prev: LoraAdapter | None = None) -> strategies.ClientFacts:
        if prev is None and self.cfg.strategy.clip_norm is not None:
            # Round 0: the global is the seeded initial one of the upload's spec (an upload of another
            # spec than the round's majority is dropped before its facts are used).
            spec = self.spec_of(update.state)
            key = tuple(sorted(spec.items()))
            if key not in self._initial:
                self._initial = {key: self.initial_global(spec)}  # one spec per round: keep one
            prev = self._initial[key]
        known = self._norms_of[1] if self._norms_of is not None and self._norms_of[0] is update.state else None
        self._norms_of = None  # keeps no upload alive
        return strategies.client_facts(strategies.ClientUpdate(update.client_id, update.state, update.num_samples),
                                       self.cfg.strategy, prev, known)

    def update_norms(self, state: LoraAdapter) -> dict[str, float]:
        """(The delta norms are kept for a ``summarise`` of the same state: the aggregate step asks for
        both in its first pass, and computing them is most of either's cost.)"""
        dn = state.delta_norms()
        self._norms_of = (state, dn)
        return robust.lora_norms(state, dn)

    def arrays(self, state: LoraAdapter) -> list[Any]:
        return [*state.A.values(), *state.B.values()]

    def aggregate_stream(self, prev: LoraAdapter, summaries: list[strategies.ClientFacts]) -> Stream:
        return _LoraStream(strategies.Aggregation(prev, summaries, self.cfg.strategy, self.cfg.ranks.r_max))

    def prune(self, received: LoraAdapter, trained: LoraAdapter) -> tuple[LoraAdapter, PruneDecision | None]:
        if trained.ranks != received.ranks:
            raise AdapterError(f"trained ranks {trained.ranks} differ from the ranks received {received.ranks}")
        pcfg = self.cfg.pruning if self.prunes else type(self.cfg.pruning)(enabled=False, gamma=self.cfg.pruning.gamma)
        return self_prune(received, trained, pcfg, self.cfg.ranks.r_min)

    def client_ranks(self, state: LoraAdapter) -> dict[str, int]:
        return state.ranks

    def nbytes(self, state: LoraAdapter) -> int:
        return state.nbytes()

    def max_upload_bytes(self, spec: Spec, max_rank: int) -> int:
        """A and B of every module at the client's planned rank (``spec``: module -> (out, in))."""
        return 4 * max_rank * sum(int(o) + int(i) for o, i in spec.values()) + _HEADER_SLACK * (1 + 2 * len(spec))

    # ------------------------------------------------------------ model-side
    def model_spec(self, model: Any) -> Spec:
        from ..peft_bridge import spec_from_model

        return dict(spec_from_model(model, self.cfg.model.target_modules))

    def receive(self, glob: LoraAdapter, ranks: int | dict[str, int]) -> LoraAdapter:
        return glob.truncate(ranks)

    def train(self, model: Any, received: LoraAdapter, client: Any, rnd: int) -> tuple[LoraAdapter, Any]:
        from ..client import train_lora

        res = train_lora(model, received, client, self.cfg, rnd)
        assert res.adapter is not None
        return res.adapter, res

    def evaluate(self, model: Any, glob: LoraAdapter, clients: list[Any],
                 client_ranks: dict[str, int | dict[str, int]]) -> tuple[EvalResult, EvalResult]:
        from ..evaluation import EvalResult, evaluate

        full = evaluate(model, glob, clients, self.cfg)
        # Only clients below r_max need a pass of their own: at r_max the truncation is the global.
        low = [c for c in clients if not (isinstance(r := client_ranks[c.client_id], int) and r >= glob.rank)]
        own = evaluate(model, glob, low, self.cfg, {c.client_id: client_ranks[c.client_id] for c in low}) if low else None
        per = {**full.per_client, **(own.per_client if own else {})}
        return full, EvalResult.combine(per, full.per_client_tokens)
