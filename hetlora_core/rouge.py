"""ROUGE-L of greedy answers on instruction data (the paper's Reddit metric), beside perplexity.

For each client with prompt/completion or chat data, the first ``data.rouge_max_prompts`` eval
records are answered greedily (at most ``data.rouge_max_new_tokens`` new tokens, stopping at EOS)
by the global adapter at r_max, and each answer is scored against the record's last assistant
turn with Google's ``rouge-score`` package (ROUGE-L F-measure, no stemming). Clients report sums
(score sum, prompt count) and the round's value is their prompt-weighted mean, like perplexity.

Cost per round: clients x rouge_max_prompts x rouge_max_new_tokens decoding steps (8 x 32 per
client by default), each one forward pass of one token with the KV cache.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from .data import ClientData


@functools.lru_cache(maxsize=1)
def _scorer() -> Any:
    from rouge_score import rouge_scorer  # lazy: only instruction-data evaluations pay the import

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure of one pair (``rouge_score``'s default tokenizer: lowercase alphanumerics)."""
    return float(_scorer().score(reference, prediction)["rougeL"].fmeasure)


@torch.no_grad()
def greedy_answers(model: Any, tokenizer: Any, client: ClientData, max_new_tokens: int) -> list[str]:
    """Greedy completions of the client's eval prompts (one at a time: no padding to get wrong)."""
    out = []
    eos = tokenizer.eos_token_id
    device = next(model.parameters()).device  # the model sits on the decided device (precision.py)
    for ids, _ref in client.eval_prompts:
        x = ids[None, :].to(device)
        # use_cache=True explicitly: the frozen base has config.use_cache off (training never reuses keys
        # and values); decoding should not depend on which default generate() falls back to.
        gen = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
                             use_cache=True, eos_token_id=eos,
                             pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos)
        out.append(tokenizer.decode(gen[0, x.shape[1]:], skip_special_tokens=True))
    return out


def client_rouge(model: Any, tokenizer: Any, client: ClientData, max_new_tokens: int) -> tuple[float, int]:
    """(sum of ROUGE-L F over the client's eval prompts, number of prompts)."""
    answers = greedy_answers(model, tokenizer, client, max_new_tokens)
    return sum(rouge_l(a, ref) for a, (_, ref) in zip(answers, client.eval_prompts, strict=True)), len(answers)
