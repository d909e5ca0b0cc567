"""The warm server's warm-up (hetlora_core/warm_up.py): it leaves the base model exactly as it was,
its caches filled for the run's LoRA shapes, no thread started; a failed warm-up drops the preloaded
model instead of sharing it; ``local.warm_up: false`` and full fine-tuning skip it. That a warmed
server's child trains the same bytes as a task of its own is tests/test_warm.py's
test_delegated_train_uploads_the_same_bytes (its server warms up)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_round import tiny_round

from hetlora_core import lm_loss, peft_bridge, runtime
from hetlora_core.config import config_from_dict
from hetlora_core.warm_up import WARM_LEN, WARM_MAX_SHAPES, release_free_heap, warm_ranks, warm_up

ROOT = Path(__file__).resolve().parents[1]
CFG = tiny_round("warm-up")


def test_warm_up_leaves_the_model_as_it_was_with_its_shapes_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    # Empty caches: earlier tests of this process may have filled them for the same model.
    monkeypatch.setattr(peft_bridge, "_KEPT", OrderedDict())
    monkeypatch.setattr(lm_loss, "_checked", weakref.WeakKeyDictionary())
    monkeypatch.setenv("HETLORA_FAILPOINTS", "train_step:raise")  # off during the warm-up: it would fail
    cfg = config_from_dict(CFG)
    model = runtime.model(cfg)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [n for n, _ in model.named_modules()]
    threads = torch.get_num_threads()
    note = warm_up(cfg, model)
    assert note.startswith("warmed up in") and "(ranks 2, 4)" in note, note
    assert os.environ["HETLORA_FAILPOINTS"] == "train_step:raise"  # given back
    assert torch.get_num_threads() == threads
    # No LoRA layer left in the model, no weight changed, nothing left trainable, eval mode.
    assert [n for n, _ in model.named_modules()] == modules
    after = model.state_dict()
    assert after.keys() == weights.keys() and all(torch.equal(after[k], w) for k, w in weights.items())
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    # What the children inherit: a LoRA layer set per warmed rank, the chunked loss's one-time check.
    kept = {k[4] for k, e in peft_bridge._KEPT.items() if k[0] == id(model) and not e.attached}
    assert set(warm_ranks(cfg)) <= kept, kept
    assert lm_loss._checked.get(model) is True


def test_warm_ranks_are_the_listed_ranks_and_r_max_and_bounded() -> None:
    assert warm_ranks(config_from_dict(CFG)) == [2, 4]
    uniform = config_from_dict({**CFG, "ranks": {"r_min": 2, "r_max": 8, "assignment": "uniform"}})
    assert warm_ranks(uniform) == [8]
    explicit = config_from_dict({**CFG, "data": {**CFG["data"], "num_clients": 22},
                                 "ranks": {"r_min": 1, "r_max": 20, "assignment": "explicit", "explicit": list(range(1, 21)) + [3, 3]}})
    assert warm_ranks(explicit) == [*range(1, WARM_MAX_SHAPES), 20]


def test_heap_release_finds_glibc() -> None:
    assert release_free_heap() == (sys.platform == "linux" and platform.libc_ver()[0] == "glibc")


def test_full_fine_tuning_is_not_warmed_up() -> None:
    cfg = config_from_dict({**CFG, "strategy": {"name": "full_ft"}})
    assert warm_up(cfg, runtime.model(cfg)).startswith("no warm-up")


PRELOAD = textwrap.dedent('''
    import json, sys
    from hetlora_core import peft_bridge, runtime, warm_server
    mode, path = sys.argv[1], sys.argv[2]
    if mode == "fails":
        real = warm_server.warm_up
        def broken(cfg, model):
            real(cfg, model)  # LoRA layers kept, then a failure
            raise RuntimeError("warm-up broke")
        warm_server.warm_up = broken
    if mode == "gpu":
        warm_server.GPU_DEVICE_NODES = ("null",)  # /dev/null stands in for a GPU's device node
    warm_server.preload()
    before = warm_server.os_threads()
    note = warm_server.preload_model(path)
    print(json.dumps({"note": note, "threads_before": before, "threads_after": warm_server.os_threads(),
                      "cached": runtime._model.cache_info().currsize, "kept": len(peft_bridge._KEPT)}))
''')


def _preload(tmp_path: Path, mode: str, cfg: dict) -> dict:
    path = tmp_path / "cfg.json"
    path.write_text(config_from_dict(cfg).to_json())
    out = subprocess.run([sys.executable, "-c", PRELOAD, mode, str(path)], capture_output=True, text=True, cwd=ROOT,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def test_server_warm_up_starts_no_thread(tmp_path: Path) -> None:
    """A fork copies only the forking thread: a thread the warm-up left (an OpenMP pool, a tokenizer
    pool) could hold a lock that no child could ever take."""
    got = _preload(tmp_path, "ok", CFG)
    assert "warmed up in" in got["note"] and got["cached"] == 1, got
    assert got["threads_after"] == got["threads_before"], got


def test_server_warm_up_compiles_nothing(tmp_path: Path) -> None:
    """training.compile: the warm-up still trains eagerly (inductor's compile workers would be threads
    and processes before the fork)."""
    got = _preload(tmp_path, "ok", {**CFG, "training": {**CFG.get("training", {}), "compile": True}})
    assert "warmed up in" in got["note"] and got["threads_after"] == got["threads_before"], got


def test_a_failed_warm_up_drops_the_preloaded_model(tmp_path: Path) -> None:
    got = _preload(tmp_path, "fails", CFG)
    assert got["note"] == "base model not preloaded: its warm-up failed: RuntimeError: warm-up broke", got
    assert got["cached"] == 0 and got["kept"] == 0, got  # the tasks load their own; nothing holds the old one


def test_no_warm_up_where_a_gpu_is_present(tmp_path: Path) -> None:
    """model.device: cpu on a GPU machine: the model is preloaded, but a backward in the server would
    start autograd's per-GPU threads, and every child's own backward would then fail."""
    got = _preload(tmp_path, "gpu", {**CFG, "model": {**CFG["model"], "device": "cpu"}})
    assert got["note"].endswith("no warm-up (a GPU device is present)") and got["cached"] == 1, got
    assert got["kept"] == 0, got


def test_warm_up_can_be_turned_off(tmp_path: Path) -> None:
    got = _preload(tmp_path, "ok", {**CFG, "local": {"warm_up": False}})
    assert got["note"].endswith("no warm-up (local.warm_up: false)") and got["cached"] == 1, got


def test_warm_up_trains_one_short_step_at_one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its cost must not grow with the run's window or steps (seconds per window on a big model), and
    it must run at one thread (no OpenMP pool before the fork) whatever training.threads says."""
    from hetlora_core import client

    seen = []
    real = client.train_lora
    def spy(m: Any, a: Any, c: Any, cfg: Any, rnd: int) -> Any:
        seen.append((cfg, torch.get_num_threads()))
        return real(m, a, c, cfg, rnd)

    monkeypatch.setattr(client, "train_lora", spy)
    cfg = config_from_dict({**CFG, "data": {**CFG["data"], "seq_len": 128, "eval_max_tokens": 256},
                            "training": {**CFG["training"], "threads": 2, "local_steps": 5, "batch_size": 4}})
    warm_up(cfg, runtime.model(cfg))
    (small, threads), = seen
    assert (small.data.seq_len, small.training.local_steps, small.training.batch_size, small.training.threads) == (WARM_LEN, 1, 1, 1)
    assert threads == 1
