"""The two pipeline executors of the round runner: kfp.local (``hetlora run``) and Kubeflow
(``hetlora submit``). The loop itself (resume, evaluation catch-up, results, Pushgateway clean-up)
is ``hetlora_core.run.RoundRunner``; these only run one planned round, or one evaluation.

KFP v2 has no data-carrying loop across iterations, so each round is its own pipeline run, built
from the round's plan (tiers with no selected client are simply absent).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hetlora_core import store as st
from hetlora_core.config import HetLoRAConfig
from hetlora_core.datasource import client_ids
from hetlora_core.progress import Progress
from hetlora_core.run import PipelineFailed, RoundFailed, RoundRunner, check_or_record_config, local_config
from hetlora_core.steps.plan import RoundPlan, load_plan, plan_round

from .round import build_evaluate_pipeline, build_round_pipeline, compile_evaluate, compile_round, eval_groups, tier_groups
from .task_logs import TaskLogs, captured
from .warm_exec import run_server, tasks_via_server

log = logging.getLogger("hetlora")

__all__ = ["KfpLocalExecutor", "KubeflowExecutor", "RoundFailed", "run_local", "submit_run", "wait_for_run"]


class KfpLocalExecutor:
    """Each round is the real round pipeline under kfp.local's SubprocessRunner (each task a
    subprocess in this machine's environment); artifacts of KFP itself go to ``pipeline_root``.

    kfp.local's output (executor inputs, each task's own output, library warnings) goes to one log
    file per task under ``log_root/round-NNNN/`` (``pipelines.task_logs``); a failed task's tail is
    shown with its name. ``verbose`` echoes everything to the console as kfp.local prints it."""

    name, command = "kfp.local", "hetlora run"
    local_key = True  # RoundRunner gives this run a server key of its own output directory (store/signing.py)

    def __init__(self, pipeline_root: str | Path, log_root: str | Path | None = None, verbose: bool = False,
                 show: Callable[[str], None] | None = None, concurrent_tasks: int | None = 2) -> None:
        from kfp import local

        root = Path(pipeline_root).resolve()
        root.mkdir(parents=True, exist_ok=True)
        self.log_root = Path(log_root) if log_root else root.parent / "logs"
        self.verbose, self.show = verbose, show or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.on_task: Callable[[str, str], None] | None = None
        # kfp.local's SubprocessRunner runs at most two tasks at once (../shared/PLATFORM-NOTES.md):
        # each model task gets half the CPUs instead of all of them twice over.
        self.concurrent_tasks = concurrent_tasks
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)

    def _run(self, call: Callable[[], Any], folder: str, kinds: dict[str, str]) -> None:
        def on_task(task: str, status: str) -> None:
            if self.on_task:
                self.on_task(kinds.get(task, task), status)

        logs = TaskLogs(self.log_root / folder, echo=sys.__stderr__ if self.verbose else None, on_task=on_task)
        try:
            with captured(logs), tasks_via_server():  # each task's executor in the warm server's child, if there is one
                call()
        except RuntimeError as e:  # kfp.local: a task failed
            failed = logs.failed[-1] if logs.failed else ""
            where = logs.path_of(failed) or logs.dir
            if failed and not self.verbose:
                self.show(f"task {failed} failed; the end of its log ({where}):\n{logs.tail(failed).rstrip()}")
            raise PipelineFailed(f"failed under kfp.local: {'task ' + failed if failed else e} failed (log: {where})") from e
        finally:
            logs.close()

    def run_round(self, cfg: HetLoRAConfig, plan: RoundPlan, started_at: float) -> None:
        # kfp names a component used once per tier loop "train-client", "train-client-2", ... in the
        # order the DAG creates them (tier_groups' order): map those names back to the tiers.
        kinds = {"aggregate-round": "aggregate"}
        for i, (tier, _ids) in enumerate(tier_groups(cfg, plan)):
            suffix = "" if i == 0 else f"-{i + 1}"
            kinds.update({f"train-client{suffix}": f"train {tier.name}", f"prune-client{suffix}": f"prune {tier.name}"})
        self._run(lambda: build_round_pipeline(cfg, plan, concurrent_tasks=self.concurrent_tasks)(
                      config_json=cfg.to_json(), round_index=plan.round),
                  st.round_name(plan.round), kinds)

    @staticmethod
    def _eval_kinds(cfg: HetLoRAConfig, state: dict[str, dict[str, Any]]) -> dict[str, str]:
        """Folder data's evaluate-client task names ("evaluate-client", "evaluate-client-2", ... in
        eval_groups' order) mapped to "evaluate <tier>" for the progress display."""
        if cfg.data.source != "folder":
            return {}
        return {f"evaluate-client{'' if i == 0 else f'-{i + 1}'}": f"evaluate {tier.name}"
                for i, (tier, _ids) in enumerate(eval_groups(cfg, state))}

    def evaluate(self, cfg: HetLoRAConfig, rnd: int, started_at: float = 0.0) -> None:
        state = load_plan(cfg, st.open_store(cfg.store), rnd).state if cfg.data.source == "folder" else None

        def call() -> Any:
            pipeline = build_evaluate_pipeline(cfg, rnd, state=state, concurrent_tasks=self.concurrent_tasks)
            return pipeline(config_json=cfg.to_json(), round_index=rnd, round_started_at=started_at)

        self._run(call,
                  f"{st.round_name(rnd)}-evaluate", {"evaluate-round": "evaluate", **self._eval_kinds(cfg, state or {})})


