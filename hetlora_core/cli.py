"""Core CLI commands (no KFP): simulate, inspect, export. The ``hetlora`` entry point
(``pipelines/cli.py``) adds the Kubeflow commands to this group."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from .config import ConfigError, HetLoRAConfig, load_config, load_yaml, replace
from .quiet import quiet_libraries


def parse_sets(sets: tuple[str, ...]) -> dict[str, Any]:
    """``--set training.lr=1e-3`` -> {"training.lr": 0.001}; values parse as YAML scalars."""
    out = {}
    for s in sets:
        if "=" not in s:
            raise click.BadParameter(f"{s!r}: expected KEY=VALUE, e.g. training.lr=1e-3", param_hint="--set")
        k, v = s.split("=", 1)
        out[k.strip()] = load_yaml(v, f"--set {k.strip()}")
    return out


def load_cfg(config: str | None, sets: tuple[str, ...], trains_here: bool = False) -> HetLoRAConfig:
    """The config, validated; ``trains_here`` (simulate, run): also check that this machine can serve
    model.device/dtype/quantize (CUDA, bf16, bitsandbytes), so a bad request is one line now, not a
    failed task mid-round."""
    try:
        cfg = load_config(config, parse_sets(sets))
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    if trains_here:
        check_trains_here(cfg)
    return cfg


def check_trains_here(cfg: HetLoRAConfig) -> None:
    """``load_cfg``'s machine check on its own (it imports torch: ~1 s), for a command that starts
    other work first (``hetlora run`` its warm server)."""
    from .precision import resolve

    try:
        resolve(cfg)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None


config_option = click.option("--config", "-c", type=click.Path(dir_okay=False), default=None,
                             help="YAML config (see configs/); omitted: the embedded defaults (SmolLM2 + 6 Shakespeare roles).")
set_option = click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                          help="Override one config value, e.g. --set training.lr=1e-3 (repeatable).")


verbose_option = click.option("--verbose", "-v", is_flag=True,
                              help="Show everything: library warnings and progress bars (and, for `run`, every task's log).")


def fail(msg: str, code: int = 1) -> NoReturn:
    click.echo(f"error: {msg}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="hetlora")
def main() -> None:
    """HetLoRA: heterogeneous-rank federated LoRA fine-tuning, in-process or on Kubeflow.

    \b
    Quick start:
      hetlora run                         local federated fine-tuning (kfp.local, local store)
      hetlora simulate -c configs/smoke.yaml --out runs/smoke   in-process, seconds
      hetlora inspect runs/smoke/store/smoke/round-0001/global/adapter.safetensors
    """


@main.command()
@config_option
@set_option
@click.option("--out", "-o", type=click.Path(file_okay=False), required=True,
              help="Run directory: results.json, perplexity.png and (unless store.root or an S3 store is set) store/ go here. "
                   "Rerun to resume.")
@click.option("--quiet", "-q", is_flag=True, help="No progress lines, only the summary.")
@verbose_option
def simulate(config: str | None, sets: tuple[str, ...], out: str, quiet: bool, verbose: bool) -> None:
    """Run every round in this process (no KFP): the fastest way to try a config.

    Writes OUT/results.json (config, per-round metrics, ranks, prune events, aggregation weights,
    bytes, timings) and OUT/perplexity.png. Interrupted runs resume from the last committed round."""
    from .corpus import DataError
    from .model_source import ModelError
    from .run import RoundFailed, RunConfigMismatch, summary_line
    from .simulate import simulate as run_sim
    from .store import StoreError

    cfg = load_cfg(config, sets, trains_here=True)
    quiet_libraries(verbose)
    try:
        res = run_sim(cfg, out, progress=not quiet)
    except (RoundFailed, RunConfigMismatch, StoreError, ConfigError, ModelError, DataError) as e:  # DataError: bad client folders
        fail(str(e))
    click.echo(summary_line(res, Path(out)))


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--r-min", type=int, default=1, show_default=True, help="Reject ranks below this.")
@click.option("--r-max", type=int, default=None, help="Reject ranks above this.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(file: str, r_min: int, r_max: int | None, as_json: bool) -> None:
    """Validate a HetLoRA adapter file and print its modules, ranks and norms.

    Exit code 1 with the validation error (no traceback) when the file is not a valid adapter:
    not safetensors, a pickle, truncated, NaN/Inf, wrong dtype, inconsistent shapes or ranks."""
    from .adapter import AdapterError, LoraAdapter

    try:
        a = LoraAdapter.load(file, r_min=r_min, r_max=r_max)
    except AdapterError as e:
        fail(str(e))
    norms = a.delta_norms()
    info: dict[str, Any] = {"file": file, "scale": a.scale, "modules": len(a.modules), "rank": a.rank, "params": a.num_params(),
            "bytes": a.nbytes(),
            "per_module": {m: {"rank": a.ranks[m], "in": a.A[m].shape[1], "out": a.B[m].shape[0], "delta_norm": norms[m]}
                           for m in a.modules}}
    if as_json:
        click.echo(json.dumps(info, indent=1))
        return
    click.echo(f"{file}: {info['modules']} modules, rank {a.rank}, scale {a.scale}, {info['params']:,} parameters")
    click.echo(f"{'module':<48} {'rank':>4} {'out x in':>11} {'||s B A||_F':>12}")
    for m, d in info["per_module"].items():
        click.echo(f"{m:<48} {d['rank']:>4} {str(d['out']) + 'x' + str(d['in']):>11} {d['delta_norm']:>12.4g}")


def run_store_dir(run_dir: str) -> Path:
    """A run's local store: RUN/store, or, for a run whose config set ``store.root``, the directory its
    RUN/results.json records (simulate and run honour ``store.root``)."""
    default = Path(run_dir) / "store"
    if default.is_dir():
        return default
    try:
        store = json.loads((Path(run_dir) / "results.json").read_text())["config"]["store"]
    except (OSError, ValueError, KeyError, TypeError):
        return default
    return Path(store["root"]) if isinstance(store, dict) and store.get("kind") == "local" and store.get("root") else default


def run_experiment(run_dir: str, exps: list[str]) -> str:
    """The experiment a run directory is about: the one its results.json names (a store given by
    ``store.root`` may hold several), else the store's only one; several and no record: fail, listing them."""
    try:
        exp = json.loads((Path(run_dir) / "results.json").read_text())["experiment"]
    except (OSError, ValueError, KeyError, TypeError):
        exp = None
    if isinstance(exp, str) and exp in exps:
        return exp
    if len(exps) == 1:
        return exps[0]
    fail(f"the store of {run_dir} holds experiments {exps} and {run_dir}/results.json names none of them; "
         "export from the run directory that made the experiment")


