"""The ``hetlora`` console script: the core commands (hetlora_core.cli) plus the Kubeflow ones."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import click

from hetlora_core.cli import check_trains_here, config_option, fail, load_cfg, main, quiet_libraries, set_option, verbose_option

__all__ = ["main"]


@main.command()
@config_option
@set_option
@click.option("--out", "-o", type=click.Path(file_okay=False), default="runs/local", show_default=True,
              help="Run directory: store/ (unless the config sets store.root or an S3 store), pipeline-root/, results.json, plot.")
@verbose_option
@click.option("--no-warm", is_flag=True, help="Start every model task from scratch (imports, model load) instead of forking it "
              "from this run's warm task server; the same as --set local.warm_tasks=false.")
def run(config: str | None, sets: tuple[str, ...], out: str, verbose: bool, no_warm: bool) -> None:
    """Run a whole federated fine-tuning locally through kfp.local: each round is the real round
    pipeline (train -> self-prune per tier, aggregate, evaluate), each task a subprocess.

    Rerunning with the same --out resumes from the last committed round. With store.kind: s3 the
    artifacts go to that MinIO/S3 (credentials from HETLORA_S3_ACCESS_KEY / HETLORA_S3_SECRET_KEY).

    The console shows one progress display; each task's full output is in OUT/logs/round-NNNN/
    (a failed task's last lines are printed with its name; -v prints everything as it comes).
    Every task runs in a child forked from one warm task server of the run, started first: its
    imports, the base model and a short warm-up are paid once, while this process starts
    (its log: OUT/logs/warm-server.log; --no-warm turns it off)."""
    from hetlora_core.config import ConfigError
    from hetlora_core.corpus import DataError
    from hetlora_core.model_source import ModelError
    from hetlora_core.run import RoundFailed, RunConfigMismatch, summary_line
    from hetlora_core.store import StoreError

    from .warm_exec import run_server  # no kfp: the server is started before the driver imports it

    cfg = load_cfg(config, sets)
    try:
        # The warm server first: its preload (imports, the model, its warm-up: ~4 s) runs on another
        # core while this process checks the machine (torch's import), imports kfp and the runners and
        # compiles round 1. A machine that cannot serve the config stops it at once (its log stays in
        # OUT/logs, nothing else is written).
        with run_server(cfg, out, cfg.local.warm_tasks and not no_warm):
            quiet_libraries(verbose)  # imports transformers' utilities: after the server's start
            check_trains_here(cfg)  # kfp.local trains on this machine
            from .runners import run_local

            res = run_local(cfg, out, verbose=verbose, server_started=True)
    except (RoundFailed, RunConfigMismatch, StoreError, ConfigError, ModelError, DataError) as e:
        fail(str(e))
    click.echo(f"{summary_line(res, Path(out))}, plot: {Path(out) / 'perplexity.png'}")


@main.command(name="compile")
@config_option
@set_option
@click.option("--out", "-o", type=click.Path(dir_okay=False), required=True, help="IR YAML file to write.")
@click.option("--round", "rnd", type=int, default=0, show_default=True,
              help="Round to compile. Rounds after 0 read the committed state (client ranks) from the configured store.")
def compile_cmd(config: str | None, sets: tuple[str, ...], out: str, rnd: int) -> None:
    """Compile one round's pipeline to KFP IR YAML (PipelineSpec + Kubernetes platform spec:
    per-tier node selectors, tolerations, resources, and the store Secret as env vars)."""
    from hetlora_core import store as st
    from hetlora_core.config import ConfigError
    from hetlora_core.datasource import client_ids
    from hetlora_core.steps.plan import plan_round

    from .round import compile_round

    cfg = load_cfg(config, sets)
    if cfg.strategy.name != "full_ft":  # a target module the model lacks fails here, not in every client task
        from hetlora_core.model_source import ModelError
        from hetlora_core.targets import check_model

        try:
            check_model(cfg.model, download=False)
        except (ConfigError, ModelError) as e:
            fail(str(e))
    ids = client_ids(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        # Round 0 needs no store (initial ranks come from the config); the plan goes to a scratch dir.
        try:
            store = st.LocalStore(tmp) if rnd == 0 else st.open_store(cfg.store)
        except (ConfigError, st.StoreError) as e:
            fail(str(e))
        plan = plan_round(cfg, store, ids, rnd)
    compile_round(cfg, plan, out)
    click.echo(f"round {rnd} pipeline ({len(plan.clients)} clients) compiled to {out}")


@main.command()
@config_option
@set_option
@click.option("--host", required=True, help="KFP API endpoint, e.g. http://localhost:8080 (port-forwarded ml-pipeline-ui).")
@click.option("--out", "-o", type=click.Path(file_okay=False), default="runs/kubeflow", show_default=True,
              help="Where results.json and the plot go (the store itself is the configured S3 bucket).")
@click.option("--no-wait", is_flag=True, help="Submit the next round (and the evaluation of every committed round that has "
              "none) and return instead of driving every round; after the last round, one more call submits its evaluation.")
@click.option("--timeout", type=int, default=6 * 3600, show_default=True,
              help="Seconds to wait for each run (a round's, an evaluation's).")
def submit(config: str | None, sets: tuple[str, ...], host: str, out: str, no_wait: bool, timeout: int) -> None:
    """Drive a whole run on Kubeflow: two KFP runs per round (its clients and aggregation, then its
    evaluation), each waited for; stops on the first failure with the run's link. Resumes from the last committed round in the store (a committed
    round that was never evaluated is evaluated first), then writes OUT/results.json and the plot.

    Needs store.kind: s3 reachable from here (credentials in HETLORA_S3_ACCESS_KEY /
    HETLORA_S3_SECRET_KEY) and, in the cluster, the Secret named by kubeflow.store_secret."""
    from hetlora_core.config import ConfigError
    from hetlora_core.corpus import DataError
    from hetlora_core.model_source import ModelError
    from hetlora_core.run import RoundFailed, RunConfigMismatch, summary_line
    from hetlora_core.store import StoreError

    from .runners import submit_next_round, submit_run

    cfg = load_cfg(config, sets)
    if cfg.store.kind != "s3":
        fail("submit needs store.kind: s3 (pods cannot see a local directory); see configs/kind.yaml")
    try:
        if no_wait:
            click.echo(f"submitted run {submit_next_round(cfg, host)}")
            return
        res, ids = submit_run(cfg, host, out, timeout_s=timeout)
    except (RoundFailed, RunConfigMismatch, StoreError, ConfigError, ModelError, DataError) as e:
        fail(str(e))
    except Exception as e:  # noqa: BLE001 - kfp/urllib3 errors (refused, DNS, HTTP 4xx/5xx): say where and what
        first = (str(e).splitlines() or [""])[0][:300]
        fail(f"Kubeflow Pipelines API at {host} failed: {type(e).__name__}: {first}; "
             "check --host (e.g. kubectl -n kubeflow port-forward svc/ml-pipeline-ui 8080:80, then "
             "--host http://localhost:8080) and that you may create runs in namespace "
             f"{cfg.kubeflow.namespace!r}. Committed rounds are kept: rerun to resume.")
    click.echo(f"{summary_line(res, Path(out))}; KFP runs: {', '.join(ids) or 'none (already complete)'}")


@main.command()
@config_option
@set_option
@click.option("--kubeconfig", type=click.Path(dir_okay=False), default=None,
              help="Kubeconfig file (default: $KUBECONFIG or ~/.kube/config; none: the in-cluster service account).")
@click.option("--context", default=None, help="Kubeconfig context (default: its current context).")
@click.option("--skip-store", is_flag=True, help="Do not contact the object store.")
def preflight(config: str | None, sets: tuple[str, ...], kubeconfig: str | None, context: str | None,
              skip_store: bool) -> None:
    """Check that the cluster can run this config before submitting it: every tier's node selector
    and tolerations match a Ready, uncordoned node whose allocatable CPU/memory/GPU covers the
    tier's requests; the store Secret exists with accesskey/secretkey; the store answers.

    Prints a table per tier and the fix for anything missing; exits 1 when a check fails."""
    from .preflight import PreflightError, core_api, render, run_preflight

    cfg = load_cfg(config, sets)
    try:
        report = run_preflight(cfg, core_api(kubeconfig, context), skip_store=skip_store)
    except PreflightError as e:
        fail(str(e))
    click.echo(render(report))
    if not report.ok:
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
