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

import hashlib
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .config import HetLoRAConfig, replace

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
    "hetlora_rankaware": ("HetLoRA rank-aware", lambda b, p: {"strategy.normalisation": "rank_aware"}),
}

# quick (full: more rounds). Sizes come from costs measured on
# the 2-core Zen-1 (AVX2) machine, float32, one thread: ~0.03 CPU-s per trained token (LoRA) and
# ~0.01 per evaluated token. bf16 is OFF: without AVX512-BF16/AMX a bf16 matmul ran ~50x slower.
_REAL: Overrides = {
    "model.name": "smollm2-135m", "data.num_clients": 6, "data.min_chars": 2500, "data.max_chars": 4000,
    "data.seq_len": 64, "data.eval_max_tokens": 64, "data.seed": 0,
    "ranks.r_min": 2, "ranks.r_max": 16, "ranks.assignment": "tiers",
    "ranks.tiers": [{"name": "small", "rank": 2}, {"name": "medium", "rank": 6}, {"name": "large", "rank": 16}],
    "training.local_steps": 2, "training.batch_size": 2, "training.lr": 3e-3, "training.bf16": False,
    "pruning.lam": 1e-2, "pruning.gamma": 0.99, "federation.rounds": 6, "federation.clients_per_round": 3,
}
_TINY: Overrides = {
    **_REAL, "model.name": "tiny", "model.tiny_hidden": 32, "model.tiny_layers": 1, "data.min_chars": 2000,
    "data.max_chars": 2500, "data.num_clients": 4, "data.seq_len": 16, "data.eval_max_tokens": 16,
    "ranks.r_min": 1, "ranks.r_max": 4, "ranks.tiers": [{"name": "small", "rank": 1}, {"name": "large", "rank": 4}],
    "training.lr": 1e-2, "training.threads": 1, "pruning.lam": 0.5, "federation.rounds": 3,
    "federation.clients_per_round": 2,
}  # one thread: on a busy machine two threads mostly wait for each other on such small matrices
PROFILES: dict[str, dict[str, Any]] = {
    "tiny": {"seeds": 1, "base": _TINY, "full_ft_lr": 1e-3, "sweep_rounds": 2, "sweep_step_budget": 4},
    "quick": {"seeds": 1, "base": _REAL, "full_ft_lr": 1e-4, "sweep_rounds": 3, "sweep_step_budget": 8},
    "full": {"seeds": 3, "base": {**_REAL, "federation.rounds": 8}, "full_ft_lr": 1e-4, "sweep_rounds": 3, "sweep_step_budget": 8},
}
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
# adding an option does not orphan the finished runs it cannot have changed.
LATE_DEFAULTS: dict[tuple[str, str], Any] = {("model", "vocab"): "full"}


def config_hash(cfg: HetLoRAConfig) -> str:
    d = cfg.to_dict()
    d.pop("experiment")
    for (section, key), default in LATE_DEFAULTS.items():
        if d[section].get(key) == default:
            d[section].pop(key)
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
            "train_loss", "train_seconds", "eval_seconds", "participants")
    rec = {**meta, "config": cfg.to_dict(), "wall_seconds": time.perf_counter() - w, "cpu_seconds": time.process_time() - c,
           "resumed_at_round": start, "baseline_ppl": res["baseline_ppl"], "params": trainable_params(cfg),
           "rounds": [{k: r.get(k) for k in keep} for r in res["rounds"]]}
    st.atomic_write(done, json.dumps(rec, indent=1).encode())  # bench.json marks the run done: never half-written
    log(f"done {run_dir}: ppl {rec['baseline_ppl']:.2f} -> {rec['rounds'][-1]['global_ppl']:.2f} "
        f"({rec['wall_seconds']:.0f} s wall, {rec['cpu_seconds']:.0f} CPU-s)")
    return rec


def _final(rec: dict[str, Any]) -> float:
    return float(rec["rounds"][-1]["global_ppl"])


def set_threads(n: int) -> None:
    """Torch threads for the whole bench process (0: torch's default). On a machine other jobs
    keep busy, 1 thread measured ~2x faster than 2 (threads wait for each other at every op)."""
    if n > 0:
        import torch

        torch.set_num_threads(n)


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

    return {"nproc": os.cpu_count(), "cpu": cpu, "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "avx512_bf16": "avx512_bf16" in flags, "amx": "amx_bf16" in flags,
            "loadavg": os.getloadavg()[0]}


