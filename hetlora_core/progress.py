"""One quiet progress display for a whole run, whatever runs the rounds.

On a terminal it is a single status line rewritten in place (round, tasks done/failed per kind and
tier, the current step, elapsed and estimated time left); permanent lines (a round committed, a
resume) are printed above it. Where stderr is not a terminal (CI logs, a file) only the permanent
lines are written, so logs hold no carriage-return noise.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import TextIO


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


@dataclass
class _Round:
    index: int
    expected: dict[str, int]  # "train small" -> selected clients of that tier, "aggregate" -> 1 ...
    done: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    step: str = "starting"
    started: float = field(default_factory=time.monotonic)


class Progress:
    """``line(msg)`` for permanent lines; ``round_started`` / ``task`` feed the status line."""

    def __init__(self, total_rounds: int, stream: TextIO | None = None, live: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.total, self.t0 = total_rounds, time.monotonic()
        self.round_seconds: list[float] = []
        self.cur: _Round | None = None
        self._shown = 0  # length of the status line on screen

    def _clear(self) -> None:
        if self._shown:
            self.stream.write("\r" + " " * self._shown + "\r")
            self._shown = 0

    def line(self, msg: str) -> None:
        self._clear()
        self.stream.write(f"[hetlora] {msg}\n")
        self.stream.flush()
        self._render()

    def round_started(self, rnd: int, tiers: dict[str, int]) -> None:
        expected = {f"train {t}": n for t, n in tiers.items()}
        expected.update({f"prune {t}": n for t, n in tiers.items()})
        self.cur = _Round(rnd, {**expected, "aggregate": 1, "evaluate": 1})
        self._render()

    def round_finished(self) -> None:
        if self.cur is not None:
            self.round_seconds.append(time.monotonic() - self.cur.started)
        self.cur = None
        self._clear()

    def task(self, kind: str, status: str) -> None:
        """``kind`` is e.g. "train small" or "aggregate"; ``status`` "started", "SUCCESS", "FAILURE"."""
        r = self.cur
        if r is None:
            return
        if status == "started":
            r.step = kind
        elif status == "SUCCESS":
            r.done[kind] = r.done.get(kind, 0) + 1
        else:
            r.failed[kind] = r.failed.get(kind, 0) + 1
        self._render()

    def status_text(self) -> str:
        r = self.cur
        if r is None:
            return ""
        parts = []
        for kind in [*r.expected, *(k for k in {**r.done, **r.failed} if k not in r.expected)]:
            n, d, f = r.expected.get(kind), r.done.get(kind, 0), r.failed.get(kind, 0)
            if kind.startswith(("train", "prune")) or (n or 0) > 1:
                parts.append(f"{kind} {d}" + (f"/{n}" if n else "") + (f" ({f} failed)" if f else ""))
        elapsed = time.monotonic() - self.t0
        left = ""
        if self.round_seconds:
            per = sum(self.round_seconds) / len(self.round_seconds)
            remaining = per * (self.total - r.index) - (time.monotonic() - r.started)
            left = f", ~{_clock(max(0.0, remaining))} left"
        return f"round {r.index + 1}/{self.total} | " + " | ".join(parts) + f" | now: {r.step} | {_clock(elapsed)} elapsed{left}"

    def _render(self) -> None:
        if not self.live or self.cur is None:
            return
        text = self.status_text()
        self._clear()
        self.stream.write(text)
        self.stream.flush()
        self._shown = len(text)
