"""Failpoints for the fault-injection suite (tests/test_faults.py), off unless configured.

``HETLORA_FAILPOINTS`` holds ``;``-separated specs ``NAME[@round=R][@client=C][@key=K]:ACTION``
with ACTION one of ``exit`` (``os._exit(137)``: what a SIGKILL, an OOM kill or a preempted pod
looks like to the rest of the system), ``raise`` (a client-side crash) or ``sleep=SECONDS``.
Points: train_start, train_step (start of each local step; ctx step=N), train_uploaded, prune_done,
aggregate_start, put_artifact_between (payload written, manifest not yet), round_committed. Checking costs one dict lookup when unset."""

from __future__ import annotations

import os
import time


class InjectedFault(RuntimeError):
    """Raised by a ``raise`` failpoint."""


def _matches(conds: list[str], ctx: dict[str, object]) -> bool:
    for c in conds:
        k, _, v = c.partition("=")
        if str(ctx.get(k, "")) != v and not (k == "key" and v in str(ctx.get(k, ""))):
            return False
    return True


def failpoint(name: str, **ctx: object) -> None:
    """Trigger the configured action if a spec names this point and its conditions match."""
    specs = os.environ.get("HETLORA_FAILPOINTS")
    if not specs:
        return
    for spec in specs.split(";"):
        target, _, action = spec.strip().rpartition(":")
        point, *conds = target.split("@")
        if point != name or not _matches(conds, ctx):
            continue
        if action == "exit":
            os._exit(137)
        if action == "raise":
            raise InjectedFault(f"injected fault at {name} {ctx}")
        if action.startswith("sleep="):
            time.sleep(float(action.split("=", 1)[1]))
