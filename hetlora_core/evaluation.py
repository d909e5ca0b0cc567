"""Held-out perplexity: per client and overall (token-weighted), for the global adapter at r_max
and for each client's own rank (the global truncated to it: what that device would run)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import lm_loss, peft_bridge
from .adapter import LoraAdapter, Ranks
from .config import HetLoRAConfig
from .data import IGNORE, Batch, ClientData, eval_batch
from .precision import Precision, resolve

EVAL_BATCH = 8  # rows per forward pass on a CPU: its logits (rows x seq x vocab floats) stay ~100-200 MB
# On a GPU a small model's forward of 4 short rows costs about what one of 32 does (bound by kernel
# launches, not by rows): up to 32 rows per pass there, within LOGIT_BUDGET.
CUDA_EVAL_ROWS = 32
LOGIT_BUDGET = 2**27  # logit elements per pass (0.5 GB as float32): long windows x large vocabularies take fewer rows


def eval_rows(model: torch.nn.Module, seq_len: int, device: str) -> int:
    """Rows per evaluation pass: the device's batch, fewer where rows x seq x vocab logits would
    exceed ``LOGIT_BUDGET`` (e.g. 1024-token windows of a 128k vocabulary: 1 row), at least one."""
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    vocab = int(out.weight.shape[0]) if out is not None else int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)
    want = CUDA_EVAL_ROWS if device == "cuda" else EVAL_BATCH
    return max(1, min(want, LOGIT_BUDGET // max(1, seq_len * vocab))) if vocab else want


def _logprobs(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None, targets: torch.Tensor,
              prec: Precision, chunked: bool) -> torch.Tensor:
    """log p(next token) at every position but the last (rows, length - 1), float32; 0 where the
    target is IGNORE. ``chunked`` (training.chunked_loss), on a CPU: the output layer chunk by chunk
    on the decoder's hidden states (lm_loss.target_logprobs) where lm_loss.checked_parts allows it;
    else the model's own logits, as before. Not on a GPU: there a pass's logits are bounded by
    LOGIT_BUDGET (eval_rows) and each chunk would cost a device sync (the chunked path was not
    measured on one)."""
    kwargs = {} if mask is None else {"attention_mask": mask}
    with prec.autocast():
        use = chunked and prec.device == "cpu"
        parts = lm_loss.checked_parts(model, Batch(ids, ids, mask), prec.torch_dtype) if use else None
        if parts is None:
            logits = model(input_ids=ids, **kwargs).logits
        else:
            hidden = parts[0](input_ids=ids, **kwargs)[0][:, :-1]
    if parts is None:
        lp = torch.log_softmax(logits[:, :-1], -1, dtype=torch.float32)  # no separate float32 copy of the logits
        return lp.gather(-1, targets.clamp_min(0)[..., None])[..., 0].masked_fill(targets == IGNORE, 0.0)
    flat = lm_loss.target_logprobs(hidden.reshape(-1, hidden.shape[-1]), parts[1].weight, targets.reshape(-1), prec.torch_dtype)
    return flat.view(targets.shape)


@torch.no_grad()
def row_nll(model: torch.nn.Module, windows: torch.Tensor, prec: Precision, rows: int = EVAL_BATCH,
            chunked: bool = True) -> torch.Tensor:
    """Each text window's summed next-token negative log-likelihood (one float64 per row, each
    token's term in float32 as before), in forward passes of ``rows`` rows: the windows of several
    clients evaluated together. ``chunked``: see ``_logprobs``."""
    device = next(model.parameters()).device
    parts = []
    for i in range(0, windows.shape[0], rows):
        part = windows[i:i + rows].to(device)
        parts.append(-_logprobs(model, part, None, part[:, 1:], prec, chunked).double().sum(-1))
    return torch.cat(parts).cpu() if parts else torch.empty(0, dtype=torch.float64)  # one device sync, not one per pass


@torch.no_grad()
def nll(model: torch.nn.Module, windows: torch.Tensor | Batch, bf16: bool | Precision, chunked: bool = True) -> tuple[float, int]:
    """Summed next-token negative log-likelihood and the number of predicted tokens. A ``Batch``
    with masked labels (instruction data) counts only its answer tokens; text windows count all.

    ``bf16``: the precision decision (precision.py); a bool is the old CPU-only form (True: bf16 autocast).
    ``chunked``: see ``_logprobs``."""
    prec = bf16 if isinstance(bf16, Precision) else Precision("cpu", "bfloat16" if bf16 else "float32", "caller")
    device = next(model.parameters()).device
    total, count = 0.0, 0
    b = windows if isinstance(windows, Batch) else Batch.lm(windows)
    for i in range(0, b.input_ids.shape[0], EVAL_BATCH):
        part = b.rows(i, i + EVAL_BATCH).to(device)
        tgt = part.labels[:, 1:]
        lp = _logprobs(model, part.input_ids, part.attention_mask, tgt, prec, chunked)
        if part.attention_mask is None:  # text windows: every next token counts (the reference computation)
            total -= float(lp.sum())
            count += tgt.numel()
        else:  # instruction data: answer tokens only (labels IGNORE on prompt and padding)
            keep = tgt != IGNORE
            total -= float(lp[keep].sum())
            count += int(keep.sum())
    return total, count


@dataclass
class EvalResult:
    ppl: float  # token-weighted over all clients
    per_client: dict[str, float]
    tokens: int
    per_client_tokens: dict[str, int]

    @staticmethod
    def combine(per_client: dict[str, float], tokens: dict[str, int]) -> EvalResult:
        """Token-weighted overall perplexity from per-client perplexities and token counts."""
        n = sum(tokens[c] for c in per_client)
        return EvalResult(math.exp(sum(math.log(p) * tokens[c] for c, p in per_client.items()) / n), per_client, n, tokens)


def _rank_key(r: Ranks) -> tuple[tuple[str, int], ...] | int:
    """A hashable form of a client's ranks (an int, or per-module ranks)."""
    return r if isinstance(r, int) else tuple(sorted(r.items()))


