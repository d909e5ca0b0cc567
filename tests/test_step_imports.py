"""The model-free steps (plan, prune, aggregate) and their components start without torch,
transformers or peft: each is imported in a fresh interpreter and ``sys.modules`` is checked."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft")


def modules_after_import(*names: str) -> set[str]:
    code = f"import importlib, json, sys\nfor n in {list(names)!r}: importlib.import_module(n)\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout))


@pytest.mark.parametrize("module", [
    "hetlora_core.steps.plan", "hetlora_core.steps.prune", "hetlora_core.steps.aggregate",
    "hetlora_kfp.components.prune_client.component", "hetlora_kfp.components.aggregate_round.component",
    "hetlora_core.run", "hetlora_core.eval_reports", "hetlora_core.steps.evaluate",
])
def test_model_free_step_loads_no_torch(module: str) -> None:
    loaded = modules_after_import(module)
    assert not [m for m in HEAVY if m in loaded], f"{module} imports {[m for m in HEAVY if m in loaded]}"


def test_the_check_can_fail() -> None:
    """The same check on a model-side step does see torch (so the test above is not vacuous)."""
    loaded = modules_after_import("hetlora_core.steps.train", "hetlora_core.runtime")
    assert "torch" in loaded


# Prepended to the scripts below: a fresh interpreter in which importing any of HEAVY fails.
NO_TORCH = r'''
import builtins, json, sys
real = builtins.__import__
def guard(name, *a, **k):
    if name.split(".")[0] in ("torch", "transformers", "peft"):
        raise ImportError(f"model-free step imported {name}")
    return real(name, *a, **k)
builtins.__import__ = guard
'''


def test_prune_and_aggregate_task_bodies_run_without_torch(tmp_path: Path) -> None:
    """Not just the import: a whole prune + aggregate of a planned round, in a fresh interpreter
    where importing torch is made to fail."""
    code = NO_TORCH + r'''
import numpy as np
from hetlora_core import store as st
from hetlora_core.adapter import init_global
from hetlora_core.config import config_from_dict
from hetlora_core.steps.plan import plan_round
from hetlora_core.steps.prune import prune_task
from hetlora_core.steps.aggregate import aggregate_task
cfg = config_from_dict({"experiment": "x", "store": {"root": sys.argv[1]}, "data": {"num_clients": 4},
                        "federation": {"clients_per_round": 2}, "ranks": {"r_min": 2, "r_max": 16}})
store = st.open_store(cfg.store)
plan = plan_round(cfg, store, ["a", "b", "c", "d"], 0)
spec = {"m.q_proj": (6, 5)}
g = init_global(spec, 16, cfg.model.lora_scale, 0)
for i, c in enumerate(plan.clients):
    a = g.truncate(c.rank)
    a.B = {m: np.full_like(b, 0.01 * (i + 1)) for m, b in a.B.items()}
    st.put_artifact(store, st.trained_prefix("x", 0, c.client_id), a.to_bytes(),
                    {"client_id": c.client_id, "num_samples": 5, "rank_before": c.rank, "received_ranks": a.ranks})
reports = [prune_task(cfg.to_json(), 0, c.client_id) for c in plan.clients]
print(json.dumps({"planned": [c.client_id for c in plan.clients], "result": json.loads(aggregate_task(cfg.to_json(), 0, reports))}))
'''
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout)
    assert got["result"]["participants"] == got["planned"] and len(got["planned"]) == 2 and got["result"]["dropped"] == {}


def test_federated_server_evaluate_runs_without_torch(tmp_path: Path) -> None:
    """Folder data: the server's evaluate step only combines the clients' reports, so it runs in a
    fresh interpreter where importing torch fails (a round committed first, reports written as the
    evaluate-client tasks would)."""
    data = tmp_path / "clients"
    for c in "abcd":
        (data / c).mkdir(parents=True)
        (data / c / "train.jsonl").write_text('{"text": "to be or not to be"}\n')
    code = NO_TORCH + r'''
from hetlora_core import store as st
from hetlora_core.adapter import init_global
from hetlora_core.config import config_from_dict
from hetlora_core.eval_reports import sums
from hetlora_core.steps.plan import plan_round
from hetlora_core.steps.evaluate import evaluate
cfg = config_from_dict({"experiment": "x", "store": {"root": sys.argv[1]}, "model": {"name": "tiny"},
                        "data": {"num_clients": 4, "source": "folder", "path": sys.argv[2]},
                        "federation": {"clients_per_round": 2}, "ranks": {"r_min": 2, "r_max": 16}})
store = st.open_store(cfg.store)
plan = plan_round(cfg, store, ["a", "b", "c", "d"], 0)
g = init_global({"m.q_proj": (6, 5)}, 16, cfg.model.lora_scale, 0)
st.put_artifact(store, st.global_prefix("x", 0), g.to_bytes(),
                {"round": 0, "clients": {c: {"rank": 4} for c in "abcd"}, "participants": ["a", "b"]})
for i, c in enumerate("abcd"):
    st.put_json(store, st.client_eval_key("x", 0, c), {"client_id": c, "round": 0, "global": sums(10.0 + i, 20),
                "personal": sums(12.0, 20), "base": sums(30.0, 20)})
print(json.dumps(evaluate(cfg, store, 0)))
'''
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "store"), str(data)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout)
    assert got["federated"] is True and got["global"]["tokens"] == 80
    assert abs(got["global"]["ppl"] - math.exp(46.0 / 80)) < 1e-9
