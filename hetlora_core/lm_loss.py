"""The causal-LM training loss from the last hidden states, a chunk of tokens at a time.

Why: a causal LM's forward with ``labels`` forms every position's logits, upcasts them to float32,
takes ``log_softmax`` and, in backward, writes a gradient of the same size. With SmolLM2's 49,152-token
vocabulary that is 200 MB per tensor for one 8 x 128 batch: on a CPU that trains in bf16 the memory
traffic around the output layer cost more than the output layer's matmuls (benchmarks/bench_flops.py
compares both paths in one run). Here the output layer and the loss run per chunk of tokens: each
chunk's logits are formed in the compute dtype, reduced to its loss and to its gradient with respect
to the hidden states (closed form: softmax minus one-hot), and dropped. Backward only scales the
stored gradient. The arithmetic is the model's own loss (transformers' ``ForCausalLMLoss``): labels
shifted by one, ``-100`` ignored, the mean over counted tokens, logits in the compute dtype upcast to
float32 before the softmax; only the order of the sums differs, so the loss agrees to rounding.

Some architectures change the logits in their forward (soft-capping, a logit scale, a bias). So the
chunked path is used for a model only when its config names none of those, its output layer is a
plain bias-free ``nn.Linear`` without hooks, and it gave the model's own loss on a short batch
(``_agrees``, once per model object and process); otherwise, for anything it cannot read (no decoder
under ``base_model_prefix``) and in float16 (see ``causal_lm_loss``), the model's own forward computes
the loss.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import torch
from torch import Tensor

from . import frozen_cast
from .data import IGNORE, Batch
from .peft_bridge import unwrapped

log = logging.getLogger(__name__)

# Tokens per chunk: the chunk's float32 logits (CHUNK x vocab x 4 bytes, 25 MB for a 49k vocabulary)
# are produced and consumed while they are still in (or near) a server CPU's last-level cache.
CHUNK_TOKENS = 128
_LOGIT_CHANGES = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_router_logits")
_AGREE_RTOL = 1e-3  # soft-capping or a logit scale moves a loss by far more; rounding by far less
_checked: weakref.WeakKeyDictionary[torch.nn.Module, bool] = weakref.WeakKeyDictionary()


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """mean over counted tokens of cross_entropy(hidden @ weight.T, targets); gradients computed in
    forward, chunk by chunk (a full logits tensor never exists)."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, targets: Tensor, compute_dtype: torch.dtype) -> Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # Only counted positions are computed: an ignored row (a prompt, padding) costs no vocabulary
        # matmul, and its logits, even if not finite, cannot reach the loss or a gradient.
        rows = (targets != IGNORE).nonzero().squeeze(1)
        n = torch.tensor(float(len(rows)), device=hidden.device)  # 0 counted tokens: nan, as the model's own mean is
        w = frozen_cast.cast(weight, compute_dtype)  # frozen on CPU in a training call: cast once per call
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, len(rows), CHUNK_TOKENS):
            r = rows[s:s + CHUNK_TOKENS]
            h, t = hidden[r].to(compute_dtype), targets[r]
            # log_softmax, not logsumexp: the model's own loss takes it (they differ in the last bits);
            # dtype=float32 upcasts while it reads (= .float() then log_softmax, one pass less).
            lp = torch.log_softmax(h @ w.T, -1, dtype=torch.float32)
            total -= lp.gather(1, t[:, None]).sum()
            if grad_h is None and grad_w is None:
                continue
            # d loss / d logits = (softmax - one-hot) / n, in the order log_softmax's backward computes
            # it (exp(lp) / n, then - 1 / n at the target), cast as autocast casts it.
            g = lp.exp_().mul_(1.0 / n)
            g[torch.arange(len(t), device=g.device), t] -= 1.0 / n
            g = g.to(compute_dtype)
            if grad_h is not None:
                grad_h[r] = (g @ w).to(hidden.dtype)
            if grad_w is not None:
                grad_w += (g.T @ h).float()
        ctx.save_for_backward(*(x for x in (grad_h, grad_w) if x is not None))
        ctx.has = (grad_h is not None, grad_w is not None)
        return total / n

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        saved = list(ctx.saved_tensors)
        gh = saved.pop(0) * grad_out if ctx.has[0] else None
        gw = saved.pop(0) * grad_out if ctx.has[1] else None
        return gh, gw, None, None


def chunked_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, compute_dtype: torch.dtype) -> Tensor:
    """The causal-LM loss of ``hidden`` (batch, length, d) under the output matrix ``weight``
    (vocab, d) against ``labels`` (batch, length): position i predicts label i + 1."""
    targets = torch.nn.functional.pad(labels, (0, 1), value=IGNORE)[:, 1:]
    d = hidden.shape[-1]
    out: Tensor = _ChunkedLinearCrossEntropy.apply(hidden.reshape(-1, d), weight, targets.reshape(-1), compute_dtype)
    return out


