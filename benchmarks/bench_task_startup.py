"""Per-task fixed cost of a pipeline task: what a fresh task process pays before its real work.

kfp.local (and a pod under Kubeflow) starts every task as a new Python process running
``python -m kfp.dsl.executor_main``, which imports kfp, then the component's body imports its step
from ``hetlora_core.steps`` and, for the model-side steps (train, evaluate), loads the base model,
its tokenizer and the clients' tokens. That start-up is paid once per task whatever the work, so
it decides the pipeline / in-process ratio at small amounts of work per client
(``bench_pipeline_overhead.py`` measures that ratio for a whole round).

For each kind of task this script times, in a fresh process, exactly those start-up stages and
nothing else (no store, no training), repetitions interleaved across kinds:

    interpreter   python -c pass                         (the floor any task pays)
    model-free    + kfp executor + prune/aggregate steps  (issue target: <= 1.5 s, no torch import)
    model         + train/evaluate steps, torch, transformers, peft, model + tokenizer + client tokens
                                                          (issue target: <= 2.5 s beyond the real work)

    warm          the model task as a local run has it (hetlora_core/warm.py): the same fresh process
                  (kfp executor, steps: no torch) hands the step to a warm task server that imported
                  torch, transformers and peft once; the server's forked child loads the model,
                  tokenizer and client tokens (issue target: <= 2.5 s beyond the real work)
    exec          a whole task of a no-op component as ``hetlora run`` starts it (pipelines/warm_exec.py):
                  the task process (no kfp import) hands kfp's executor to the warm server's child,
                  which loads the component and runs it; the wall time of the task process

The child reports each stage's own time, so the table says where the seconds go (kfp, torch,
transformers + peft, the model load). One warm server is started for the whole run (its preload is
not timed: a run pays it once, in the background, while the first tasks start). Run from the
repository root:

    .venv/bin/python benchmarks/bench_task_startup.py            # SmolLM2 (embedded default)
    .venv/bin/python benchmarks/bench_task_startup.py --quick    # tiny model, 2 repetitions
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import OUT, ROOT, machine

# The child: one kind of task's start-up, stage by stage; prints a JSON object of stage -> seconds.
CHILD = r"""
import json, sys, time
t0 = time.perf_counter(); out = {}
kind, model_name = sys.argv[1], sys.argv[2]
def mark(stage):
    global t0
    t = time.perf_counter(); out[stage] = t - t0; t0 = t
if kind != "interpreter":
    import kfp.dsl.executor_main  # noqa: F401 - what the task's entry point imports first
    mark("kfp executor")
    import hetlora_core.steps.aggregate, hetlora_core.steps.prune  # noqa: F401,E401
    mark("model-free steps")
    out["torch imported"] = float("torch" in sys.modules)
if kind == "model":
    import hetlora_core.steps.evaluate, hetlora_core.steps.train  # noqa: F401,E401
    from hetlora_core import runtime
    from hetlora_core.config import load_config
    cfg = load_config(None, {"model.name": model_name})
    mark("model-side steps")
    import torch  # noqa: F401
    mark("torch")
    import peft, transformers  # noqa: F401,E401
    mark("transformers + peft")
    runtime.model(cfg)
    mark("model load")
    runtime.tokenizer(cfg)
    mark("tokenizer")
    runtime.clients(cfg)
    mark("client tokens")
if kind == "warm":
    import hetlora_core.steps.evaluate, hetlora_core.steps.train  # noqa: F401,E401
    from hetlora_core import warm
    mark("model-side steps")
    warm.STEPS["bench_startup"] = "__main__:bench_startup"  # the server's launcher registers the same name
    sent = time.time()
    got = json.loads(warm.delegate("bench_startup", model_name) or "{}")
    out["connect + fork"] = got.pop("started") - sent
    out.update(got)
    t0 = time.perf_counter()
    out["torch imported"] = float("torch" in sys.modules)
print(json.dumps(out))
"""

# The warm server of this benchmark: the real server with one more step, the model-side start-up
# that the CHILD's "model" kind times in a fresh process (model, tokenizer, client tokens).
SERVER = r"""
import json, time
from hetlora_core import warm
from hetlora_core.warm_server import main

def bench_startup(model_name):
    out = {"started": time.time()}
    t0 = time.perf_counter()
    from hetlora_core import runtime
    from hetlora_core.config import load_config
    cfg = load_config(None, {"model.name": model_name})
    for stage, load in (("model load", runtime.model), ("tokenizer", runtime.tokenizer), ("client tokens", runtime.clients)):
        load(cfg)
        t = time.perf_counter(); out[stage] = t - t0; t0 = t
    return json.dumps(out)

warm.STEPS["bench_startup"] = "__main__:bench_startup"
main()
"""

# The "exec" kind: a whole kfp.local task of a component that does nothing, as `hetlora run` starts
# it with a warm server (pipelines/warm_exec.py: the task process hands kfp's executor to the
# server's child, which loads the component and runs it). Its wall time is the task's whole fixed cost.
NOOP_COMPONENT = """
import kfp
from kfp import dsl
from kfp.dsl import *
from typing import *