@main.command()
@click.option("--run", "run_dir", type=click.Path(file_okay=False, exists=True), required=True,
              help="A run directory made by `hetlora simulate` or `hetlora run`.")
@click.option("--out", "-o", type=click.Path(file_okay=False), required=True, help="Folder to write.")
@click.option("--round", "rnd", type=int, default=None, help="Round to export (default: the last committed).")
@click.option("--merge", is_flag=True, help="Also merge the adapter into the base weights and save a transformers model.")
def export(run_dir: str, out: str, rnd: int | None, merge: bool) -> None:
    """Write a run's global adapter as a standard peft adapter folder (PeftModel.from_pretrained
    loads it, and so does AutoPeftModelForCausalLM: adapter_config.json names the base model), and with
    --merge a merged transformers model (+ tokenizer) in the base's dtype under OUT/merged."""
    from . import runtime
    from . import store as st
    from .config import config_from_dict
    from .models import base_dtype, base_name_or_path
    from .peft_bridge import attach, save_peft_folder

    store = st.LocalStore(run_store_dir(run_dir))
    exps = st.experiments(store)
    if not exps:
        fail(f"{store.root} holds no run (no {st.config_key('<experiment>')}); pass the --out of a simulate/run")
    exp = run_experiment(run_dir, exps)
    recorded = st.get_json(store, st.config_key(exp))
    if recorded is None:  # listed a moment ago: only a concurrent delete gets here
        fail(f"{store.root}: {st.config_key(exp)} disappeared while reading it")
    # Export on this machine's CPU from the full-precision base, whatever the run trained on (a CUDA
    # or 4bit run is exported the same way: adapters are float32; a 4bit base could not be merged).
    cfg = replace(config_from_dict(recorded), **{"model.device": "cpu", "model.dtype": "float32", "model.quantize": "none",
                                                  "training.bf16": None})
    last = st.last_committed_round(store, cfg.experiment)
    rnd = last if rnd is None else rnd
    if rnd < 0 or rnd > last:
        fail(f"round {rnd} is not committed in {run_dir} (last committed: {last})")
    from .methods import method_for

    if not method_for(cfg).trains_lora:
        fail(f"export writes LoRA adapters; a {cfg.strategy.name} run has none")
    # The global is verified against the store's key when the run signed its state (the key file
    # beside a local store, or the environment's): an export never ships a forged adapter unnoticed.
    try:
        with st.signing.local_server_key(replace(cfg, **{"store.root": str(store.root)}).store, run_dir, fresh=False):
            adapter = runtime.global_adapter(cfg, store, rnd)
    except st.StoreError as e:  # ForgedState, ServerKeyError, a damaged global: one line, no traceback
        fail(str(e))
    # The full-vocabulary model even for model.vocab=corpus runs: q/v adapters fit it unchanged.
    model: Any = runtime.model(replace(cfg, **{"model.vocab": "full"}))  # a transformers PreTrainedModel
    base = base_name_or_path(cfg.model)
    if base is None:  # tiny: built in memory, so the export carries its base for peft to load
        model.save_pretrained(Path(out) / "base", safe_serialization=True)
        runtime.tokenizer(cfg).save_pretrained(Path(out) / "base")
        base = str((Path(out) / "base").resolve())
    save_peft_folder(model, adapter, out, base)
    runtime.tokenizer(cfg).save_pretrained(out)
    click.echo(f"peft adapter of round {rnd} (rank {adapter.rank}) written to {out} (base: {base})")
    if merge:
        import copy

        merged = attach(copy.deepcopy(model), adapter).merge_and_unload()
        merged.config.use_cache = True  # the base is kept without a KV cache for training; inference wants it
        merged = merged.to(base_dtype(cfg.model))
        merged.save_pretrained(Path(out) / "merged", safe_serialization=True)
        runtime.tokenizer(cfg).save_pretrained(Path(out) / "merged")
        click.echo(f"merged model ({base_dtype(cfg.model)}) written to {Path(out) / 'merged'}")


