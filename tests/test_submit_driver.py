"""The Kubeflow driver (`hetlora submit`) against a stand-in KFP client. No KFP backend can run
here (no Docker, no cluster), so the stand-in plays the backend: it checks the compiled package it
is given and executes the round with the same task functions the components call."""

from __future__ import annotations

import re
import types

import pytest
import yaml
from hetlora_kfp.pipelines.runners import RoundFailed, submit_run

from hetlora_core import store as st
from hetlora_core.config import load_config, replace
from hetlora_core.simulate import execute_planned_round
from hetlora_core.steps.evaluate import evaluate_task


class StandInKFP:
    def __init__(self, cfg, fail_round: int | None = None):
        self.cfg, self.fail_round, self.runs, self.evals = cfg, fail_round, [], []
        self.roots: list[str | None] = []
        self.failed: set[int] = set()

    def create_run_from_pipeline_package(self, path, arguments, run_name, experiment_name, namespace, enable_caching,
                                         pipeline_root):
        spec, platform = yaml.safe_load_all(open(path).read())
        # KFP 2.17's backend takes a run's root from the run only: a configured root goes with every run.
        assert pipeline_root == (self.cfg.kubeflow.pipeline_root or None)
        assert spec.get("defaultPipelineRoot") == pipeline_root
        self.roots.append(pipeline_root)
        kind = spec["pipelineInfo"]["name"]
        assert kind in ("hetlora-round", "hetlora-evaluate") and "kubernetes" in platform["platforms"]
        assert enable_caching is False and run_name.startswith(self.cfg.experiment)
        rnd = arguments["round_index"]
        if kind == "hetlora-evaluate":  # what the evaluate pipeline runs
            self.evals.append(rnd)
            evaluate_task(self.cfg.to_json(), rnd, arguments["round_started_at"])
            return types.SimpleNamespace(run_id=f"eval-{rnd}")
        self.runs.append(rnd)
        if rnd != self.fail_round:
            try:
                execute_planned_round(self.cfg, rnd)
            except Exception:  # noqa: BLE001 - a step failed: the run ends FAILED, as on Kubeflow (only its state is seen)
                self.failed.add(rnd)
        return types.SimpleNamespace(run_id=f"run-{rnd}")

    def get_run(self, run_id):
        rnd = int(run_id.split("-")[1])
        failed = run_id.startswith("run-") and (rnd == self.fail_round or rnd in self.failed)
        return types.SimpleNamespace(state="FAILED" if failed else "SUCCEEDED")


@pytest.fixture
def cfg(tmp_path):
    return replace(load_config("configs/smoke.yaml"), **{
        "experiment": "submit", "store.root": str(tmp_path / "store"), "federation.rounds": 2,
        "data.eval_max_tokens": 32})


def test_submit_drives_every_round_and_resumes(cfg, tmp_path):
    client = StandInKFP(cfg)
    _, ids = submit_run(cfg, "http://kfp.example", tmp_path / "out", client=client)
    assert ids == ["run-0", "eval-0", "run-1", "eval-1"] and client.runs == [0, 1] and client.evals == [0, 1]
    assert st.last_committed_round(st.open_store(cfg.store), "submit") == 1
    more = replace(cfg, **{"federation.rounds": 3})
    client2 = StandInKFP(more)
    assert submit_run(more, "http://kfp.example", tmp_path / "out", client=client2)[1] == ["run-2", "eval-2"]  # resumes at round 2


def test_a_configured_pipeline_root_goes_with_every_run(cfg, tmp_path):
    one = replace(cfg, **{"federation.rounds": 1, "kubeflow.pipeline_root": "minio://mlpipeline/hetlora"})
    client = StandInKFP(one)
    submit_run(one, "http://kfp.example", tmp_path / "out", client=client)
    assert client.roots == ["minio://mlpipeline/hetlora"] * 2  # the round's run and its evaluation's
    client = StandInKFP(cfg)
    submit_run(cfg, "http://kfp.example", tmp_path / "out2", client=client)
    assert client.roots == [None] * 2  # KFP's own default root (round 2 and its evaluation: round 1 is committed)


