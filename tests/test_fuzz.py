"""A short run of scripts/fuzz_loaders.py (adapter and manifest loaders), and proof that the
harness can fail: a planted bug is found, a planted hang is caught.

``HETLORA_FUZZ_SECONDS`` (default 10) and ``HETLORA_FUZZ_SEED`` (default 0: reproducible in CI;
set another to explore) tune the short run; long runs: ``python scripts/fuzz_loaders.py --seconds 600``."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "fuzz_loaders.py"


def fuzz_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fuzz_loaders", SCRIPT)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.timeout(180)
def test_short_fuzz_run_finds_nothing() -> None:
    seconds = os.environ.get("HETLORA_FUZZ_SECONDS", "10")
    seed = os.environ.get("HETLORA_FUZZ_SEED", "0")
    p = subprocess.run([sys.executable, str(SCRIPT), "--seconds", seconds, "--seed", seed, "--batch", "50"],
                       cwd=ROOT, capture_output=True, text=True, timeout=170)
    assert p.returncode == 0, f"fuzzer finding (seed {seed}):\n{p.stderr[-8000:]}"
    summary = json.loads(p.stdout)
    # At least one whole batch per target: the run is time-bounded, so a loaded machine runs fewer.
    assert summary["examples: adapter"] >= 50 and summary["examples: manifest"] >= 50, summary
    # The mutations reach both outcomes: rejected and (still) valid inputs.
    assert summary["adapter: AdapterError"] > 0 and summary["adapter: valid"] > 0, summary
    assert summary["manifest: InvalidManifest"] > 0 and summary["manifest: valid"] > 0, summary


def test_the_fuzzer_reports_an_unexpected_exception(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    fz = fuzz_module()
    real = fz.LoraAdapter.from_bytes

    def planted(data: bytes, *a: object, **kw: object) -> object:
        if len(data) % 5 == 2:
            raise TypeError("planted bug")
        return real(data, *a, **kw)

    monkeypatch.setattr(fz.LoraAdapter, "from_bytes", planted)
    assert fz.run(30, "adapter", 0, 10.0, 50) == 1
    err = capsys.readouterr().err
    assert "planted bug" in err and ("Falsifying example" in err or "fuzz_adapter(" in err), err[-3000:]


@pytest.mark.timeout(120)
def test_the_fuzzer_catches_a_hang() -> None:
    code = (f"import runpy, time, sys; sys.argv = ['fuzz']; m = runpy.run_path({str(SCRIPT)!r}); "
            "m['LoraAdapter'].from_bytes = classmethod(lambda cls, *a, **k: time.sleep(60)); "
            "m['run'](20, 'adapter', 0, 1.0, 10)")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert p.returncode == 1 and "Timeout (0:00:01)!" in p.stderr and "check_adapter" in p.stderr, p.stderr[-3000:]
