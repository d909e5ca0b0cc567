"""``hetlora bench paper``: the paper's comparison (HETLORA.md, "Baselines") on one code path.

Every method is a set of dotted config overrides on ONE base config and runs through
``simulate.simulate`` -- no per-method code. Each (method, seed) runs in its own directory
``<out>/runs/<method>/seed<k>-<config hash>``; a finished pair has ``bench.json`` there and is
skipped, an interrupted one resumes at its last committed round. The hash covers the whole
config, so changing a setting starts fresh runs instead of mixing. ``full`` runs 4/3 as many
rounds as ``quick`` (its three seeds take ~85 CPU-minutes at one thread), so it reuses nothing.

``hetlora bench sweep`` picks lr, lambda, gamma, local steps (and full fine-tuning's lr) by a
coordinate sweep on *validation roles* (``data.seed`` 1, not the roles reported on); ``paper``
applies the choices in ``<out>/sweep/summary.json`` when that file exists. The report (markdown,
PNG plots, verdict computed from the numbers) is written by ``report.py``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .bench_jobs import Job, run_jobs
from .config import REMOVED_SETTINGS, HetLoRAConfig, replace
from .config_load import RANK_AWARE_EVIDENCE
from .report_runs import run_machine

Overrides = dict[str, Any]


def hom(r: int) -> Overrides:
    """HomLoRA(r): every client at rank r (one tier), FedAvg by sample counts."""
    return {"strategy.name": "homlora", "ranks.r_min": r, "ranks.r_max": r, "ranks.assignment": "tiers",
            "ranks.tiers": [{"name": "all", "rank": r}]}


# name -> (label, overrides as a function of the base config and the profile). Order = report order.
METHODS: dict[str, tuple[str, Callable[[HetLoRAConfig, dict[str, Any]], Overrides]]] = {
    "hetlora": ("HetLoRA", lambda b, p: {}),
    "homlora_rmin": ("HomLoRA r_min", lambda b, p: hom(b.ranks.r_min)),
    "homlora_rmax": ("HomLoRA r_max", lambda b, p: hom(b.ranks.r_max)),
    "zero_pad": ("zero-padding", lambda b, p: {"strategy.name": "zero_pad"}),
    "hetlora_noprune": ("HetLoRA w/o pruning", lambda b, p: {"pruning.enabled": False}),
    "hetlora_nosparsity": ("HetLoRA w/o sparsity weights", lambda b, p: {"strategy.sparsity_weights": False}),
    "recon_svd": ("Recon+SVD (FlexLoRA)", lambda b, p: {"strategy.name": "recon_svd"}),
    "full_ft": ("full fine-tuning", lambda b, p: {"strategy.name": "full_ft", "training.lr": p["full_ft_lr"]}),
    "hetlora_lossform": ("HetLoRA, penalty in the loss", lambda b, p: {"pruning.form": "loss"}),
}
# Methods removed after runs were recorded with them: name -> (label, the method listed before it (its
# place in a report), the removed settings its runs had on top of HetLoRA's config, why it went: said by
# the CLI when asked to run it and by a report of its runs).
# Never run again; ``--no-run`` still finds and reports their runs (docs/results*.md are records of them).
REMOVED_METHODS: dict[str, tuple[str, str, dict[tuple[str, str], Any], str]] = {
    "hetlora_rankaware": ("HetLoRA rank-aware", "full_ft", {("strategy", "normalisation"): "rank_aware"},
                          f"its setting strategy.normalisation: rank_aware (not in the paper) was removed: it "
                          f"{RANK_AWARE_EVIDENCE}; the paper's p_k^2 damping of a rarely trained rank tail regularises it "
                          "(hetlora_core/averaging.py, FactorSums.finish)"),
}

# quick and full (full: 3 seeds, 4 rounds of 4 local steps). Sizes come from costs measured on
# the 2-core Zen-1 (AVX2) machine, float32, one thread: ~0.03 CPU-s per trained token (LoRA) and
# ~0.01 per evaluated token. bf16 is OFF: without AVX512-BF16/AMX a bf16 matmul ran ~50x slower.
_REAL: Overrides = {
    "model.name": "smollm2-135m", "data.num_clients": 6, "data.min_chars": 2500, "data.max_chars": 4000,
    "data.seq_len": 64, "data.eval_max_tokens": 64, "data.seed": 0,
    "ranks.r_min": 2, "ranks.r_max": 16, "ranks.assignment": "tiers",
    "ranks.tiers": [{"name": "small", "rank": 2}, {"name": "medium", "rank": 6}, {"name": "large", "rank": 16}],
    "training.local_steps": 2, "training.batch_size": 2, "training.lr": 3e-3, "training.bf16": False,
    "pruning.lam": 1e-2, "pruning.gamma": 0.99, "federation.rounds": 6, "federation.clients_per_round": 3,
    # The tail penalty as a proximal step after each AdamW step: in the loss, Adam's ~lr-per-entry
    # steps drown it and clients almost never prune (docs/benchmarks.md, "Pruning form"); the
    # hetlora_lossform row keeps the loss form for comparison.
    "pruning.form": "proximal",
}
_TINY: Overrides = {
    **_REAL, "model.name": "tiny", "model.tiny_hidden": 32, "model.tiny_layers": 1, "data.min_chars": 2000,
    "data.max_chars": 2500, "data.num_clients": 4, "data.seq_len": 16, "data.eval_max_tokens": 16,
    "ranks.r_min": 1, "ranks.r_max": 4, "ranks.tiers": [{"name": "small", "rank": 1}, {"name": "large", "rank": 4}],
    "training.lr": 1e-2, "training.threads": 1, "pruning.lam": 0.5, "federation.rounds": 3,
    "federation.clients_per_round": 2,
}  # one thread: on a busy machine two threads mostly wait for each other on such small matrices
# gpu: the paper's shape (ranks 5..50, 5 local steps of batch 8, 5 of 24 clients per round, 20
# rounds) on an accelerator (the precision is decided there: bf16 autocast). Measured on an H200
# with 10 workers: a LoRA run takes 160-350 s of one CPU core (launch- and Python-bound), so one
# 9-minute device call finishes about a third of the 30 runs; later calls continue (--stop-min).
# Roles of 16-20k characters give each client ~4k training tokens, about one epoch per round.
_GPU: Overrides = {
    **_REAL, "model.device": "auto", "model.dtype": "auto", "training.bf16": None, "training.threads": 1,
    "data.num_clients": 24, "data.min_chars": 16000, "data.max_chars": 20000, "data.seq_len": 128, "data.eval_max_tokens": 512,
    "ranks.r_min": 5, "ranks.r_max": 50,
    "ranks.tiers": [{"name": "r5", "rank": 5}, {"name": "r10", "rank": 10}, {"name": "r25", "rank": 25}, {"name": "r50", "rank": 50}],
    "training.local_steps": 5, "training.batch_size": 8, "training.lr": 3e-3, "federation.rounds": 20,
    "federation.clients_per_round": 5,
    # A scratch store (its uploads are dropped after each round): no fsync of full fine-tuning's ~0.5 GB
    # writes, 100 of them per run; and the aggregate step keeps its 5 validated uploads (full
    # fine-tuning: 2.7 GB) instead of reading each twice. Neither changes a number (tested).
    "store.fsync": False, "strategy.keep_uploads_mb": 4096.0,
}
# gpu-tiny: the gpu profile's shape on the random tiny model, for a CPU check of the profile and
# of the parallel runner (tests, and machines without a GPU) in seconds.
_GPU_TINY: Overrides = {
    **_GPU, "model.name": "tiny", "model.tiny_hidden": 32, "model.tiny_layers": 1, "model.device": "cpu",
    "data.num_clients": 8, "data.min_chars": 2000, "data.max_chars": 2500, "data.seq_len": 16, "data.eval_max_tokens": 16,
    "ranks.r_min": 1, "ranks.r_max": 4, "ranks.tiers": [{"name": "small", "rank": 1}, {"name": "large", "rank": 4}],
    "training.local_steps": 2, "training.batch_size": 2, "training.lr": 1e-2, "federation.rounds": 3,
    "federation.clients_per_round": 3,
}
PROFILES: dict[str, dict[str, Any]] = {
    "tiny": {"seeds": 1, "base": _TINY, "full_ft_lr": 1e-3, "sweep_rounds": 2, "sweep_step_budget": 4},
    "quick": {"seeds": 1, "base": _REAL, "full_ft_lr": 1e-4, "sweep_rounds": 3, "sweep_step_budget": 8},
    # full: its defaults are the choices of the sweep run for the first full report, so a report can be
    # made without the 40-minute sweep (`--sweep` still overrides them); the note says so in the report.
    "full": {"seeds": 3, "base": (_FULL := {**_REAL, "federation.rounds": 4, "training.local_steps": 4, "training.lr": 1e-2}),
             "full_ft_lr": 1e-4, "sweep_rounds": 3, "sweep_step_budget": 8,
             "defaults_note": f"the profile's defaults are the choices of the sweep made for the first full report "
                              f"(training.lr {_FULL['training.lr']:g}, training.local_steps {_FULL['training.local_steps']} "
                              f"at equal client compute, so {_FULL['federation.rounds']} rounds; pruning.lam "
                              f"{_FULL['pruning.lam']:g}, pruning.gamma {_FULL['pruning.gamma']:g}, full_ft_lr 0.0001). That "
                              "sweep applied the tail penalty as a loss term; lambda was not swept again for the proximal "
                              "form used here"},
    "gpu": {"seeds": 3, "base": _GPU, "full_ft_lr": 1e-4, "sweep_rounds": 4, "sweep_step_budget": 20},
    "gpu-tiny": {"seeds": 2, "base": _GPU_TINY, "full_ft_lr": 1e-3, "sweep_rounds": 2, "sweep_step_budget": 4},
}
TINY_PROFILES = ("tiny", "gpu-tiny")  # random model: their sweeps never steer a real model, nor the reverse
# Coordinate sweep: each stage varies one setting of HetLoRA (full_ft_lr: of full fine-tuning) with
# the earlier stages' winners fixed. local_steps is compared at equal client compute (rounds x steps).
SWEEP: list[tuple[str, list[Any]]] = [
    ("training.lr", [1e-3, 3e-3, 1e-2, 3e-2]), ("pruning.lam", [1e-3, 1e-2, 1e-1]), ("pruning.gamma", [0.9, 0.99]),
    ("training.local_steps", [2, 4]), ("full_ft_lr", [3e-5, 1e-4, 3e-4]),
]
SWEEP_DATA_SEED = 1
SWEEP_TOLERANCE = 0.005  # 0.5% of perplexity


def base_config(profile: str, choices: Overrides | None = None) -> HetLoRAConfig:
    """The profile's base config (the HetLoRA row) with sweep choices applied (except full_ft_lr).
    A chosen local_steps keeps client compute equal: rounds scale by default_steps / steps."""
    base = PROFILES[profile]["base"]
    ov = {**base, **{k: v for k, v in (choices or {}).items() if k != "full_ft_lr"}}
    steps = ov["training.local_steps"]
    ov["federation.rounds"] = max(1, round(base["federation.rounds"] * base["training.local_steps"] / steps))
    return replace(HetLoRAConfig(experiment="bench"), **ov)


def method_config(base: HetLoRAConfig, method: str, seed: int, prof: dict[str, Any]) -> HetLoRAConfig:
    return replace(base, **{**METHODS[method][1](base, prof), "federation.seed": seed, "experiment": f"{method}-s{seed}"})


# Settings added after runs were first recorded: left out of the hash while at their default, so
# adding an option does not orphan the finished runs it cannot have changed. Settings removed since
# (config.REMOVED_SETTINGS) are put back at the value that remains, for the same reason.
# training.chunked_loss (the training loss and evaluation's log-likelihoods) and
# model.attention are the exception, accepted: they change a run's numbers
# at rounding level only (the same arithmetic in another order or kernel; tests/test_lm_loss.py,
# test_attention_kernel.py), as any change of torch or of the code's summation order would.
LATE_DEFAULTS: dict[tuple[str, str], Any] = {("model", "vocab"): "full", ("training", "chunked_loss"): True,
                                                ("model", "attention"): "auto", ("training", "compile"): False}
# Settings that cannot change a run's numbers (tested), only how its store writes and how often the
# aggregate step reads an upload: never in the hash. (Only a store that changes an object between the
# step's reads tells them apart: dropped when read again, the validated tensors when kept.)
# local.warm_up: the paper bench runs in-process (no warm server), and a warmed child trains the same
# bytes as a task of its own (tests/test_warm.py, test_client.py's dropout seeding).
OPERATIONAL: tuple[tuple[str, str], ...] = (("store", "fsync"), ("strategy", "keep_uploads_mb"), ("local", "warm_up"))
# Operational too, but hashed ever since runs were first recorded: hashed as the value they were
# recorded with, whatever it is now, so their folders keep their names (kubeflow.pipeline_root's
# default became "" when KFP 2.17 was seen to ignore it in the compiled pipeline).
HASHED_AS_RECORDED: dict[tuple[str, str], Any] = {("kubeflow", "pipeline_root"): "minio://hetlora/pipeline-root"}


def config_hash(cfg: HetLoRAConfig) -> str:
    return _hash(cfg.to_dict())


def _hash(d: dict[str, Any]) -> str:
    """``config_hash`` of a config as plain data (a removed method's runs: their config no longer loads)."""
    from .bench_task import portable_data_path

    d = copy.deepcopy(d)
    d.pop("experiment")
    for (section, key), (kept, _) in REMOVED_SETTINGS.items():
        d[section].setdefault(key, kept)
    d["data"]["path"] = portable_data_path(d["data"]["path"])  # runs copied to another machine keep their hash
    for (section, key), default in LATE_DEFAULTS.items():
        if d[section].get(key) == default:
            d[section].pop(key)
    for section, key in OPERATIONAL:
        d[section].pop(key, None)
    for (section, key), recorded in HASHED_AS_RECORDED.items():
        d[section][key] = recorded
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


def trainable_params(cfg: HetLoRAConfig) -> dict[str, Any]:
    """Parameters a client trains and a round's global holds (LoRA: from its rank; full: all),
    and every client's initial rank (before any self-pruning)."""
    from . import runtime
    from .methods import method_for
    from .steps.plan import initial_client_state

    model, method = runtime.model(cfg), method_for(cfg)
    total = sum(p.numel() for p in model.parameters())
    initial = {c: s["rank"] for c, s in initial_client_state(cfg, runtime.client_ids(cfg)).items()}
    if not method.trains_lora:
        return {"per_client_mean": total, "per_client_max": total, "global": total, "base_model": total, "initial_ranks": initial}
    per_rank = sum(o + i for o, i in method.model_spec(model).values())
    ranks = list(initial.values())
    return {"per_client_mean": per_rank * sum(ranks) / len(ranks), "per_client_max": per_rank * max(ranks),
            "global": per_rank * cfg.ranks.r_max, "base_model": total, "initial_ranks": initial}


def _drop_payloads(run_dir: Path, cfg: HetLoRAConfig, rnd: int) -> None:
    """After round ``rnd`` is committed and evaluated, its client uploads are never read again
    (their manifests stay, for results), nor, for full fine-tuning, the previous global delta.
    Full fine-tuning writes ~0.5 GB per upload: kept, they would fill the disk within a few rounds."""
    from . import store as st

    store, exp = st.LocalStore(run_dir / "store"), cfg.experiment
    for cid in st.list_client_ids(store, exp, rnd):
        st.drop_payload(store, st.client_prefix(exp, rnd, cid))
        st.drop_payload(store, st.trained_prefix(exp, rnd, cid))
    from .methods import method_for

    if rnd > 0 and not method_for(cfg).trains_lora:
        st.drop_payload(store, st.global_prefix(exp, rnd - 1))


def _simulate_rounds(cfg: HetLoRAConfig, run_dir: Path, start: int, big: bool) -> None:
    from .simulate import simulate

    for rnd in range(start, cfg.federation.rounds if big else 0):
        simulate(replace(cfg, **{"federation.rounds": rnd + 1}), run_dir, progress=False)
        _drop_payloads(run_dir, cfg, rnd)
    if not big or start >= cfg.federation.rounds:
        simulate(cfg, run_dir, progress=False)
        for rnd in range(cfg.federation.rounds):
            _drop_payloads(run_dir, cfg, rnd)


def run_one(cfg: HetLoRAConfig, run_dir: Path, meta: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    """One (method, seed): skipped if ``bench.json`` exists, else simulated (resuming any earlier
    partial run). Full fine-tuning goes one round per ``simulate`` call -- growing
    ``federation.rounds`` is a normal resume -- so each round's bulky uploads are dropped in between."""
    import torch

    from . import store as st

    done = run_dir / "bench.json"
    if done.is_file():
        log(f"skip {run_dir} (done)")
        return json.loads(done.read_text())
    log(f"run  {run_dir}")
    w, c = time.perf_counter(), time.process_time()
    start = st.last_committed_round(st.LocalStore(run_dir / "store"), cfg.experiment) + 1 if (run_dir / "store").is_dir() else 0
    from .methods import method_for

    threads, big = torch.get_num_threads(), not method_for(cfg).trains_lora
    try:
        _simulate_rounds(cfg, run_dir, start, big)
    finally:
        torch.set_num_threads(threads)  # training.threads sets it process-wide: undo for later callers
    res = json.loads((run_dir / "results.json").read_text())
    keep = ("round", "global_ppl", "personal_ppl", "client_ranks", "prune_events", "bytes_up", "bytes_down",
            "train_loss", "train_seconds", "eval_seconds", "participants", "rouge_l")
    rec = {**meta, "config": cfg.to_dict(), "wall_seconds": time.perf_counter() - w, "cpu_seconds": time.process_time() - c,
           "resumed_at_round": start, "baseline_ppl": res["baseline_ppl"], "params": trainable_params(cfg),
           "precision": res.get("precision"), "machine": run_machine(machine()),  # a report may join runs of several machines
           "rounds": [{k: r.get(k) for k in keep} for r in res["rounds"]]}
    st.atomic_write(done, json.dumps(rec, indent=1).encode())  # bench.json marks the run done: never half-written
    log(f"done {run_dir}: ppl {rec['baseline_ppl']:.2f} -> {rec['rounds'][-1]['global_ppl']:.2f} "
        f"({rec['wall_seconds']:.0f} s wall, {rec['cpu_seconds']:.0f} CPU-s)")
    return rec


def _final(rec: dict[str, Any]) -> float:
    return float(rec["rounds"][-1]["global_ppl"])


def set_threads(n: int) -> None:
    """Torch threads for the whole bench, its worker processes and their training and evaluation
    (0: each run's ``training.threads``, whose 0 splits the CPUs among the workers). On a machine
    other jobs keep busy, 1 thread measured ~2x faster than 2 (threads wait for each other at every op)."""
    from .threads import TASK_THREADS_ENV

    if n > 0:
        import torch

        torch.set_num_threads(n)
        os.environ[TASK_THREADS_ENV] = str(n)  # read by task_threads in this process and the spawned workers
    else:
        os.environ.pop(TASK_THREADS_ENV, None)  # an earlier call's choice does not outlive it


def run_sweep(profile: str, out: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Coordinate sweep on validation roles (``data.seed`` = 1), one seed, ``sweep_rounds`` rounds.

    Criterion: final global held-out perplexity of the validation roles (lower is better).
    local_steps is compared at equal client compute: rounds = sweep_step_budget / steps (every
    candidate must divide it); other stages run sweep_rounds * default_steps / steps rounds."""
    prof = PROFILES[profile]
    choices: Overrides = {}
    rows = []
    for key, values in SWEEP:
        scores = {}
        for v in values:
            ch = {**choices, key: v}
            base = replace(base_config(profile, ch), **{"data.seed": SWEEP_DATA_SEED})
            steps0, steps = base_config(profile).training.local_steps, base.training.local_steps
            rounds = (prof["sweep_step_budget"] // steps if key == "training.local_steps"
                      else max(1, round(prof["sweep_rounds"] * steps0 / steps)))
            base = replace(base, **{"federation.rounds": rounds})
            method = "full_ft" if key == "full_ft_lr" else "hetlora"
            cfg = method_config(base, method, 0, {**prof, **ch})
            rec_dir = out / "sweep" / f"{method}-{config_hash(cfg)}"  # by hash: a repeated config runs once
            rec = run_one(cfg, rec_dir, {"method": method, "seed": 0, "sweep": key, "value": v}, log)
            scores[v] = _final(rec)
            rows.append({"setting": key, "value": v, "run": rec_dir.name, "rounds": rounds, "final_ppl": scores[v],
                         "best_ppl": min(r["global_ppl"] for r in rec["rounds"]), "baseline_ppl": rec["baseline_ppl"],
                         "wall_seconds": rec["wall_seconds"]})
        default = prof.get(key) if key == "full_ft_lr" else base_config(profile).to_dict()[key.split(".")[0]][key.split(".")[1]]
        best = min(scores, key=scores.__getitem__)
        # A value must beat the default by more than SWEEP_TOLERANCE to replace it (single-seed noise).
        keep = default in scores and scores[default] <= scores[best] * (1 + SWEEP_TOLERANCE)
        choices[key] = default if keep else best
        log(f"sweep {key}: {scores} -> {choices[key]}")
    summary = {"profile": profile, "data_seed": SWEEP_DATA_SEED, "rounds": prof["sweep_rounds"], "tolerance": SWEEP_TOLERANCE,
               "choices": choices, "rows": rows}
    (out / "sweep").mkdir(parents=True, exist_ok=True)
    (out / "sweep" / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def machine() -> dict[str, Any]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"nproc": os.cpu_count(), "cpu": cpu, "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "avx512_bf16": "avx512_bf16" in flags, "amx": "amx_bf16" in flags,
            "loadavg": os.getloadavg()[0], "gpu": gpu,
            "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if gpu else None}


def label_of(method: str) -> str:
    return METHODS[method][0] if method in METHODS else REMOVED_METHODS[method][0]


def _run_dir(base: HetLoRAConfig, m: str, seed: int, prof: dict[str, Any], out: Path) -> tuple[HetLoRAConfig | None, Path]:
    """A (method, seed)'s config and run folder. A removed method has no config any more (None):
    its folder is named by the hash of the config its runs had, HetLoRA's plus its removed settings."""
    if m in METHODS:
        cfg = method_config(base, m, seed, prof)
        return cfg, out / "runs" / m / f"seed{seed}-{config_hash(cfg)}"
    d = method_config(base, "hetlora", seed, prof).to_dict()
    for (section, key), v in REMOVED_METHODS[m][2].items():
        d[section][key] = v
    return None, out / "runs" / m / f"seed{seed}-{_hash(d)}"


def _planned(profile: str, base: HetLoRAConfig, prof: dict[str, Any], methods: list[str], seeds: int,
             out: Path) -> list[tuple[HetLoRAConfig | None, Path, dict[str, Any]]]:
    """Every (method, seed) as (config, run folder, record metadata), seed by seed, so that when a
    deadline cuts the bench short the finished runs are whole seeds. Within a seed the slowest method
    (full fine-tuning: every upload is the whole model) goes first. (Queueing all its seeds first,
    tried on the H200, let it hold 3 of 10 workers for a whole device call without finishing.)"""
    pairs = [(m, seed) for seed in range(seeds) for m in sorted(methods, key=lambda m: m != "full_ft")]
    return [(*_run_dir(base, m, seed, prof, out), {"method": m, "label": label_of(m), "seed": seed, "profile": profile})
            for m, seed in pairs]


def _jobs(profile: str, base: HetLoRAConfig, prof: dict[str, Any], methods: list[str], seeds: int, out: Path) -> list[Job]:
    """``_planned``'s runs as jobs to run."""
    return _as_jobs(_planned(profile, base, prof, methods, seeds, out))


def _as_jobs(planned: list[tuple[HetLoRAConfig | None, Path, dict[str, Any]]]) -> list[Job]:
    """Planned runs as jobs (a removed method has none: its runs are only reported)."""
    return [Job(cfg, run_dir, meta) for cfg, run_dir, meta in planned if cfg is not None]


def _all_methods(out: Path) -> list[str]:
    """Every method, and every removed one whose runs are under ``out``, in report order."""
    methods = list(METHODS)
    for m, (_, after, _, _) in REMOVED_METHODS.items():
        if (out / "runs" / m).is_dir():
            methods.insert(methods.index(after) + 1, m)
    return methods


def run_paper(profile: str, out: Path, report: Path, methods: list[str] | None = None, seeds: int | None = None,
              sweep: bool = False, command: str = "", log: Callable[[str], None] = print,
              vocab: str = "full", workers: int = 1, deadline_s: float | None = None, run: bool = True,
              task: str = "lm", device: str | None = None, stop_s: float | None = None,
              verbose: bool = False, note: str | None = None) -> dict[str, Any]:
    """Run every (method, seed) of ``profile`` (resumable) and write the report and plots.

    ``workers``: processes sharing the machine (bench_jobs.py); ``deadline_s``: seconds from now
    after which no run starts; ``run=False``: only report the runs already finished under ``out``
    (with the machine facts recorded when they ran), e.g. runs copied back from a GPU machine.
    ``task``: ``lm`` (the roles' text, perplexity) or ``next-speech`` (bench_task.py); ``device``
    overrides the profile's ``model.device`` (e.g. the gpu-tiny check on a GPU); ``stop_s``: seconds
    from now at which the caller stops the bench (a device call's limit): a run whose method's
    earlier runs took longer than the time left is not started (``_fit_to_stop``); ``verbose``: the
    worker processes keep the libraries' warnings and progress bars; ``note``: a sentence for the
    report's machine section (what the records cannot tell, e.g. that their calls used other cards)."""
    from .bench_task import task_overrides
    from .report import write_report

    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    prof = PROFILES[profile]
    methods = methods or (list(METHODS) if run else _all_methods(out))
    bad = [m for m in methods if m not in METHODS and m not in REMOVED_METHODS]
    if bad:
        raise click.BadParameter(f"unknown method(s) {bad}; choose from {list(METHODS)}", param_hint="--methods")
    gone = [m for m in methods if m in REMOVED_METHODS]
    if gone and run:
        raise click.BadParameter("; ".join(f"{m}: {REMOVED_METHODS[m][3]}" for m in gone)
                                 + ". Recorded runs of a removed method are still reported with --no-run", param_hint="--methods")
    summary_path = out / "sweep" / "summary.json"
    sweep_summary = run_sweep(profile, out, log) if sweep and run else (
        json.loads(summary_path.read_text()) if summary_path.is_file() else None)
    if sweep_summary and (profile in TINY_PROFILES) != (sweep_summary["profile"] in TINY_PROFILES):
        sweep_summary = None  # a tiny sweep never steers the real model, nor the reverse
    choices = dict(sweep_summary["choices"]) if sweep_summary else {}
    prof = {**prof, **({"full_ft_lr": choices["full_ft_lr"]} if "full_ft_lr" in choices else {})}
    base = replace(base_config(profile, choices), **{"model.vocab": vocab})
    base = replace(base, **task_overrides(task, base, out, log), **({"model.device": device} if device else {}))
    planned = _planned(profile, base, prof, methods, seeds or prof["seeds"], out)
    jobs = _as_jobs(planned)  # all of them when run
    meta_path = out / f"bench-meta-{profile}-{task}.json"
    if run:
        from .store.base import atomic_write

        mach = {**machine(), "workers": workers}
        ran: dict[str, Any] = {"machine": mach, "wall_seconds": None, "load_start": load0, "command": command}  # what --no-run reads back
        # Written before the runs too: a bench killed at a device call's time limit can still be
        # reported (--no-run) with the machine it ran on.
        atomic_write(meta_path, json.dumps(ran, indent=1).encode())
        if workers > 1:
            _warm_model(base)  # once, before the workers: not one conversion per process
        now = time.time()
        deadline = now + deadline_s if deadline_s else (now + stop_s if stop_s else None)
        if stop_s:
            jobs = _fit_to_stop(jobs, now + stop_s, out)
        records, missing = run_jobs(jobs, workers, log, deadline, threads=base.training.threads, verbose=verbose)
        atomic_write(meta_path, json.dumps({**ran, "wall_seconds": time.perf_counter() - t0}, indent=1).encode())
    else:
        records = [json.loads((d / "bench.json").read_text()) for _, d, _ in planned if (d / "bench.json").is_file()]
        missing = [f"{meta['method']} seed {meta['seed']}: no finished run in {d}" for _, d, meta in planned
                   if not (d / "bench.json").is_file()]
        saved: dict[str, Any] = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        mach, load0 = saved.get("machine") or machine(), float(saved.get("load_start", load0))
        command = str(saved.get("command") or command)
    if not records:
        raise click.ClickException(f"no finished runs under {out} for profile {profile!r} ({len(missing)} missing); nothing to report")
    wall = json.loads(meta_path.read_text()).get("wall_seconds") if meta_path.is_file() else None
    meta = {"profile": profile, "command": command, "machine": mach, "load_start": load0,
            "wall_seconds": wall, "stopped": wall is None and meta_path.is_file(),  # stopped before it could record it
            "base": base.to_dict(), "full_ft_lr": prof["full_ft_lr"], "sweep": sweep_summary, "out": str(out),
            "methods": methods, "labels": {m: label_of(m) for m in methods}, "missing": missing, "task": task,
            "removed": {m: REMOVED_METHODS[m][3] for m in methods if m in REMOVED_METHODS},
            "planned_runs": len(planned), "defaults_note": prof.get("defaults_note"), "note": note}
    write_report(records, meta, report)
    log(f"report: {report} ({len(records)} of {len(planned)} runs)")
    return {"records": records, "meta": meta}


def _fit_to_stop(jobs: list[Job], stop: float, out: Path) -> list[Job]:
    """Each job's latest start: ``stop`` minus the median wall time of its method's runs already
    finished under ``out`` (e.g. in an earlier device call); a method never finished keeps the
    general deadline. A run that cannot finish before the stop is not started: killed, it would
    only have taken a worker from runs that can."""
    import dataclasses
    import statistics

    walls: dict[str, list[float]] = {}
    for f in out.glob("runs/*/*/bench.json"):
        rec = json.loads(f.read_text())
        if not rec.get("resumed_at_round"):  # a resumed run's wall time covers only its last rounds
            walls.setdefault(rec["method"], []).append(float(rec["wall_seconds"]))
    return [dataclasses.replace(j, deadline=stop - statistics.median(walls[j.meta["method"]])) if j.meta["method"] in walls else j
            for j in jobs]


def _warm_model(cfg: HetLoRAConfig) -> None:
    """Build SmolLM2's converted cache in this process so the workers only read it."""
    if cfg.model.name == "smollm2-135m":
        from .models import warm_cache

        warm_cache()