def test_a_refused_round_says_why_though_kubeflow_says_only_failed(cfg, tmp_path, monkeypatch):
    """On Kubeflow the driver sees a run's state, not its tasks' errors: the aggregate step leaves its
    refusal in the store and the failure message carries it."""
    strict = replace(cfg, **{"federation.quorum": 1.0})
    monkeypatch.setenv("HETLORA_FAILPOINTS", "train_start@round=0:raise")  # every client of round 1 fails
    with pytest.raises(RoundFailed) as failed:
        submit_run(strict, "http://kfp.example", tmp_path / "out", client=StandInKFP(strict))
    msg = str(failed.value)
    assert re.search(r"round 1/\d+ run ended FAILED: \S+; the aggregate step refused it: round 1/\d+ \(round-0000\): 0 valid client uploads, "
                     r"quorum needs (\d+) of \1 \(federation.quorum=1.0\)", msg), msg
    assert "(artifact not committed)" in msg and "0 round(s) committed" in msg, msg
    store = st.open_store(strict.store)
    st.put_json(store, st.refusal_key(strict.experiment, 0), {"round": 0, "reason": "x\x1b[2Jy" + "z" * 5000})
    with pytest.raises(RoundFailed) as failed:  # a note written by someone else: shown capped, escapes neutralised
        submit_run(strict, "http://kfp.example", tmp_path / "out", client=StandInKFP(strict, fail_round=0))
    assert "refused it: x?[2Jy" + "z" * 994 + " (Kubeflow)" in str(failed.value) and "\x1b" not in str(failed.value)
    monkeypatch.delenv("HETLORA_FAILPOINTS")
    submit_run(strict, "http://kfp.example", tmp_path / "out", client=StandInKFP(strict))  # the rerun commits...
    assert st.get_json(st.open_store(strict.store), st.refusal_key(strict.experiment, 0)) is None  # ...and clears it


def test_submit_stops_on_failure_with_the_run_link(cfg, tmp_path):
    client = StandInKFP(cfg, fail_round=0)
    with pytest.raises(RoundFailed, match=r"round 1/\d+ run ended FAILED: http://kfp.example/#/runs/details/run-0"):
        submit_run(cfg, "http://kfp.example", tmp_path / "out", client=client)
    assert client.runs == [0]


def test_no_wait_submits_only_the_next_round(cfg):
    from hetlora_kfp.pipelines.runners import submit_next_round

    client = StandInKFP(cfg)
    assert submit_next_round(cfg, "http://kfp.example", client=client) == "run-0"
    assert client.runs == [0] and client.evals == []  # submitted (the stand-in ran it) and not waited for
    assert submit_next_round(cfg, "http://kfp.example", client=client) == "run-1"  # the next one
    assert client.evals == [0], "round 0's evaluation went with it"
    assert submit_next_round(cfg, "http://kfp.example", client=client) == "eval-1"  # the last round's evaluation
    with pytest.raises(RoundFailed, match="all 2 rounds of submit are committed and evaluated"):
        submit_next_round(cfg, "http://kfp.example", client=client)


def test_no_wait_plans_folder_data_with_the_folder_client_ids(cfg, tmp_path):
    """`submit --no-wait` lists clients as every driver does (datasource), not as Shakespeare roles."""
    from hetlora_kfp.pipelines.runners import submit_next_round

    from hetlora_core.steps.plan import load_plan

    data = tmp_path / "clients"
    for c in ("alice", "bob", "carol"):
        (data / c).mkdir(parents=True)
        (data / c / "train.jsonl").write_text("".join(f'{{"text": "line {i} of {c}: to be or not to be"}}\n' for i in range(40)))
    fcfg = replace(cfg, **{"data.source": "folder", "data.path": str(data), "data.num_clients": 3,
                           "federation.clients_per_round": 2, "federation.rounds": 1})
    submit_next_round(fcfg, "http://kfp.example", client=StandInKFP(fcfg))
    plan = load_plan(fcfg, st.open_store(fcfg.store), 0)
    assert {c.client_id for c in plan.clients} <= {"alice", "bob", "carol"} and len(plan.clients) == 2