def noop() -> str:
    return ""
"""

TARGETS = {"model-free": 1.5, "model": 2.5, "warm": 2.5, "exec": 1.5}


def exec_argv(tmp: Path) -> list[str]:
    """kfp.local's command for the no-op component's task, through warm_exec."""
    from hetlora_kfp.pipelines import warm_exec

    module = tmp / "ephemeral_component.py"
    module.write_text(NOOP_COMPONENT)
    executor_input = {"inputs": {"parameterValues": {}}, "outputs": {
        "parameters": {"Output": {"outputFile": str(tmp / "out" / "Output")}}, "outputFile": str(tmp / "out" / "executor_output.json")}}
    return [sys.executable, "-P", "-m", warm_exec.MODULE, *warm_exec.EXECUTOR, "--component_module_path", str(module),
            "--executor_input", json.dumps(executor_input), "--function_to_execute", "noop"]


def run_child(kind: str, model: str, argv: list[str] | None = None) -> tuple[float, dict[str, float]]:
    """Wall time of one fresh process doing ``kind``'s start-up, and its stages (none for "exec")."""
    t = time.perf_counter()
    p = subprocess.run(argv or [sys.executable, "-c", CHILD, kind, model], cwd=ROOT, capture_output=True, text=True, check=True)
    if argv:
        assert "this task's executor ran in the warm task server" in p.stdout, p.stdout + p.stderr
        return time.perf_counter() - t, {}
    return time.perf_counter() - t, json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model, 2 repetitions")
    ap.add_argument("--reps", type=int, default=None, help="repetitions per kind (default 5, 2 with --quick)")
    ap.add_argument("--out", default=str(OUT), help="where the JSON result goes")
    ap.add_argument("--no-warm", action="store_true", help="skip the warm-server kind")
    args = ap.parse_args()
    model = "tiny" if args.quick else "smollm2-135m"
    reps = args.reps or (2 if args.quick else 5)
    kinds = ("interpreter", "model-free", "model") + (() if args.no_warm else ("warm", "exec"))
    run_child("model", model)  # warm the on-disk caches (model conversion, tokens) and the page cache
    server = None
    if not args.no_warm:
        from hetlora_kfp.pipelines import warm_exec

        from hetlora_core.warm import SOCKET_ENV, WarmServer

        tmp = tempfile.mkdtemp(prefix="bench-warm-")
        server = WarmServer(tmp, log_path=Path(tmp) / "server.log", argv=[sys.executable, "-c", SERVER], steps=warm_exec.STEPS)
        t = time.perf_counter()
        if not server.start():
            sys.exit(f"the warm server did not start: {Path(tmp) / 'server.log'}")
        os.environ[SOCKET_ENV] = server.socket_path
        run_child("warm", model)  # waits for the preload, and warms the child's path once
        print(f"warm server up and preloaded in {time.perf_counter() - t:.1f} s (not part of any task)")
    walls: dict[str, list[float]] = {k: [] for k in kinds}
    stages: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
    facts = machine()
    try:
        argv = exec_argv(Path(tempfile.mkdtemp(prefix="bench-exec-"))) if "exec" in kinds else None
        for _ in range(reps):  # interleaved: load drifts hit every kind alike
            for k in kinds:
                w, s = run_child(k, model, argv if k == "exec" else None)
                walls[k].append(w)
                stages[k].append(s)
    finally:
        if server is not None:
            server.stop()
    med = {k: statistics.median(v) for k, v in walls.items()}
    print(f"per-task start-up, {model}, median of {reps} (fresh process each):")
    for k in kinds:
        target = f"  target <= {TARGETS[k]} s: {'met' if med[k] <= TARGETS[k] else 'NOT met'}" if k in TARGETS else ""
        print(f"  {k:12s} {med[k]:6.2f} s  ({med[k] / med['interpreter']:.1f}x the bare interpreter){target}")
        names = [n for n in stages[k][0] if n != "torch imported"]
        for n in names:
            print(f"      {n:22s} {statistics.median(s[n] for s in stages[k]):6.2f} s")
    torch_free = all(s.get("torch imported") == 0.0 for s in stages["model-free"])
    print(f"  model-free steps import torch: {'no' if torch_free else 'YES'}")
    if "warm" in stages:
        print(f"  a warm task's own process imports torch: {'no' if all(s.get('torch imported') == 0.0 for s in stages['warm']) else 'YES'}")
    res = {"model": model, "reps": reps, "model_free_s": med["model-free"], "model_s": med["model"],
           "interpreter_s": med["interpreter"], "warm_s": med.get("warm"), "exec_s": med.get("exec"),
           "median_s": med, "walls_s": walls, "stages": stages,
           "targets_s": TARGETS,
           "model_free_torch_free": torch_free, **facts, "load_avg_end": os.getloadavg()}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    name = "task_startup-quick.json" if args.quick else "task_startup.json"
    (Path(args.out) / name).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
