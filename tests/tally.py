"""The reliability figures, counted by the suite itself (docs/reliability.md "Figures from the suite").

One pytest run = one ``bench-out/faults-summary.json``, written at the end of a session in which any
test counted something: the figures of exactly the tests that ran, never edited by hand.

* ``fault(kind)``: a fault injected by tests/test_faults.py (a kill, an outage, a bad upload...).
* ``add(key)``: resumes, rounds redone, runs ending on the reference bytes, rounds lost (a committed
  round that a fault made disappear or change) and honest uploads lost (an honest client missing
  from a round's participants after an attack): the last two must stay 0.
* attacks: every test marked ``@pytest.mark.attack`` (a trust-boundary attack with its outcome
  asserted) is counted by the conftest hook as tried, and as held when the test passed.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

SUMMARY = Path(__file__).resolve().parents[1] / "bench-out" / "faults-summary.json"


class Tally:
    def __init__(self) -> None:
        self.data: dict[str, Any] = {"faults_injected": 0, "by_kind": {}, "rounds_lost": 0, "resumes": 0,
                                     "runs_ending_on_reference_bytes": 0, "rounds_redone": 0, "honest_uploads_lost": 0,
                                     "attacks_tried": 0, "attacks_held": 0, "attacks_by_file": {}}
        self.touched = False
        self.started = time.monotonic()

    def fault(self, kind: str, n: int = 1) -> None:
        self.touched = True
        self.data["faults_injected"] += n
        self.data["by_kind"][kind] = self.data["by_kind"].get(kind, 0) + n

    def add(self, key: str, n: int = 1) -> None:
        self.touched = True
        self.data[key] += n

    def attack(self, module: str, held: bool) -> None:
        self.touched = True
        self.data["attacks_tried"] += 1
        self.data["attacks_held"] += int(held)
        self.data["attacks_by_file"][module] = self.data["attacks_by_file"].get(module, 0) + 1

    def write(self) -> None:
        if not self.touched:
            return
        self.data["seconds"] = round(time.monotonic() - self.started, 1)
        self.data["command"] = " ".join(["pytest", *sys.argv[1:]]) if "pytest" in sys.argv[0] else " ".join(sys.argv)
        self.data["written_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        SUMMARY.parent.mkdir(parents=True, exist_ok=True)
        SUMMARY.write_text(json.dumps(self.data, indent=1, sort_keys=True) + "\n")


TALLY = Tally()  # one per pytest session (the conftest fixture ``tally`` hands it out)
