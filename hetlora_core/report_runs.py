"""What the run records say about *how* the runs ran, for the report: the machines they ran on,
the runs resumed after a stopped device call, and a note given on the command line.

Kept apart from report.py (what the runs found) because a report is often assembled from records of
several invocations -- device calls on different cards, a continuation after a time limit -- and
one machine line would then misstate some of them."""

from __future__ import annotations

from collections import Counter
from typing import Any


def run_machine(mach: dict[str, Any]) -> dict[str, Any]:
    """The part of ``bench_paper.machine()`` that identifies where one run ran (kept in its record)."""
    return {"gpu": mach.get("gpu"), "cpu": mach.get("cpu"), "torch": mach.get("torch")}


def _where(m: dict[str, Any]) -> str:
    return f"{m['gpu']} (CPU {m.get('cpu')})" if m.get("gpu") else f"CPU {m.get('cpu')}"


def machine_lines(records: list[dict[str, Any]], labels: dict[str, str]) -> list[str]:
    """One line listing the machines of the runs, when the records name them (runs recorded since
    bench.json carries ``machine``): the invocation's machine line above describes only the
    invocation that wrote the bench's meta file."""
    if not any(r.get("machine") for r in records):
        return []
    by: dict[str, Counter[str]] = {}
    for r in records:
        where = _where(r["machine"]) if r.get("machine") else "not recorded (records from before runs named their machine)"
        by.setdefault(where, Counter())[labels.get(r["method"], r["method"])] += 1
    parts = [f"{w}: {sum(c.values())} run(s) ({', '.join(f'{k} {n}' for k, n in sorted(c.items()))})" for w, c in by.items()]
    return ["- Machines, per run record: " + "; ".join(parts) + "."]


def note_lines(note: str | None) -> list[str]:
    """A note given with ``bench paper --note`` (what the records cannot tell, e.g. calls on other cards)."""
    text = " ".join((note or "").split())  # one markdown bullet: a newline or blank line in it would end the list
    return [f"- Note (given with `--note` when this report was written): {text}"] if text else []


def wall_cell(resumed: list[int], wall: float) -> str:
    """The table's wall time per run, starred when a run was resumed (its wall time then covers only
    the rounds after the resume: an interrupted attempt's time is not in its record)."""
    return f"{wall:.0f}*" if any(resumed) else f"{wall:.0f}"


def resumed_lines(summary: dict[str, dict[str, Any]], rounds: int) -> list[str]:
    """The footnote for starred wall times: which runs resumed, after which round."""
    hit = {s["label"]: (s["resumed"], s["seeds"]) for s in summary.values() if any(s["resumed"])}
    if not hit:
        return []
    parts = []
    for lab, (resumed, seeds) in hit.items():
        at = [(seed, r) for seed, r in zip(seeds, resumed, strict=True) if r]
        parts.append(f"{lab} ({len(at)} of {len(resumed)} run(s): " + ", ".join(f"seed {seed} after {r}" for seed, r in at)
                     + f" of {rounds} rounds)")
    return ["\\* Resumed after a stopped call: " + "; ".join(parts) + ". Their wall time covers only the rounds run after "
            "the resume, so it is not the cost of a whole run (a starred cell is the mean over the method's runs, whole or not).", ""]
