"""Federated evaluation's reports: what a client's evaluate task writes, and how the server checks
and combines them (model-free: no torch, no client data).

A client reports only sums per mode: ``{"nll": summed negative log-likelihood, "tokens": predicted
token count}`` for ``global`` (the global at r_max), ``personal`` (the global truncated to the
client's rank) and, while the run has no baseline, ``base`` (the base model); plus ``rouge``
``{"sum": summed ROUGE-L F, "prompts": count}`` when it has eval prompts. The round's perplexity is
exp(sum nll / sum tokens), the central token-weighted perplexity; ROUGE-L's mean is sum / prompts.

Security: a report is an upload from a client's task, so the server treats it as untrusted input.
Each is checked (a JSON object for the expected client and round, finite non-negative floats,
integer counts within ``MAX_COUNT``); a bad or missing one is left out of the round's metrics and
named with its reason in the eval record, never a crash and never a NaN in the metrics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

MODES = ("global", "personal", "base")
MAX_COUNT = 10**12  # tokens or prompts one client may claim: far above any eval split, far below float trouble
MAX_REASON_CHARS = 200  # a forged value quoted in a reason is cut: the eval record stays small
MAX_NLL_PER_TOKEN = 700.0  # exp(700) still fits a float: a larger claim is forged or broken, not a perplexity


def sums(nll: float, tokens: int) -> dict[str, Any]:
    """One mode's sums as a client reports them."""
    return {"nll": float(nll), "tokens": int(tokens)}


def _count(v: Any, what: str, minimum: int, maximum: int = MAX_COUNT) -> int:
    # bool is an int in Python: a forged `true` must not count as one token
    if not isinstance(v, int) or isinstance(v, bool) or not minimum <= v <= maximum:
        raise ValueError(f"{what} must be an integer in [{minimum}, {maximum}], got {v!r}")
    return v


def _real(v: Any, what: str, maximum: float) -> float:
    # The range check first: it is False for NaN, rejects inf, and compares a forged 400-digit
    # integer without converting it (math.isfinite(10**400) would raise OverflowError).
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.0 <= v <= maximum:
        raise ValueError(f"{what} must be a finite number in [0, {maximum:g}], got {str(v)[:40]}")
    return float(v)


def _mode(d: Any, what: str, max_tokens: int) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise ValueError(f"{what} must be an object, got {type(d).__name__}")
    n = _count(d.get("tokens"), f"{what}.tokens", 1, max_tokens)
    return sums(_real(d.get("nll"), f"{what}.nll", MAX_NLL_PER_TOKEN * n), n)


def validate(report: Any, client_id: str, rnd: int, max_tokens: int = MAX_COUNT, max_prompts: int = MAX_COUNT) -> dict[str, Any]:
    """The checked report of ``client_id`` for round ``rnd``; ``ValueError`` saying what is wrong.

    ``max_tokens`` / ``max_prompts``: the most one client's eval split can give under the run's
    config (the server knows them), so a forged count cannot outweigh the honest clients."""
    if not isinstance(report, dict):
        raise ValueError(f"not a JSON object ({type(report).__name__})")
    if report.get("client_id") != client_id or report.get("round") != rnd:
        raise ValueError(f"written for client {report.get('client_id')!r} round {report.get('round')!r}, "
                         f"expected {client_id!r} round {rnd}")
    out: dict[str, Any] = {m: _mode(report[m], m, max_tokens) for m in MODES if m in report}
    for m in ("global", "personal"):
        if m not in out:
            raise ValueError(f"no {m} sums")
    if "rouge" in report:
        r = report["rouge"]
        if not isinstance(r, dict):
            raise ValueError(f"rouge must be an object, got {type(r).__name__}")
        p = _count(r.get("prompts"), "rouge.prompts", 1, max_prompts)
        out["rouge"] = {"sum": _real(r.get("sum"), "rouge.sum", float(p)), "prompts": p}  # ROUGE-L F is in [0, 1]
    return out


def _ppl(nll: float, tokens: int) -> float:
    return math.exp(nll / tokens)


def combine_mode(reports: Mapping[str, dict[str, Any]], mode: str) -> dict[str, Any] | None:
    """The eval record's ``{"ppl", "per_client", "tokens"}`` of ``mode`` over the reports that have it."""
    have = {c: r[mode] for c, r in sorted(reports.items()) if mode in r}
    if not have:
        return None
    n = sum(s["tokens"] for s in have.values())
    return {"ppl": _ppl(sum(s["nll"] for s in have.values()), n), "tokens": n,
            "per_client": {c: _ppl(s["nll"], s["tokens"]) for c, s in have.items()}}


def combine_rouge(reports: Mapping[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The eval record's ``rouge_l``: prompt-weighted mean, per client mean, prompt count."""
    have = {c: r["rouge"] for c, r in sorted(reports.items()) if "rouge" in r}
    if not have:
        return None
    n = sum(r["prompts"] for r in have.values())
    return {"mean": sum(r["sum"] for r in have.values()) / n, "prompts": n,
            "per_client": {c: r["sum"] / r["prompts"] for c, r in have.items()}}


def check_all(raw: Mapping[str, Any], rnd: int, max_tokens: int = MAX_COUNT,
              max_prompts: int = MAX_COUNT) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """(valid reports by client, reason by left-out client); ``raw[c]`` is None for a missing report
    and an ``Exception`` for one that could not be read (not JSON, too large)."""
    good, dropped = {}, {}
    for c, rep in sorted(raw.items()):
        if rep is None:
            dropped[c] = "no report (its evaluate task failed or did not run)"
        elif isinstance(rep, Exception):
            dropped[c] = f"unreadable: {rep}"[:MAX_REASON_CHARS]
        else:
            try:
                good[c] = validate(rep, c, rnd, max_tokens, max_prompts)
            except (ValueError, TypeError, OverflowError) as e:  # whatever a forged report does: dropped, named
                dropped[c] = f"invalid: {e}"[:MAX_REASON_CHARS]
    return good, dropped
