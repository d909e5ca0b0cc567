"""Instruction records (prompt/completion, chat) as token sequences with loss masks.

Rendering: with the tokenizer's chat template when it has one (SmolLM2's is ChatML:
``<|im_start|>role\\n...<|im_end|>\\n``; with no system turn it adds its default system prompt),
otherwise the documented plain join (README "Bring your own data"):

* prompt/completion: ``prompt + "\\n"``, then ``completion + EOS``;
* chat: each non-assistant turn as ``"<role>: <content>\\n"``; each assistant turn as
  ``"assistant: "`` followed by ``content + EOS``.

Labels are -100 everywhere except on the tokens of completion / assistant turns (with a template:
the assistant text and its end-of-turn marker, the part the template adds for that turn after the
generation prompt), so the loss counts only what the model should learn to answer.

Truncation to ``data.seq_len``: tokens are cut from the left (the prompt side) first, keeping at
least one token before the first answer token (a label at position 0 is never predicted). Only if
the answer turns alone are longer than ``seq_len`` is the tail cut. Both are counted
(``prompt_tokens_cut``, ``completion_tokens_cut``) and reported, never silent.
"""

from __future__ import annotations

from typing import Any

import torch

from .corpus import DataError
from .data import IGNORE, Samples
from .records import Record

PLAIN_PROMPT_SEP = "\n"


def has_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render(tokenizer: Any, turns: tuple[tuple[str, str], ...], gen: bool) -> str:
    msgs = [{"role": r, "content": c} for r, c in turns]
    out = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    return str(out)


def segments(tokenizer: Any, rec: Record) -> list[tuple[str, bool]]:
    """(text, is_answer) pieces whose concatenation is the rendered record."""
    eos = tokenizer.eos_token or ""
    if not has_template(tokenizer):
        if rec.kind == "prompt_completion":
            return [(rec.messages[0][1] + PLAIN_PROMPT_SEP, False), (rec.messages[1][1] + eos, True)]
        out: list[tuple[str, bool]] = []
        for role, content in rec.messages:
            out += [("assistant: ", False), (content + eos, True)] if role == "assistant" else [(f"{role}: {content}\n", False)]
        return out
    pieces: list[tuple[str, bool]] = []
    prev = ""
    for i, (role, _) in enumerate(rec.messages):
        if role == "assistant":
            gp = _render(tokenizer, rec.messages[:i], gen=True)
            if not gp.startswith(prev):
                raise DataError("the tokenizer's chat template does not render a conversation as a prefix of its extension; "
                                "cannot mask the prompt (use a tokenizer whose template is prefix-stable)")
            pieces.append((gp[len(prev):], False))
            prev = gp
        full = _render(tokenizer, rec.messages[: i + 1], gen=False)
        if not full.startswith(prev):
            raise DataError("the tokenizer's chat template is not prefix-stable; cannot mask the prompt")
        pieces.append((full[len(prev):], role == "assistant"))
        prev = full
    return [(t, a) for t, a in pieces if t]


def prompt_text(tokenizer: Any, rec: Record) -> str:
    """What generation is prompted with: every turn before the last answer, ready for the answer."""
    turns = rec.prompt_messages
    if has_template(tokenizer):
        return _render(tokenizer, turns, gen=True)
    if rec.kind == "prompt_completion":
        return turns[0][1] + PLAIN_PROMPT_SEP
    eos = tokenizer.eos_token or ""
    return "".join(c + eos if r == "assistant" else f"{r}: {c}\n" for r, c in turns) + "assistant: "


def encode(tokenizer: Any, rec: Record, seq_len: int) -> tuple[list[int], list[int], int, int]:
    """(input ids, labels, prompt tokens cut, answer tokens cut) for one record."""
    ids: list[int] = []
    labels: list[int] = []
    for text, answer in segments(tokenizer, rec):
        t = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += t
        labels += t if answer else [IGNORE] * len(t)
    over = len(ids) - seq_len
    cut_prompt = cut_answer = 0
    if over > 0:
        # No answer token at all (e.g. an empty completion): cut the prompt's head like any other
        # overflow; the sample then carries no loss token (build_samples refuses a client of only such).
        first = next((i for i, x in enumerate(labels) if x != IGNORE), len(labels))
        left = min(over, max(0, first - 1))  # keep one context token before the first answer token
        ids, labels = ids[left:], labels[left:]
        cut_prompt = left
        if len(ids) > seq_len:  # the answer turns alone do not fit: cut their tail, and count it
            tail = labels[seq_len:]
            cut_answer = sum(1 for x in tail if x != IGNORE)
            cut_prompt += len(tail) - cut_answer
            ids, labels = ids[:seq_len], labels[:seq_len]
    return ids, labels, cut_prompt, cut_answer


def build_samples(tokenizer: Any, records: list[Record], seq_len: int, where: str) -> tuple[Samples, dict[str, int]]:
    """Encoded records and the truncation counts (``samples_truncated``, ``prompt_tokens_cut``,
    ``completion_tokens_cut``). DataError if no record keeps an answer token to learn from."""
    ids, labels = [], []
    cut = {"samples_truncated": 0, "prompt_tokens_cut": 0, "completion_tokens_cut": 0}
    for rec in records:
        i, lab, cp, ca = encode(tokenizer, rec, seq_len)
        cut["samples_truncated"] += int(cp + ca > 0)
        cut["prompt_tokens_cut"] += cp
        cut["completion_tokens_cut"] += ca
        ids.append(torch.tensor(i, dtype=torch.long))
        labels.append(torch.tensor(lab, dtype=torch.long))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    samples = Samples(tuple(ids), tuple(labels), int(pad))
    if samples.target_tokens() == 0:
        raise DataError(f"{where}: no completion/assistant tokens left to learn from (data.seq_len={seq_len})")
    return samples, cut