def evaluate(model: torch.nn.Module, adapter: LoraAdapter | None, clients: Sequence[ClientData], cfg: HetLoRAConfig,
             ranks: Mapping[str, Ranks] | None = None) -> EvalResult:
    """Perplexity of ``adapter`` (None: the base model) on each client's held-out text.

    With ``ranks`` each client is evaluated with the adapter truncated to its own rank. Clients of
    equal rank share one attached truncation: attaching costs ~0.1 s of Python per call, which at
    tens of clients per round was most of an evaluation on a GPU; the numbers are the same."""
    per_client, per_tok = {}, {}
    prec = resolve(cfg)
    sums: dict[str, tuple[float, int]] = {}
    if adapter is None or ranks is None:
        groups: list[tuple[LoraAdapter | None, list[ClientData]]] = [(adapter, list(clients))]
    else:
        by_rank: dict[object, list[ClientData]] = {}
        for c in clients:
            by_rank.setdefault(_rank_key(ranks[c.client_id]), []).append(c)
        groups = [(adapter.truncate(ranks[cs[0].client_id]), cs) for cs in by_rank.values()]
    for ad, cs in groups:
        pm = peft_bridge.attach(model, ad, reuse=True) if ad is not None else None
        try:
            sums.update(_group_nll(pm if pm is not None else model, cs, cfg, prec))
        finally:
            if pm is not None:
                peft_bridge.detach(pm)
    tot_nll, tot_tok = 0.0, 0
    for c in clients:  # in the callers' order, as before
        s, n = sums[c.client_id]
        per_client[c.client_id], per_tok[c.client_id] = math.exp(s / n), n
        tot_nll, tot_tok = tot_nll + s, tot_tok + n
    return EvalResult(math.exp(tot_nll / tot_tok), per_client, tot_tok, per_tok)


def _group_nll(model: torch.nn.Module, clients: Sequence[ClientData], cfg: HetLoRAConfig,
               prec: Precision) -> dict[str, tuple[float, int]]:
    """(summed NLL, tokens) per client under one attached adapter. Text windows of every client go
    through the model together, ``rows`` at a time, and are split back per client: at tens of
    clients with a few windows each, one forward per client was most of an evaluation's time on a
    GPU (bound by kernel launches, not by rows). Instruction batches (padded per client) keep one
    call per client."""
    inputs = {c.client_id: eval_batch(c, cfg.data) for c in clients}
    windows = [x for x in inputs.values() if isinstance(x, torch.Tensor)]
    if len(windows) < len(inputs) or len({w.shape[1] for w in windows}) != 1:
        return {cid: nll(model, x, prec, cfg.training.chunked_loss) for cid, x in inputs.items()}
    per_row = row_nll(model, torch.cat(windows), prec, eval_rows(model, windows[0].shape[1], prec.device), cfg.training.chunked_loss)
    out, start = {}, 0
    for cid, w in zip(inputs, windows, strict=True):
        n = w.shape[0]
        out[cid] = (float(per_row[start:start + n].sum()), n * (w.shape[1] - 1))
        start += n
    return out


def evaluate_full(model: torch.nn.Module, delta: Mapping[str, np.ndarray], clients: Sequence[ClientData],
                  cfg: HetLoRAConfig) -> EvalResult:
    """Perplexity with a full-weight delta applied (full fine-tuning baseline), restored after."""
    params = dict(model.named_parameters())
    saved = {k: params[k].detach().clone() for k in delta}  # restore exactly, not by subtracting
    with torch.no_grad():
        for k, d in delta.items():
            params[k].add_(peft_bridge.as_tensor(d).to(params[k].device))
    try:
        return evaluate(model, None, clients, cfg)
    finally:
        with torch.no_grad():
            for k, v in saved.items():
                params[k].copy_(v)
