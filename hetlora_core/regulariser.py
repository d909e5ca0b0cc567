"""The training-time tail regulariser (HETLORA.md step 3): ``lam * sum_m score_m`` over the live
LoRA tensors of a client's peft model, in one of two forms (``pruning.form``):

- ``"loss"``: ``regulariser`` is added to the loss and reaches the tail through its gradient (the
  paper's form). Under AdamW each entry's step is normalised by its own gradient history, so the
  penalty's gradient on a small tail is drowned by the task loss's and the tail rarely shrinks.
- ``"proximal"``: the loss is left alone and ``proximal_step`` shrinks the tail after every
  optimiser step (decoupled from the gradient, as AdamW's weight decay is), by a group-lasso
  soft-threshold in the metric of the step Adam just took, so Adam's normalisation cannot undo it.

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


def penalised_modules(modules: list[str], received_ranks: Mapping[str, int], cfg: PruningConfig, r_min: int) -> list[str]:
    """The modules whose tail is penalised (either form): none when pruning is off or lam = 0, and
    none at r_min unless ``regularize_at_r_min`` (such a module cannot prune, so the penalty only hurts)."""
    if not cfg.enabled or cfg.lam == 0:
        return []
    return [m for m in modules if cfg.regularize_at_r_min or received_ranks[m] > r_min]


def regulariser(A: Mapping[str, torch.Tensor], B: Mapping[str, torch.Tensor], received_ranks: Mapping[str, int],
                cfg: PruningConfig, r_min: int) -> torch.Tensor | None:
    """``lam * sum_m score_m`` with each tail fixed by the rank the module was *received* at, or None
    when it does not apply (``penalised_modules`` is empty). Differentiable where A and B are; the
    proximal form calls it under ``no_grad`` only to report the penalty's value."""
    mods = penalised_modules(list(A), received_ranks, cfg, r_min)
    if not mods:
        return None
    if not torch.is_grad_enabled():  # only reported (the proximal form, every step): stacked per shape
        return cfg.lam * torch.stack([_stacked_scores(A, B, ms, key, cfg.score).sum()
                                      for key, ms in _by_shape(A, B, mods, received_ranks, cfg.gamma).items()]).sum()
    scores = [tail_score(A[m], B[m], tail_start(received_ranks[m], cfg.gamma), cfg.score) for m in mods]
    return cfg.lam * torch.stack(scores).sum()


def _by_shape(A: Mapping[str, torch.Tensor], B: Mapping[str, torch.Tensor], mods: list[str],
              received_ranks: Mapping[str, int], gamma: float) -> dict[tuple[object, ...], list[str]]:
    """Modules whose tails can be stacked: equal tail start, A and B shapes, dtypes and device."""
    out: dict[tuple[object, ...], list[str]] = {}
    for m in mods:
        key = (tail_start(received_ranks[m], gamma), tuple(A[m].shape), tuple(B[m].shape), A[m].dtype, B[m].dtype, A[m].device)
        out.setdefault(key, []).append(m)
    return out


def _stacked_scores(A: Mapping[str, torch.Tensor], B: Mapping[str, torch.Tensor], ms: list[str], key: tuple[object, ...],
                    kind: str) -> torch.Tensor:
    """``tail_score`` of each module of one ``_by_shape`` group, as one (G,) tensor."""
    start = int(key[0])  # type: ignore[call-overload]
    a = torch.stack([A[m][start:] for m in ms]).float()
    b = torch.stack([B[m][:, start:] for m in ms]).float()
    if kind == "product_of_norms":
        return torch.linalg.vector_norm(b, dim=(1, 2)) * torch.linalg.vector_norm(a, dim=(1, 2))
    if kind == "norm_of_product":
        return torch.linalg.matrix_norm(b @ a)
    raise ValueError(f"unknown pruning score {kind!r}")


