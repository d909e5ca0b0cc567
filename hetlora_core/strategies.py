"""Server aggregation strategies as pure functions over adapters (no model, no I/O).

Three code paths cover every method of HETLORA.md:

* factor averaging (``hetlora``, ``zero_pad``, ``homlora``): zero-pad each client's ``A_k``, ``B_k``
  to ``r_max`` and average with weights ``p_k`` -- sparsity weights ``||B_k A_k||_F`` (HetLoRA),
  uniform (zero-padding baseline, and the HetLoRA "no sparsity weights" ablation) or sample counts
  (HomLoRA FedAvg). Options: weights per module or per client, sample counts multiplied in,
  rank-aware normalisation, and what happens to components no client trained.
* reconstruction + SVD (``recon_svd``, FlexLoRA): average ``dW_k = s B_k A_k`` by sample counts and
  factor the result by SVD with balanced factors, so truncating to r is the best rank-r approximation.
* full fine-tuning FedAvg (``full_ft``): ``average_tensors`` over full weight deltas.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .adapter import AdapterError, LoraAdapter
from .config import StrategyConfig


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


def weighting(cfg: StrategyConfig) -> str:
    """Which weights the factor-averaging path uses for this strategy."""
    if cfg.name == "hetlora":
        return "sparsity" if cfg.sparsity_weights else "uniform"
    return {"zero_pad": "uniform", "homlora": "samples"}.get(cfg.name, "samples")


def clip_updates(updates: Sequence[ClientUpdate], clip_norm: float | None) -> tuple[list[ClientUpdate], list[str]]:
    """Scale B of any client whose total ``||s B A||_F`` over modules exceeds ``clip_norm``.

    Security: bounds what one poisoned client can move the global model by; scaling B alone
    scales ``dW`` linearly, so the clipped update keeps its direction."""
    if clip_norm is None:
        return list(updates), []
    out, clipped = [], []
    for u in updates:
        norm = math.sqrt(sum(n * n for n in u.adapter.delta_norms().values()))
        if norm > clip_norm:
            f = clip_norm / norm
            a = u.adapter.clone()
            a.B = {m: b * f for m, b in a.B.items()}
            out.append(ClientUpdate(u.client_id, a, u.num_samples))
            clipped.append(u.client_id)
        else:
            out.append(u)
    return out, clipped


def client_weights(updates: Sequence[ClientUpdate], cfg: StrategyConfig) -> tuple[dict[str, torch.Tensor], str]:
    """Weights ``p[module]`` of shape (K,) summing to 1, and a fallback note.

    Sparsity weights ``S_k = ||B_k A_k||_F`` per module (or, per client, the norm over all modules);
    if every ``S_k`` is zero (round 0: all B are zero) fall back to sample-count weights."""
    modules = updates[0].adapter.modules
    n = torch.tensor([float(u.num_samples) for u in updates], dtype=torch.float64)
    kind = weighting(cfg)
    if kind == "uniform":
        return {m: torch.full((len(updates),), 1.0 / len(updates), dtype=torch.float64) for m in modules}, ""
    if kind == "samples":
        return {m: n / n.sum() for m in modules}, ""
    norms = [u.adapter.delta_norms() for u in updates]
    if cfg.weight_granularity == "client":
        per_client = torch.tensor([math.sqrt(sum(v * v for v in d.values())) for d in norms], dtype=torch.float64)
        raw = {m: per_client for m in modules}
    else:
        raw = {m: torch.tensor([d[m] for d in norms], dtype=torch.float64) for m in modules}
    out, fallback = {}, ""
    for m, s in raw.items():
        if cfg.sample_weighted:
            s = s * n
        total = float(s.sum())
        if total > 0 and math.isfinite(total):
            out[m] = s / total
        else:  # guard sum = 0 (HETLORA.md step 5)
            out[m], fallback = n / n.sum(), "all sparsity norms zero: sample-count weights"
    return out, fallback


def average_factors(prev_global: LoraAdapter, updates: Sequence[ClientUpdate], p: dict[str, torch.Tensor],
                    cfg: StrategyConfig, r_max: int) -> LoraAdapter:
    """``B_g = sum_k p_k pad(B_k)``, ``A_g = sum_k p_k pad(A_k)`` per module, component by component.

    Component j of client k gets weight ``W[k, j] = p_k`` if ``j < r_k`` else 0 (its zero padding).
    ``normalisation="paper"`` uses W as is (the paper's formula); ``"rank_aware"`` divides column j
    by ``sum_k W[k, j]`` so a component trained by few clients is not shrunk by ``p_k^2`` in B A.
    Components with ``sum_k W[k, j] == 0`` keep the previous global value (``untrained_components
    = "keep"``) or become zero (``"zero"``, paper-literal; then they can never train again)."""
    A_g, B_g = {}, {}
    for m in prev_global.modules:
        # One fused scalar-weighted add per client tensor into float64 accumulators (no per-client
        # float64 temporaries: measured ~3x faster at 1000 clients, benchmarks/bench_aggregation.py);
        # rank-aware normalisation is then one division per component.
        a = prev_global.A[m].new_zeros(r_max, prev_global.A[m].shape[1], dtype=torch.float64)
        b = prev_global.B[m].new_zeros(prev_global.B[m].shape[0], r_max, dtype=torch.float64)
        col = torch.zeros(r_max, dtype=torch.float64)  # sum_k W[k, j]
        for k, u in enumerate(updates):
            r, w = u.adapter.ranks[m], float(p[m][k])
            a[:r].add_(u.adapter.A[m], alpha=w)
            b[:, :r].add_(u.adapter.B[m], alpha=w)
            col[:r] += w
        if cfg.normalisation == "rank_aware":
            inv = 1.0 / torch.where(col > 0, col, torch.ones_like(col))  # untrained: handled below
            a.mul_(inv[:, None])
            b.mul_(inv[None, :])
        untrained = col == 0
        if cfg.untrained_components == "keep" and untrained.any():
            a[untrained] = prev_global.A[m][untrained].double()
            b[:, untrained] = prev_global.B[m][:, untrained].double()
        A_g[m], B_g[m] = a.float(), b.float()
    return LoraAdapter(A_g, B_g, prev_global.scale)


def svd_factor(delta: torch.Tensor, rank: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced rank-``rank`` factors with ``scale * B @ A`` = best rank-r approximation of ``delta``.

    ``B = U_r sqrt(S_r / s)``, ``A = sqrt(S_r / s) V_r^T``: components are ordered by singular
    value, so truncating (B, A) to any r' <= rank is again the best rank-r' approximation."""
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    r = min(rank, S.shape[0])
    root = torch.sqrt(S[:r] / scale)
    B = torch.zeros(delta.shape[0], rank, dtype=torch.float64)
    A = torch.zeros(rank, delta.shape[1], dtype=torch.float64)
    B[:, :r], A[:r] = U[:, :r] * root, root[:, None] * Vh[:r]
    return A.float(), B.float()


def recon_svd(prev_global: LoraAdapter, updates: Sequence[ClientUpdate], r_max: int) -> tuple[LoraAdapter, dict[str, torch.Tensor]]:
    """FlexLoRA: ``dW = sum_k n_k/n * s B_k A_k`` per module, refactored at ``r_max`` by SVD."""
    n = torch.tensor([float(u.num_samples) for u in updates], dtype=torch.float64)
    w = n / n.sum()
    A_g, B_g = {}, {}
    for m in prev_global.modules:
        delta = sum(w[k] * updates[k].adapter.delta(m).double() for k in range(len(updates)))
        A_g[m], B_g[m] = svd_factor(delta, r_max, prev_global.scale)
    return LoraAdapter(A_g, B_g, prev_global.scale), {m: w for m in prev_global.modules}


def average_tensors(deltas: Sequence[dict[str, torch.Tensor]], num_samples: Sequence[int]) -> dict[str, torch.Tensor]:
    """Full fine-tuning FedAvg: the sample-weighted mean of full weight deltas."""
    n = torch.tensor([float(x) for x in num_samples], dtype=torch.float64)
    w = n / n.sum()
    return {k: sum(float(w[i]) * d[k].double() for i, d in enumerate(deltas)).float() for k in deltas[0]}


def aggregate(prev_global: LoraAdapter, updates: Sequence[ClientUpdate], cfg: StrategyConfig,
              r_max: int) -> tuple[LoraAdapter, AggregationInfo]:
    """One server step for every LoRA strategy. ``prev_global`` (rank r_max) supplies the module
    set and, with ``untrained_components="keep"``, the values of components nobody trained."""
    if not updates:
        raise AdapterError("aggregate: no client updates to aggregate")
    if cfg.name == "full_ft":
        raise ValueError("full_ft aggregates full weight deltas: call average_tensors")
    for u in updates:
        if set(u.adapter.modules) != set(prev_global.modules):
            raise AdapterError(f"client {u.client_id}: modules differ from the global adapter's")
        if u.adapter.rank > r_max:
            raise AdapterError(f"client {u.client_id}: rank {u.adapter.rank} > r_max {r_max}")
    updates, clipped = clip_updates(updates, cfg.clip_norm)
    info = AggregationInfo(clipped=clipped)
    if cfg.name == "recon_svd":
        new, p = recon_svd(prev_global, updates, r_max)
    else:
        p, info.fallback = client_weights(updates, cfg)
        new = average_factors(prev_global, updates, p, cfg, r_max)
    ids = [u.client_id for u in updates]
    info.weights = {m: {c: float(w) for c, w in zip(ids, p[m])} for m in p}
    info.client_weights = {c: float(sum(p[m][k] for m in p) / len(p)) for k, c in enumerate(ids)}
    return new, info
