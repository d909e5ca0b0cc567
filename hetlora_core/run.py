"""The round loop, written once: ``RoundRunner`` sequences a whole run over an ``Executor``.

``hetlora simulate`` (in-process), ``hetlora run`` (kfp.local) and ``hetlora submit`` (Kubeflow)
are three executors of this one loop, so they resume, fail and report identically:

1. record the config in the store (resuming with a different one is refused);
2. read the last committed round from the store; evaluate any committed round that was not
   evaluated (a task killed between the commit and the evaluation), the baseline with it;
3. for every remaining round: plan it (the plan step, in this process: it is model-free), run it
   through the executor, check that it committed, evaluate it if the executor did not;
4. write ``results.json`` and the plot, and clean the run's Pushgateway groups.

Resume is the normal path: everything the loop needs is read back from the store.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from . import store as st
from .config import ConfigError, HetLoRAConfig, config_from_dict, replace
from .datasource import client_ids
from .progress import Progress
from .reporting import finish_run
from .results import collect_results, precisions, write_results
from .steps.plan import RoundPlan, plan_round


class RoundFailed(RuntimeError):
    """A round did not commit (or committed and could not be evaluated); the message says how far
    the run got and that rerunning the same command resumes it."""


class PipelineFailed(RoundFailed):
    """The round's pipeline run ended (not timed out, not canceled) with a failed task. The round may
    have committed all the same: aggregation, the exit task of the client loops, runs after client
    tasks that failed (a dropped client)."""


class RunConfigMismatch(RuntimeError):
    """The store already holds this experiment with a different configuration."""


class Executor(Protocol):
    """Runs one planned round (train -> prune per client, aggregate) and a committed round's
    evaluation somewhere: the pipelines run them as two runs (the in-process executor evaluates
    inside ``run_round``, so the runner finds the round evaluated).

    A round that fails raises ``RoundFailed`` whose message completes "round N ..." (e.g. "run
    ended FAILED: <link>"); the runner adds how far the run got and how to resume. Anything else
    (an unreachable API server, Ctrl-C) propagates unchanged."""

    name: str
    command: str  # what the user reruns to resume, e.g. "hetlora submit"
    on_task: Callable[[str, str], None] | None  # set by the runner: (kind e.g. "train small", "started"|"SUCCESS"|"FAILURE")

    def run_round(self, cfg: HetLoRAConfig, plan: RoundPlan, started_at: float) -> None:
        """Run every task of ``plan.round``."""

    def evaluate(self, cfg: HetLoRAConfig, rnd: int, started_at: float = 0.0) -> None:
        """Run only the evaluation of a committed round (and the baseline if missing): folder data,
        every client's evaluate-client task, then the evaluate step that combines their sums.
        ``started_at``: when the round started (its recorded duration; 0: unknown)."""


# Settings added with a default that differs from how runs behaved before they existed: a recorded
# config without the key ran with this value (and resumes only with it).
_BEHAVIOUR_BEFORE: dict[tuple[str, str], Any] = {("pruning", "form"): "loss", ("strategy", "norm_ratio"): None}

# Sections a resumed run may change: where and how it runs and reports, and how many rounds it has.
_MUTABLE_SECTIONS = ("federation", "metrics", "kubeflow", "store", "local")


def _same_targets(d: dict[str, Any], mine: Any, targets: tuple[str, ...] | None) -> dict[str, Any]:
    """``d`` with ``model.target_modules`` replaced by the module names this run's setting
    (``mine``) resolved to, where ``d`` says the same (that setting, or exactly those names): a run
    recorded with ``[q_proj, v_proj]`` (the old default) resumes under ``auto``."""
    tm = d.get("model", {}).get("target_modules")
    if targets is None or tm is None:
        return d
    if tm == mine or (isinstance(tm, list) and sorted(tm) == sorted(targets)):
        return {**d, "model": {**d["model"], "target_modules": sorted(targets)}}
    return d


def check_or_record_config(cfg: HetLoRAConfig, store: st.Store, targets: tuple[str, ...] | None = None) -> None:
    """Resuming with a different config would silently mix two runs: refuse, say how to fix it.
    Only the number of rounds may grow (extending a finished run is a normal resume). ``targets``:
    the module names ``model.target_modules`` resolved to (then a list equal to them is the same)."""
    key = st.config_key(cfg.experiment)
    mine = json.loads(cfg.to_json())  # JSON-normalised (tuples become lists) to compare like with like
    theirs = st.get_json(store, key)
    if theirs is not None:
        for (sec, k), before in _BEHAVIOUR_BEFORE.items():  # a setting absent from the record ran as it did then
            if isinstance(theirs.get(sec), dict) and k not in theirs[sec]:
                theirs = {**theirs, sec: {**theirs[sec], k: before}}
        try:  # fill settings added since that run was recorded with their defaults
            theirs = json.loads(config_from_dict(theirs).to_json())
        except ConfigError:
            pass  # not loadable by this version: compared as stored (and reported as different)
        tm = mine["model"]["target_modules"]
        a = {k: v for k, v in _same_targets(theirs, tm, targets).items() if k not in _MUTABLE_SECTIONS}
        b = {k: v for k, v in _same_targets(mine, tm, targets).items() if k not in _MUTABLE_SECTIONS}
        fa = {k: v for k, v in theirs.get("federation", {}).items() if k != "rounds"}
        fb = {k: v for k, v in mine["federation"].items() if k != "rounds"}
        if a != b or fa != fb:
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)) + (["federation"] if fa != fb else [])
            hint = ""
            if theirs.get("training", {}).get("bf16") is False and mine["training"]["bf16"] is None:
                # Runs recorded before model.dtype existed stored the legacy default bf16: false (float32).
                hint = "; a run recorded before model.dtype existed resumes with --set training.bf16=false"
            changed = [(f"{sec}.{k}", "null" if before is None else before)  # as YAML (and --set) spell it
                       for (sec, k), before in _BEHAVIOUR_BEFORE.items() if theirs.get(sec, {}).get(k) == before != mine[sec][k]]
            if not hint and changed:  # every such setting in one line: the hint works the first time
                hint = (f"; a run recorded before {', '.join(n for n, _ in changed)} existed (or with the old value) resumes with "
                        + " ".join(f"--set {n}={v}" for n, v in changed))
            raise RunConfigMismatch(f"{store.describe()}/{key} holds experiment {cfg.experiment!r} with a different config "
                                    f"(sections {diff}); use another experiment name or output directory to start fresh{hint}")
    st.put_json(store, key, mine)


def local_config(cfg: HetLoRAConfig, out_dir: str | Path) -> HetLoRAConfig:
    """The local store at ``store.root`` when the config sets it, else under OUT/store (an S3 store
    is left as it is): never silently elsewhere. The path is absolute because kfp.local's component
    subprocesses run in their own working directories."""
    if cfg.data.source == "folder" and not cfg.data.path.startswith("s3://"):
        cfg = replace(cfg, **{"data.path": str(Path(cfg.data.path).expanduser().resolve())})  # same reason: tasks' own cwd
    if cfg.store.kind == "local":
        root = Path(cfg.store.root).expanduser() if cfg.store.root else Path(out_dir) / "store"
        return replace(cfg, **{"store.root": str(root.resolve())})
    return cfg


class RoundRunner:
    """Drives every round of ``cfg`` through ``executor``; results go to ``out_dir``. ``progress``
    (None: silent) shows the round lines and, on a terminal, one live status line."""

    def __init__(self, cfg: HetLoRAConfig, executor: Executor, out_dir: str | Path,
                 progress: Progress | None = None) -> None:
        self.cfg, self.executor, self.out = cfg, executor, Path(out_dir)
        self.progress = progress
        self.log: Callable[[str], None] = progress.line if progress else (lambda _msg: None)
        executor.on_task = progress.task if progress else None
        self.store = st.open_store(cfg.store)

    def _committed(self) -> int:
        """Number of committed rounds (the next round to run)."""
        return st.last_committed_round(self.store, self.cfg.experiment) + 1

    def _evaluated(self, rnd: int) -> bool:
        return self.store.exists(st.eval_key(self.cfg.experiment, rnd))

    def _failure(self, rnd: int, what: str) -> RoundFailed:
        """The one wording of a failed round, whatever the executor: what happened, how far the
        run got (read back from the store), and the command that resumes it. Rounds are counted from
        1, as the progress display counts them ("round 1/2"); the store's keys count from 0."""
        cmd, n = self.executor.command, self.cfg.federation.rounds
        try:
            done, evaluated = self._committed(), self._evaluated(rnd)
        except st.StoreError as e:  # the store itself is down: say so, without masking the round's failure
            return RoundFailed(f"round {rnd + 1}/{n} {what} ({self.executor.name}). How far the run got cannot be read now "
                               f"({type(e).__name__}); rerun `{cmd}` once {self.store.describe()} answers to resume")
        where = f"{done} round(s) committed in {self.store.describe()}"
        resume = f"resume at round {done + 1}/{n}" if done < n else "finish"
        if done <= rnd:
            what += self._refusal(rnd, what)
        if done > rnd and not evaluated:
            return RoundFailed(f"round {rnd + 1}/{n} {what} ({self.executor.name}). Round {rnd + 1}/{n} is committed but not "
                               f"evaluated; {where}; rerun `{cmd}` to evaluate it and {resume}")
        return RoundFailed(f"round {rnd + 1}/{n} {what} ({self.executor.name}). {where}; rerun `{cmd}` to {resume}")

    def _refusal(self, rnd: int, what: str) -> str:
        """The aggregate step's reason for refusing round ``rnd`` (its quorum), where the failure
        itself does not say it (a Kubeflow run says only FAILED); '' if none or unreadable. The key
        is writable by any holder of the server's store role: its text is shown, capped, never parsed."""
        try:
            note = st.get_json(self.store, st.refusal_key(self.cfg.experiment, rnd), max_bytes=8192)
        except (st.StoreError, ValueError):
            return ""
        reason = note.get("reason") if isinstance(note, dict) else None
        if not isinstance(reason, str) or not reason or reason[:200] in what:
            return ""
        # Printable characters only: where clients share the server's role the text is theirs to write,
        # and terminal escapes in an error message would be theirs to play.
        return "; the aggregate step refused it: " + "".join(c if c.isprintable() else "?" for c in reason[:1000])

    def _done_without_a_client(self, rnd: int, e: RoundFailed) -> bool:
        """Whether a round whose pipeline failed committed all the same: then only client tasks
        failed (aggregation, the exit task of the client loops, ran after them and checked the
        quorum), the global's manifest names those clients in ``dropped`` and the run goes on (to the
        round's evaluation). A client that dies hard (killed, OOM, preempted after its retries) is a
        dropped client."""
        try:
            done = self._committed() > rnd
        except st.StoreError:
            return False
        if done:
            self.log(f"round {rnd + 1}: {e}; its global is committed all the same (without the failed client task(s)), "
                     "so the run goes on")
        return done

    def _evaluate(self, rnd: int, started_at: float = 0.0) -> None:
        try:
            self.executor.evaluate(self.cfg, rnd, started_at)
        except RoundFailed as e:
            raise self._failure(rnd, f"evaluation {e}") from e
        if not self._evaluated(rnd):
            raise self._failure(rnd, "evaluation finished without writing its metrics")

    def _round_line(self, rnd: int, seconds: float) -> str:
        exp, sc = self.cfg.experiment, self.cfg.store
        ev = st.signing.get_signed_json(self.store, sc, st.eval_key(exp, rnd), "eval", exp, rnd) or {}
        man = st.signing.get_global_manifest(self.store, sc, exp, rnd) or {}
        pruned = [f"{c} {r['rank_before']}->{r['rank_after']}" for c, r in man.get("client_reports", {}).items() if r.get("pruned")]
        dropped = man.get("dropped", {})
        return (f"round {rnd + 1}/{self.cfg.federation.rounds} committed in {seconds:.1f} s: held-out perplexity "
                f"{ev['global']['ppl']:.2f} (own rank {ev['personal']['ppl']:.2f}); "
                f"{len(man.get('participants', []))} clients" + (f", {len(dropped)} dropped" if dropped else "")
                + (f"; pruned: {', '.join(pruned)}" if pruned else ""))

    def check_model(self) -> tuple[str, ...] | None:
        """The module names ``model.target_modules`` resolves to (None: not known here). Rejects a
        ``model.target_modules`` the model lacks (and, where the model is loaded in
        this machine's executors, a hub id that cannot be had) before anything is recorded or any
        client trains: ``ConfigError``/``ModelError`` naming the field and the fix. Cheap: the model
        is built on the meta device. Kubeflow's tasks load the model in the cluster, so there the
        driver neither downloads it nor insists on seeing it."""
        if self.cfg.strategy.name == "full_ft":  # trains every weight: target_modules unused
            return None
        from .targets import check_model

        here = getattr(self.executor, "loads_model_here", True)
        names = check_model(self.cfg.model, download=here)
        if names is None and here:
            from .model_source import model_folder

            model_folder(self.cfg.model.name)  # raises the one-line ModelError saying how to provide it
        elif names is None:
            self.log(f"model {self.cfg.model.name} is not in this machine's Hugging Face cache: its target modules are "
                     "checked when the first task loads it")
        return names

    def _log_precision(self, rnd: int) -> None:
        man = st.signing.get_global_manifest(self.store, self.cfg.store, self.cfg.experiment, rnd) or {}
        rounds = [{"clients": man.get("client_reports", {})}]
        for p in precisions(rounds):
            self.log(f"precision: {p['device']} {p['dtype']}" + (f" ({p['quantize']})" if p.get("quantize", "none") != "none" else "")
                     + f": {p['reason']}")

    def run(self) -> dict[str, Any]:
        if not getattr(self.executor, "local_key", False):  # Kubeflow: the key comes from this environment
            return self._run()
        # Local drivers (simulate, kfp.local) sign server state with a key of their own output directory
        # (store/signing.py): a run already recorded without one (before signing existed) stays unsigned.
        fresh = not self.store.exists(st.config_key(self.cfg.experiment))
        with st.signing.local_server_key(self.cfg.store, self.out, fresh) as source:
            if not source:
                self._refuse_unsigned_resume_of_signed_state()
                self.log(f"{self.cfg.experiment} was recorded without a server key: its state stays unsigned")
            return self._run()

    def _refuse_unsigned_resume_of_signed_state(self) -> None:
        """Security: no key was found, yet the newest committed global is signed. Going on would read
        signed state unchecked and write unsigned rounds into a signed history: say where the key is
        expected instead."""
        exp = self.cfg.experiment
        last = st.last_committed_round(self.store, exp)
        man = st.get_manifest(self.store, st.global_prefix(exp, last)) if last >= 0 else None
        if man is not None and st.signing.FIELD in man:
            where = st.signing.local_key_path(self.cfg.store, self.out)
            raise st.ServerKeyError(f"{exp}: its state is signed, but no server key was found (neither "
                                    f"${self.cfg.store.server_key_env} nor {where}): resume with the key it was signed "
                                    f"with (export {self.cfg.store.server_key_env} or put it back at {where})")

    def _run(self) -> dict[str, Any]:
        cfg, store = self.cfg, self.store
        check_or_record_config(cfg, store, self.check_model())
        t0 = time.perf_counter()
        done = self._committed()
        if done:
            # Security: the round to resume at comes from the newest global manifest: verify it is the
            # server's (ForgedState naming the key for a forged or replayed one) before trusting it.
            st.signing.get_global_manifest(store, cfg.store, cfg.experiment, done - 1)
            self.log(f"resuming {cfg.experiment}: {done} round(s) committed in {store.describe()}")
        for rnd in range(done):  # a task killed between commit and evaluation leaves a round unevaluated
            if not self._evaluated(rnd):
                self.log(f"round {rnd + 1} is committed but not evaluated: evaluating it")
                self._evaluate(rnd)
        ids = client_ids(cfg)
        for rnd in range(done, cfg.federation.rounds):
            started, t = time.time(), time.perf_counter()
            plan = plan_round(cfg, store, ids, rnd)
            tiers = ", ".join(f"{tier}: {len(c)}" for tier, c in plan.by_tier().items())
            self.log(f"round {rnd + 1}/{cfg.federation.rounds}: {len(plan.clients)} clients ({tiers}) [{self.executor.name}]")
            if self.progress:
                self.progress.round_started(rnd, {t: len(c) for t, c in plan.by_tier().items()})
            try:  # the round's tasks, then its evaluation's: one round on the progress display
                try:
                    self.executor.run_round(cfg, plan, started)
                except RoundFailed as e:
                    if not (isinstance(e, PipelineFailed) and self._done_without_a_client(rnd, e)):
                        raise self._failure(rnd, str(e)) from e
                if self._committed() <= rnd:
                    raise self._failure(rnd, "finished without committing its global")
                if not self._evaluated(rnd):  # pipelines: always (evaluation is a run of its own); in-process: done
                    self._evaluate(rnd, started)
            finally:
                if self.progress:
                    self.progress.round_finished()
            self.log(self._round_line(rnd, time.perf_counter() - t))
            if rnd == done:  # once per run: what the train tasks chose (model.device/dtype "auto")
                self._log_precision(rnd)
        results = collect_results(cfg, store)
        results["wall_seconds_this_invocation"] = time.perf_counter() - t0
        write_results(results, self.out)
        finish_run(cfg, results)
        return results


def summary_line(results: dict[str, Any], out: Path) -> str:
    """One line for the end of a run: rounds, perplexity before -> after, where the results are."""
    last = results["rounds"][-1] if results["rounds"] else {}
    base, final = results.get("baseline_ppl"), last.get("global_ppl")
    ppl = f"{base:.2f} -> {final:.2f}" if base is not None and final is not None else "n/a"
    return f"{results['rounds_committed']} rounds committed; held-out perplexity {ppl}; results: {out / 'results.json'}"