# v2beta1 run states that end a run. kfp.Client.wait_for_run_completion stops only on
# SUCCEEDED/FAILED/SKIPPED/ERROR: a run canceled in the UI would be polled until the timeout.
TERMINAL_STATES = {"SUCCEEDED", "FAILED", "SKIPPED", "ERROR", "CANCELED", "CANCELING"}  # PAUSED may resume: keep waiting


def wait_for_run(client: Any, run_id: str, link: str, timeout_s: float, poll_s: float = 10.0) -> str:
    """Poll ``client.get_run`` until the run reaches a terminal state; returns that state.
    A run still going after ``timeout_s`` is a failed round with its link (not a bare TimeoutError)."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = str(getattr(client.get_run(run_id), "state", "") or "").upper().removeprefix("RUNTIMESTATE.")
        if state in TERMINAL_STATES:
            return state
        if time.monotonic() >= deadline:
            raise RoundFailed(f"run still {state or 'without a state'} after {timeout_s:.0f} s: {link}; raise --timeout, "
                              "or cancel it")  # the runner adds: rerun `hetlora submit` to resume
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))


def check_driver_key(cfg: HetLoRAConfig) -> None:
    """Kubeflow: this driver signs the plans the aggregate task verifies, so it holds the server key
    exactly when the server tasks do (``kubeflow.server_key_secret``); either half alone would fail
    round 0 with ForgedState, so say so before anything is submitted."""
    env, secret = cfg.store.server_key_env, cfg.kubeflow.server_key_secret
    has_key = st.signing.server_key(cfg.store) is not None
    if secret and not has_key:
        raise st.ServerKeyError(f"kubeflow.server_key_secret is {secret!r} but {env} is not set here: the driver signs the plans "
                                f"with the same key; export {env}=\"$(kubectl -n {cfg.kubeflow.namespace} get secret {secret} "
                                "-o jsonpath='{.data.key}' | base64 -d)\"")
    if has_key and not secret:
        raise st.ServerKeyError(f"{env} is set here but kubeflow.server_key_secret is empty: the aggregate and evaluate tasks "
                                f"would not hold the key and could not verify or sign; set kubeflow.server_key_secret (docs/deploy.md) "
                                f"or unset {env}")
    if cfg.store.signing == "required" and not secret:
        raise st.ServerKeyError("store.signing is 'required': set kubeflow.server_key_secret to the Secret holding the server key")
    if not secret and not cfg.kubeflow.client_store_secret:
        # Security: said, not refused (existing deployments keep working), but never silent.
        log.warning("kubeflow.client_store_secret and kubeflow.server_key_secret are both empty: client tasks share the "
                    "server's store credentials and nothing is signed, so a client task can rewrite plans and globals. "
                    "Set them up with `hetlora store roles` (docs/deploy.md, 'Store roles and the server key')")


class KubeflowExecutor:
    """Each round (or evaluation) is one KFP run on a Kubeflow Pipelines API server, waited for.

    The tasks get their store credentials from the Secret ``kubeflow.store_secret``; this process
    needs the store too (the runner plans and resumes from it), with credentials from its environment."""

    name, command = "Kubeflow", "hetlora submit"
    loads_model_here = False  # the tasks load the model in the cluster (RoundRunner.check_model)

    def __init__(self, cfg: HetLoRAConfig, host: str, client: Any = None, timeout_s: float = 6 * 3600,
                 poll_s: float = 10.0, wait: bool = True, log: Any = None) -> None:
        check_driver_key(cfg)
        if client is None:
            import kfp

            with warnings.catch_warnings():  # "This client only works with ... v2.0.0-beta.2 and later": console noise
                warnings.simplefilter("ignore", FutureWarning)
                client = kfp.Client(host=host, namespace=cfg.kubeflow.namespace)
        self.client, self.host, self.timeout_s, self.poll_s, self.wait = client, host.rstrip("/"), timeout_s, poll_s, wait
        self.log = log or (lambda _msg: None)
        self.on_task: Callable[[str, str], None] | None = None  # a Kubeflow run is watched as a whole
        self.run_ids: list[str] = []

    def _submit(self, cfg: HetLoRAConfig, compile_to: Any, name: str, arguments: dict[str, Any], what: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = compile_to(os.path.join(tmp, f"{name}.yaml"))
            # kfp prints "Experiment details: <link>" and "Run details: <link>" to stdout; the progress
            # line below links the run, so its prints are kept off the console.
            with contextlib.redirect_stdout(io.StringIO()):
                run = self.client.create_run_from_pipeline_package(
                    path, arguments={"config_json": cfg.to_json(), **arguments}, run_name=f"{cfg.experiment}-{name}",
                    experiment_name=cfg.kubeflow.experiment, namespace=cfg.kubeflow.namespace, enable_caching=False,
                    pipeline_root=cfg.kubeflow.pipeline_root or None)
        self.run_ids.append(run.run_id)
        link = f"{self.host}/#/runs/details/{run.run_id}"
        self.log(f"{what} submitted: {link}")
        if not self.wait:
            return
        state = wait_for_run(self.client, run.run_id, link, self.timeout_s, self.poll_s)
        if state != "SUCCEEDED":
            # Only a run that ended FAILED may have committed without a client; canceled is not done.
            raise (PipelineFailed if state == "FAILED" else RoundFailed)(f"run ended {state}: {link}")

    def run_round(self, cfg: HetLoRAConfig, plan: RoundPlan, started_at: float) -> None:
        rnd = plan.round
        self._submit(cfg, lambda p: compile_round(cfg, plan, p), st.round_name(rnd),
                     {"round_index": rnd}, f"round {rnd + 1}/{cfg.federation.rounds}")

    def evaluate(self, cfg: HetLoRAConfig, rnd: int, started_at: float = 0.0) -> None:
        self._submit(cfg, lambda p: compile_evaluate(cfg, rnd, p), f"evaluate-{rnd:04d}",
                     {"round_index": rnd, "round_started_at": started_at}, f"evaluation of round {rnd + 1}")


def run_local(cfg: HetLoRAConfig, out_dir: str | Path, verbose: bool = False, progress: bool = True,
              warm: bool | None = None, server_started: bool = False) -> dict[str, Any]:
    """Run (or resume) every round through kfp.local; results.json and the plot in ``out_dir``,
    one log file per task under ``out_dir/logs``. ``warm`` (None: ``local.warm_tasks``): the
    tasks fork from one warm task server of this run (hetlora_core/warm.py; its own log is
    ``out_dir/logs/warm-server.log``), each task's whole kfp executor included (pipelines/warm_exec.py),
    instead of importing kfp, torch and transformers each. ``server_started``: the caller already
    runs that server (``warm_exec.run_server``, entered with the same config and ``out_dir``)."""
    out = Path(out_dir).resolve()
    cfg = local_config(cfg, out)
    shown = Progress(cfg.federation.rounds) if progress else None
    executor = KfpLocalExecutor(out / "pipeline-root", out / "logs", verbose, shown.line if shown else None)
    enabled = not server_started and (cfg.local.warm_tasks if warm is None else warm)
    # Started before the first round and stopped after the last (also on an error or Ctrl-C).
    with run_server(cfg, out, enabled):
        return RoundRunner(cfg, executor, out, shown).run()


def submit_run(cfg: HetLoRAConfig, host: str, out_dir: str | Path, client: Any = None, timeout_s: float = 6 * 3600,
               poll_s: float = 10.0) -> tuple[dict[str, Any], list[str]]:
    """Drive every round on Kubeflow at ``host`` (one KFP run per round, each waited for);
    returns (results, the KFP run ids). Stops at the first failed round; rerun to resume."""
    shown = Progress(cfg.federation.rounds)
    executor = KubeflowExecutor(cfg, host, client, timeout_s, poll_s, log=shown.line)
    return RoundRunner(cfg, executor, out_dir, shown).run(), executor.run_ids


def submit_next_round(cfg: HetLoRAConfig, host: str, client: Any = None) -> str:
    """``submit --no-wait``: plan the next round and submit it without waiting; returns its run id.
    Every committed round without an evaluation gets its evaluation run (not waited for either)
    first; when every round is committed, those are all there is to submit (the last run id is
    returned). A call while an evaluation is still running submits it again: evaluating a committed
    round twice rewrites the same metrics. Round N's evaluation runs beside round N+1's tasks."""
    store = st.open_store(cfg.store)
    progress = Progress(cfg.federation.rounds)
    executor = KubeflowExecutor(cfg, host, client, wait=False, log=progress.line)
    # The same target-module check (and resolved names for the config record) as a waiting submit.
    check_or_record_config(cfg, store, RoundRunner(cfg, executor, ".", progress).check_model())
    rnd = st.last_committed_round(store, cfg.experiment) + 1
    for done in range(rnd):
        if not store.exists(st.eval_key(cfg.experiment, done)):
            executor.evaluate(cfg, done)
    if rnd >= cfg.federation.rounds:
        if executor.run_ids:
            return executor.run_ids[-1]
        raise RoundFailed(f"all {cfg.federation.rounds} rounds of {cfg.experiment} are committed and evaluated; nothing to submit")
    executor.run_round(cfg, plan_round(cfg, store, client_ids(cfg), rnd), time.time())
    return executor.run_ids[-1]