@main.group()
def tiers() -> None:
    """Size rank tiers (CPU/memory requests and limits) from measurement."""


@tiers.command("measure")
@config_option
@set_option
@click.option("--steps", type=int, default=3, show_default=True, help="Timed local steps per rank (after one warm-up update).")
@click.option("--headroom", type=float, default=1.5, show_default=True, help="Memory limit = measured peak x this.")
@click.option("--out", "-o", type=click.Path(dir_okay=False), default=None, help="Write the tier table YAML here (default: stdout).")
def tiers_measure(config: str | None, sets: tuple[str, ...], steps: int, headroom: float, out: str | None) -> None:
    """Measure peak memory and step time of local training at every tier's rank (each in a fresh
    process) and print the tier table with requests = peak and limits = peak x headroom."""
    from .tiers import measure_rank, render, tier_table

    cfg = load_cfg(config, sets)
    ranks = sorted({t.rank for t in cfg.ranks.tiers})
    meas = {}
    with click.progressbar(ranks, label="measuring ranks", file=sys.stderr) as bar:
        for r in bar:
            meas[r] = measure_rank(cfg, r, steps)
    cmd = "hetlora tiers measure " + " ".join(sys.argv[3:])
    text = render(cfg, meas, tier_table(cfg, meas, headroom), cmd.strip())
    if out:
        Path(out).write_text(text)
        click.echo(f"tier table written to {out}")
    else:
        click.echo(text)


@main.group()
def data() -> None:
    """Client data: per-client folders (data.source: folder; README "Bring your own data")."""


@data.command("export-shakespeare")
@config_option
@set_option
@click.option("--out", "-o", type=click.Path(file_okay=False), required=True, help="New folder: one sub-folder per client.")
@click.option("--format", "fmt", type=click.Choice(["text", "prompt_completion"]), default="text", show_default=True,
              help="text: the exact train/held-out text of each role (same tokens as the built-in source); "
                   "prompt_completion: next-speech pairs (previous speaker's speech -> this role's answer).")
def data_export_shakespeare(config: str | None, sets: tuple[str, ...], out: str, fmt: str) -> None:
    """Write the Shakespeare roles that data.* chooses as <OUT>/<client_id>/{train,eval}.jsonl."""
    from .corpus import DataError
    from .export_data import export_shakespeare

    cfg = load_cfg(config, sets)
    try:
        ids = export_shakespeare(cfg.data, Path(out), fmt)  # type: ignore[arg-type]
    except DataError as e:
        fail(str(e))
    click.echo(f"{len(ids)} client folders ({fmt}) written to {out}: {', '.join(ids)}")


@main.group()
def cache() -> None:
    """The on-disk model cache (SmolLM2 converted from its GGUF once, then loaded as safetensors)."""


@cache.command("warm")
def cache_warm() -> None:
    """Convert the SmolLM2 GGUF into the cache now ($HETLORA_CACHE, default ~/.cache/hetlora), so no
    later task pays the ~20-45 s conversion. The image build runs this into a read-only folder that
    tasks find through $HETLORA_PREBUILT_CACHE."""
    from .models import ModelError, warm_cache

    try:
        folders = warm_cache()
    except ModelError as e:
        fail(str(e))
    for what, folder in folders.items():
        click.echo(f"{what}: {folder}")


# `hetlora bench paper|sweep`: the paper comparison (hetlora_core/bench_paper.py, bench_cli.py)
from .bench_cli import register as _register_bench  # noqa: E402

_register_bench(main)

# `hetlora store roles`: the server and client users on MinIO and the server key (hetlora_core/store_cli.py)
from .store_cli import register as _register_store  # noqa: E402

_register_store(main)
