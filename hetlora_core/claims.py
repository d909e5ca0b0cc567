"""The paper's five claims, each judged from the bench's per-seed numbers (report.py prints them).

A claim *holds* when the paired per-seed difference points the paper's way by more than two
standard errors, is *reversed* when it points the other way by as much, and is *not shown* when it
stays within that noise band (or there is one seed only). Nothing here knows which method should
win: every verdict is computed from the summaries ``report.summarize`` builds.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from .report import _fmt, _ms, judge, paired, rounds_to

# Threshold for "within reach of full fine-tuning": HetLoRA's share of full fine-tuning's gain.
REACH = 0.9


def _judge(mean: float, se: float | None, n: int) -> str:
    """report.judge's 2-standard-error rule, worded as a verdict on the paper's claim (lower is better)."""
    j = judge(mean, se, n)
    return {"better": "holds", "worse": "reversed"}.get(
        j, "not shown (one seed: no spread)" if j.startswith("not conclusive") else "not shown (within 2 s.e.)")


def _pm(xs: Sequence[float], nd: int = 2) -> str:
    return _fmt(*_ms(list(xs)), nd=nd)


def _vs(S: dict[str, dict[str, Any]], other: str, what: str) -> dict[str, str] | None:
    if "hetlora" not in S or other not in S:
        return None
    mean, se, n = paired(S, "hetlora", other)
    seeds = sorted(set(S["hetlora"]["final"]) & set(S[other]["final"]))
    if not seeds:
        return _no_common(f"HetLoRA beats {what}")
    diff = f"{100 * mean:+.2f}%" + (f" ± {100 * se:.2f}% s.e." if se is not None else "")
    return {"claim": f"HetLoRA beats {what}", "evidence": f"final ppl {_pm([S['hetlora']['final'][s] for s in seeds])} vs "
            f"{_pm([S[other]['final'][s] for s in seeds])}; paired difference {diff} ({n} seeds)", "verdict": _judge(mean, se, n)}


def _speed(S: dict[str, dict[str, Any]]) -> dict[str, str] | None:
    """Rounds until each seed's HetLoRA curve reaches that seed's HomLoRA r_min final perplexity,
    against HomLoRA r_min's own rounds to it (never reached: counted as one round past the end)."""
    if "hetlora" not in S or "homlora_rmin" not in S:
        return None
    h, lo = S["hetlora"], S["homlora_rmin"]
    seeds = sorted(set(h["final"]) & set(lo["final"]))
    if not seeds:
        return _no_common("HetLoRA converges faster than HomLoRA r_min")
    hc = dict(zip(h["seeds"], h["curves"], strict=True))
    lc = dict(zip(lo["seeds"], lo["curves"], strict=True))
    d, rh_all, rl_all = [], [], []
    for s in seeds:
        target = lc[s][-1]
        rh, rl = rounds_to(hc[s], target), rounds_to(lc[s], target)
        rh_all.append(rh if rh is not None else len(hc[s]))
        rl_all.append(rl if rl is not None else len(lc[s]))
        d.append(rh_all[-1] - rl_all[-1])
    n = len(d)
    mean = statistics.fmean(d)
    se = statistics.stdev(d) / math.sqrt(n) if n > 1 else None
    if se == 0.0:  # every seed the same difference: no spread, but no noise either
        verdict = "holds" if mean < 0 else "reversed" if mean > 0 else "not shown (same round)"
    else:
        verdict = _judge(mean, se, n)
    return {"claim": "HetLoRA converges faster than HomLoRA r_min",
            "evidence": f"rounds to HomLoRA r_min's final ppl: HetLoRA {_pm(rh_all, 1)} vs {_pm(rl_all, 1)}; "
            f"paired difference {mean:+.1f} rounds ({n} seeds)", "verdict": verdict}


def _reach(S: dict[str, dict[str, Any]]) -> dict[str, str] | None:
    """HetLoRA's improvement over the base model as a share of full fine-tuning's, per seed."""
    if "hetlora" not in S or "full_ft" not in S:
        return None
    h, f = S["hetlora"], S["full_ft"]
    seeds = sorted(set(h["final"]) & set(f["final"]))
    claim = f"HetLoRA within reach of full fine-tuning (>= {REACH:.0%} of its gain)"
    if not seeds:
        return _no_common(claim)
    base = statistics.fmean([h["base_ppl"], f["base_ppl"]])
    shares = [(base - h["final"][s]) / (base - f["final"][s]) for s in seeds if base - f["final"][s] > 0]
    if len(shares) < len(seeds):  # a seed where full fine-tuning did not improve has no share: said, not hidden
        claim += f"; {len(seeds) - len(shares)} of {len(seeds)} seeds left out: full fine-tuning did not improve there"
    if not shares:
        return {"claim": claim, "evidence": "full fine-tuning did not improve on the base model in any common seed",
                "verdict": "not shown"}
    mean = statistics.fmean(shares)
    se = statistics.stdev(shares) / math.sqrt(len(shares)) if len(shares) > 1 else None
    if se is None:
        verdict = "not shown (one seed: no spread)"
    else:
        verdict = "holds" if mean - 2 * se >= REACH else ("reversed" if mean + 2 * se < REACH else "not shown (within 2 s.e.)")
    return {"claim": claim,
            "evidence": f"share of full fine-tuning's gain over the base model: {_pm([100 * x for x in shares], 1)}% "
            f"({len(shares)} seeds)", "verdict": verdict}


def _no_common(claim: str) -> dict[str, str]:
    return {"claim": claim, "evidence": "the two methods finished no seed in common", "verdict": "not shown (no seed in common)"}


def claims(S: dict[str, dict[str, Any]]) -> list[dict[str, str]]:
    """One row per claim whose methods ran: claim, evidence (mean ± std, paired difference), verdict."""
    rows = [_vs(S, "homlora_rmin", "HomLoRA r_min"), _vs(S, "homlora_rmax", "HomLoRA r_max"),
            _vs(S, "recon_svd", "Recon+SVD (FlexLoRA)"), _speed(S), _reach(S)]
    return [r for r in rows if r is not None]


def claims_table(S: dict[str, dict[str, Any]]) -> list[str]:
    """The claims as markdown table lines."""
    rows = claims(S)
    if not rows:
        return ["(none of the claims' methods ran)"]
    return ["| paper's claim | evidence (lower perplexity is better) | here |", "|---|---|---|"] + [
        f"| {r['claim']} | {r['evidence']} | **{r['verdict']}** |" for r in rows]
