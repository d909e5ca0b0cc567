"""The model-free steps (plan, self-prune, aggregate) load no torch, transformers or peft: their
components start in a fraction of the time and their images need none of those packages."""

from __future__ import annotations

import subprocess
import sys


def test_adapter_pruning_strategies_import_no_torch() -> None:
    code = ("import hetlora_core.adapter, hetlora_core.pruning, hetlora_core.strategies, sys; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip() == "[]", f"model-free modules loaded: {p.stdout.strip()}"