def _parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear] | None:
    """(decoder, output layer) of a transformers causal LM, peft-wrapped or not; None if not readable."""
    base = unwrapped(model)
    prefix = getattr(base, "base_model_prefix", "")
    decoder = getattr(base, prefix, None) if prefix else None
    get_head = getattr(base, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(decoder, torch.nn.Module) or type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    # What the short check below could miss: hooks on the output layer, logit transforms that barely
    # move a small model's loss today (soft-capping, a logit scale) and an MoE router's auxiliary loss.
    if head._forward_hooks or head._forward_pre_hooks:
        return None
    config = getattr(base, "config", None)
    if any(getattr(config, k, None) not in (None, False, 1.0) for k in _LOGIT_CHANGES):
        return None
    return decoder, head


def _chunked(parts: tuple[torch.nn.Module, torch.nn.Linear], batch: Batch, compute_dtype: torch.dtype) -> Tensor:
    decoder, head = parts
    kwargs = {} if batch.attention_mask is None else {"attention_mask": batch.attention_mask}
    hidden = decoder(input_ids=batch.input_ids, **kwargs)[0]
    return chunked_cross_entropy(hidden, head.weight, batch.labels, compute_dtype)


def _agrees(model: torch.nn.Module, parts: tuple[torch.nn.Module, torch.nn.Linear], batch: Batch, compute_dtype: torch.dtype) -> bool:
    """Whether the chunked loss equals the model's own on a short piece of ``batch`` (no gradients)."""
    # The text's own tokens as labels: a prompt's masked labels could leave nothing to compare.
    # Eval mode: dropout (LoRA's included) would make the two forwards differ.
    ids = batch.input_ids[:1, :16]
    short = Batch(ids, ids, None if batch.attention_mask is None else batch.attention_mask[:1, :16])
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            own = float(model(**short.model_inputs()).loss)
            mine = float(_chunked(parts, short, compute_dtype))
    finally:
        model.train(was_training)
    ok = abs(own - mine) <= _AGREE_RTOL * max(1.0, abs(own))
    if not ok:
        log.info("chunked loss %.6f differs from the model's own %.6f: this model's loss runs through its forward", mine, own)
    return ok


def checked_parts(model: torch.nn.Module, batch: Batch, compute_dtype: torch.dtype) -> tuple[torch.nn.Module, torch.nn.Linear] | None:
    """(decoder, output layer) when the output layer may run chunk by chunk on the decoder's hidden
    states for ``model``: readable (``_parts``) and checked against the model's own loss on a short
    piece of ``batch`` (``_agrees``, once per model object and process); None: use its own forward.
    Call it in the autocast the computation runs in."""
    parts = _parts(model)
    if parts is None:
        return None
    key = unwrapped(model)
    if key not in _checked:
        _checked[key] = _agrees(model, parts, batch, compute_dtype)
    return parts if _checked[key] else None


@torch.no_grad()
def target_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, compute_dtype: torch.dtype,
                    chunk_tokens: int = CHUNK_TOKENS) -> Tensor:
    """log p(targets[i]) for each row i of ``hidden`` (n, d) under the output matrix ``weight``
    (vocab, d), float32, 0 where the target is IGNORE; ``chunk_tokens`` rows at a time, so a whole
    batch's logits never exist (evaluation.py: at SmolLM2's vocabulary they were ~300 MB per pass,
    fresh memory that every pass faulted in again). The arithmetic of a forward's logits followed
    by ``log_softmax(dtype=float32)``: logits in the compute dtype, upcast while the softmax reads them."""
    out = torch.zeros(targets.shape[0], dtype=torch.float32, device=hidden.device)
    rows = (targets != IGNORE).nonzero().squeeze(1)
    w = weight.to(compute_dtype)  # once per call (a no-op in float32)
    for s in range(0, len(rows), chunk_tokens):
        r = rows[s:s + chunk_tokens]
        lp = torch.log_softmax(hidden[r].to(compute_dtype) @ w.T, -1, dtype=torch.float32)
        out[r] = lp.gather(1, targets[r][:, None])[:, 0]
    return out


def causal_lm_loss(model: torch.nn.Module, batch: Batch, compute_dtype: torch.dtype, chunked: bool = True) -> Tensor:
    """The training loss of ``batch`` (call it inside the step's autocast, as the model's own forward).

    ``chunked=False`` (``training.chunked_loss: false``): always the model's own forward. float16
    too: its gradient scaler multiplies the loss's gradient before the cast to float16, while here
    the gradient is cast in forward, before any scale is known (small entries would flush to zero)."""
    parts = checked_parts(model, batch, compute_dtype) if chunked and compute_dtype != torch.float16 else None
    if parts is not None:
        return _chunked(parts, batch, compute_dtype)
    loss: Tensor = model(**batch.model_inputs()).loss
    return loss