def _shrink(norms: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
    """Block soft-thresholding factor ``max(0, 1 - tau / norm)``; a zero norm gives 0 (stays zero)."""
    return torch.clamp(1 - tau / norms.clamp_min(torch.finfo(norms.dtype).tiny), min=0)


def adam_step_sizes(opt: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-entry step sizes ``lr / (sqrt(v_hat) + eps)`` of the Adam(W) optimiser ``opt`` on each tensor:
    the diagonal metric its last step used (bias-corrected as AdamW does). A tensor it holds no state
    for yet gets its plain ``lr``."""
    out: dict[str, torch.Tensor] = {}
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    for m, p in tensors.items():
        g, state = group_of[id(p)], opt.state.get(p, {})
        if "exp_avg_sq" not in state:
            out[m] = torch.full(p.shape, float(g["lr"]), dtype=torch.float32, device=p.device)
            continue
        v_hat = state["exp_avg_sq"].float() / (1 - g["betas"][1] ** float(state["step"]))
        out[m] = float(g["lr"]) / (v_hat.sqrt() + g["eps"])
    return out


StepSizes = float | tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]] | torch.optim.Optimizer


@torch.no_grad()
def proximal_step(A: Mapping[str, torch.Tensor], B: Mapping[str, torch.Tensor], received_ranks: Mapping[str, int],
                  cfg: PruningConfig, r_min: int, step: StepSizes) -> None:
    """The proximal form's shrinkage (``pruning.form: proximal``), in place on each penalised module's
    tail after an optimiser step; the head components ``j < tail_start`` are never touched.

    ``step``: the step size ``eta`` of the prox, a scalar (a plain proximal-gradient step: ``lr``) or
    per-entry step sizes for A and B (``adam_step_sizes``: the client's choice). A group's ``eta`` is
    the mean over its entries. Why Adam's metric and not ``lr``: AdamW moves every entry of a tail by
    about ``lr`` per step however small its gradient, so a group of d entries can gain ``lr*sqrt(d)``
    per step, and a prox that removes ``lr*lam`` loses at any sensible lam (measured on the tiny
    model: a 1e-4 tail grew to ~1e-2 at lam 0.01 to 1). In Adam's own metric the prox matches the
    step Adam just took: ``lr / sqrt(v_hat)`` is large where the task gradient is small, so a tail the
    task does not use is zeroed, one it uses shrinks slowly. This is the proximal step of adaptive
    proximal-gradient methods (ProxGen: Yun, Lozano, Yang, NeurIPS 2021).

    ``product_of_norms``: the group-lasso prox, one group per tail component j, its B column and its
    A row: ``b_j <- b_j * max(0, 1 - eta*lam/||b_j||)``, ``a_j <- a_j * max(0, 1 - eta*lam/||a_j||)``.
    That is the exact prox of ``lam * sum_j (||b_j|| + ||a_j||)``, chosen over the product itself
    because (1) over the rescalings ``b_j*c, a_j/c`` (which leave the adapter's ``B A`` unchanged)
    its minimum is ``2 lam sqrt(||b_j|| ||a_j||)``: it penalises the same per-component product of
    norms, through a concave, sparsity-inducing square root; (2) its pull does not vanish at zero:
    every step removes ``eta*lam`` of norm from every tail group whatever its size, so a small tail
    reaches exactly zero in finitely many steps, whereas the product's own gradient on B is
    ``lam * ||A_tail||`` (and vice versa), which vanishes with the tail: a small tail is a saddle
    it barely leaves. The product's own prox is non-convex, with no closed form per group.

    ``norm_of_product``: the exact prox of ``eta*lam * ||M||_F`` on the tail's product
    ``M = B_tail A_tail`` (block soft-thresholding: ``M <- M * max(0, 1 - eta*lam/||M||_F)``, one group,
    ``eta`` the mean over all tail entries of A and B), realised on the factors by scaling both by the
    square root of that factor (any split gives the same product; this one keeps the factors' balance).
    So this form penalises exactly the score it names.
    ``step`` an Adam(W) optimiser: its metric (``adam_step_sizes``) with modules of equal shapes and
    tails stacked, so a step costs a few kernels per shape instead of ~15 per module (on a GPU the
    per-module form launches about that many per module, counted from the code, not profiled: several
    hundred per step at SmolLM2's 60 modules, each a separate launch on a GPU). Same arithmetic, grouped (tests/test_proximal.py compares them).

    Float32 arithmetic; the tensors keep their dtype. Zero groups stay zero."""
    mods = penalised_modules(list(A), received_ranks, cfg, r_min)
    if isinstance(step, torch.optim.Optimizer):
        mods = _grouped_adam_prox(A, B, mods, received_ranks, cfg, step)  # returns what it could not group
        step = (adam_step_sizes(step, {m: A[m] for m in mods}), adam_step_sizes(step, {m: B[m] for m in mods}))
    for m in mods:
        start = tail_start(received_ranks[m], cfg.gamma)
        a, b = A[m][start:], B[m][:, start:]  # views into the live parameters
        af, bf = a.float(), b.float()
        if isinstance(step, tuple):
            eta_a, eta_b = step[0][m][start:].float(), step[1][m][:, start:].float()
        else:
            eta_a, eta_b = torch.full_like(af, step), torch.full_like(bf, step)
        if cfg.score == "product_of_norms":
            a.copy_(af * _shrink(torch.linalg.vector_norm(af, dim=1), cfg.lam * eta_a.mean(dim=1))[:, None])  # A rows
            b.copy_(bf * _shrink(torch.linalg.vector_norm(bf, dim=0), cfg.lam * eta_b.mean(dim=0))[None, :])  # B columns
        elif cfg.score == "norm_of_product":
            eta = torch.cat([eta_a.flatten(), eta_b.flatten()]).mean()
            c = _shrink(torch.linalg.matrix_norm(bf @ af), cfg.lam * eta).sqrt()
            a.copy_(af * c)
            b.copy_(bf * c)
        else:
            raise ValueError(f"unknown pruning score {cfg.score!r}")


def _stacked_steps(opt: torch.optim.Optimizer, group_of: Mapping[int, int], params: list[torch.Tensor], start: int,
                   dim: int) -> torch.Tensor | None:
    """``adam_step_sizes`` of the tails (from ``start`` along ``dim``) of ``params``, stacked; None
    when one of them has no Adam state yet or they are not all in one parameter group."""
    states = [opt.state.get(p, {}) for p in params]
    if len({group_of.get(id(p)) for p in params}) != 1 or any("exp_avg_sq" not in st for st in states):
        return None
    g = opt.param_groups[group_of[id(params[0])]]
    v = torch.stack([st["exp_avg_sq"].narrow(dim, start, st["exp_avg_sq"].shape[dim] - start) for st in states]).float()
    corr = torch.tensor([1 - g["betas"][1] ** float(st["step"]) for st in states], dtype=torch.float32).to(v.device)
    return float(g["lr"]) / ((v / corr.view(-1, 1, 1)).sqrt() + g["eps"])


def _grouped_adam_prox(A: Mapping[str, torch.Tensor], B: Mapping[str, torch.Tensor], mods: list[str],
                       received_ranks: Mapping[str, int], cfg: PruningConfig, opt: torch.optim.Optimizer) -> list[str]:
    """``proximal_step`` in Adam's metric on every group of modules with equal A and B shapes and tail
    start, each group stacked; returns the modules it left for the per-module form."""
    group_of = {id(p): i for i, g in enumerate(opt.param_groups) for p in g["params"]}
    left: list[str] = []
    for (start, *_), ms in _by_shape(A, B, mods, received_ranks, cfg.gamma).items():
        assert isinstance(start, int)
        eta_a = _stacked_steps(opt, group_of, [A[m] for m in ms], start, 0)
        eta_b = _stacked_steps(opt, group_of, [B[m] for m in ms], start, 1)
        if eta_a is None or eta_b is None or cfg.score not in ("product_of_norms", "norm_of_product"):
            left += ms
            continue
        a_live, b_live = [A[m][start:] for m in ms], [B[m][:, start:] for m in ms]
        a, b = torch.stack(a_live).float(), torch.stack(b_live).float()  # (G, t, in), (G, out, t)
        if cfg.score == "product_of_norms":
            a = a * _shrink(torch.linalg.vector_norm(a, dim=2), cfg.lam * eta_a.mean(dim=2))[..., None]  # A rows
            b = b * _shrink(torch.linalg.vector_norm(b, dim=1), cfg.lam * eta_b.mean(dim=1))[:, None, :]  # B columns
        else:
            eta = (eta_a.sum(dim=(1, 2)) + eta_b.sum(dim=(1, 2))) / (eta_a[0].numel() + eta_b[0].numel())
            c = _shrink(torch.linalg.matrix_norm(b @ a), cfg.lam * eta).sqrt()[:, None, None]
            a, b = a * c, b * c
        torch._foreach_copy_(a_live, list(a.unbind(0)))
        torch._foreach_copy_(b_live, list(b.unbind(0)))
    return left