def run_paper(profile: str, out: Path, report: Path, methods: list[str] | None = None, seeds: int | None = None,
              sweep: bool = False, command: str = "", log: Callable[[str], None] = print,
              vocab: str = "full") -> dict[str, Any]:
    """Run every (method, seed) of ``profile`` (resumable) and write the report and plots."""
    from .report import write_report

    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    prof = PROFILES[profile]
    methods = methods or list(METHODS)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise click.BadParameter(f"unknown method(s) {bad}; choose from {list(METHODS)}", param_hint="--methods")
    summary_path = out / "sweep" / "summary.json"
    sweep_summary = run_sweep(profile, out, log) if sweep else (
        json.loads(summary_path.read_text()) if summary_path.is_file() else None)
    if sweep_summary and (profile == "tiny") != (sweep_summary["profile"] == "tiny"):
        sweep_summary = None  # a tiny sweep never steers the real model, nor the reverse
    choices = dict(sweep_summary["choices"]) if sweep_summary else {}
    prof = {**prof, **({"full_ft_lr": choices["full_ft_lr"]} if "full_ft_lr" in choices else {})}
    base = replace(base_config(profile, choices), **{"model.vocab": vocab})
    records = []
    for seed in range(seeds or prof["seeds"]):
        for m in methods:
            cfg = method_config(base, m, seed, prof)
            records.append(run_one(cfg, out / "runs" / m / f"seed{seed}-{config_hash(cfg)}",
                                   {"method": m, "label": METHODS[m][0], "seed": seed, "profile": profile}, log))
    meta = {"profile": profile, "command": command, "machine": machine(), "load_start": load0, "wall_seconds": time.perf_counter() - t0,
            "base": base.to_dict(), "full_ft_lr": prof["full_ft_lr"], "sweep": sweep_summary, "out": str(out),
            "methods": methods, "labels": {m: METHODS[m][0] for m in methods}}
    write_report(records, meta, report)
    log(f"report: {report} ({meta['wall_seconds']:.0f} s)")
    return {"records": records, "meta": meta}


def register(main: click.Group) -> None:
    """Add ``bench paper`` and ``bench sweep`` to the ``hetlora`` CLI group."""

    @main.group()
    def bench() -> None:
        """Benchmarks: the paper's method comparison and its hyper-parameter sweep."""

    threads_opt = click.option("--threads", type=int, default=0, show_default=True,
                               help="Torch threads (0: torch's default). Use 1 on a machine other jobs keep busy.")
    profile_opt = click.option("--profile", type=click.Choice(list(PROFILES)), default="quick", show_default=True,
                               help="tiny: random tiny model (CI, seconds); quick: SmolLM2, 1 seed; full: SmolLM2, 3 seeds.")
    out_opt = click.option("--out", "-o", type=click.Path(file_okay=False), default="runs/bench-paper", show_default=True,
                           help="Run folders (one per method and seed; rerun to resume) and sweep/.")

    @bench.command()
    @profile_opt
    @out_opt
    @click.option("--report", type=click.Path(dir_okay=False), default="docs/results.md", show_default=True,
                  help="Markdown report; PNG plots go to a folder next to it named after it (docs/results/).")
    @click.option("--methods", default="", help=f"Comma-separated subset of: {','.join(METHODS)} (default: all).")
    @click.option("--seeds", type=int, default=None, help="Number of seeds (default: the profile's).")
    @click.option("--sweep", is_flag=True, help="Run the sweep first (resumable). Without it, OUT/sweep/summary.json is used if present.")
    @click.option("--vocab", type=click.Choice(["full", "corpus"]), default="full", show_default=True,
                  help="corpus: cut SmolLM2's output layer to the tokens Shakespeare uses (faster; perplexity then "
                       "normalised over those tokens, so not comparable with full-vocabulary reports).")
    @threads_opt
    def paper(profile: str, out: str, report: str, methods: str, seeds: int | None, sweep: bool, vocab: str,
              threads: int) -> None:
        """Run HetLoRA, HomLoRA at r_min and r_max, zero-padding, the ablations, Recon+SVD and full
        fine-tuning on the same clients, seeds and local steps, and write the report with plots."""
        set_threads(threads)
        cmd = "hetlora " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else ""
        run_paper(profile, Path(out), Path(report), [m for m in methods.split(",") if m] or None, seeds, sweep, cmd,
                  log=lambda s: click.echo(f"[bench {time.strftime('%H:%M:%S')}] {s}", err=True), vocab=vocab)

    @bench.command("sweep")
    @profile_opt
    @out_opt
    @threads_opt
    def sweep_cmd(profile: str, out: str, threads: int) -> None:
        """Choose lr, lambda, gamma, local steps and full fine-tuning's lr on validation roles; writes
        OUT/sweep/summary.json, which `bench paper` then applies."""
        set_threads(threads)
        s = run_sweep(profile, Path(out), log=lambda s: click.echo(f"[sweep {time.strftime('%H:%M:%S')}] {s}", err=True))
        click.echo(json.dumps(s["choices"]))


if __name__ == "__main__":  # python -m hetlora_core.bench_paper ... (before cli.py registers it)
    @click.group()
    def _main() -> None:
        """hetlora (bench only)"""

    register(_main)
    _main()
