"""`hetlora submit` through the real ``kfp.Client`` over HTTP, against an in-process stand-in of
the KFP API server's v2beta1 REST API (tests/kfp_api_server.py).

tests/test_submit_driver.py checks the driver's logic with a Python stand-in for the client; here
``submit_run`` builds the client itself from ``host`` (the production path), so what is checked is
what kfp 2.x actually puts on the wire for our calls: the experiment looked up by name and created
once in the configured namespace, one run per round carrying the compiled "hetlora-round" spec
and the runtime parameters, caching off, and the run's state read back by
````get_run`` (the driver's own wait loop). The stand-in "executes" a run by running the round in-process from the
config it received on the wire (``hetlora_core.simulate.execute_planned_round``; an evaluate-only
pipeline runs the evaluate step)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kfp
import pytest
import urllib3
from hetlora_kfp.pipelines.runners import RoundFailed
from hetlora_kfp.pipelines.runners import submit_run as _submit_run
from kfp_api_server import PREFIX, KFPAPIServer

from hetlora_core import store as st
from hetlora_core.config import config_from_dict, load_config, replace
from hetlora_core.simulate import execute_planned_round
from hetlora_core.steps.evaluate import evaluate_task

ROOT = Path(__file__).resolve().parents[1]
CREDENTIAL_VARS = ("HETLORA_S3_ACCESS_KEY", "HETLORA_S3_SECRET_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


@pytest.fixture(autouse=True)
def hermetic_kfp(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No ~/.config/kfp/context.json (it would override the namespace) and no KF_PIPELINES_*
    variables (KF_PIPELINES_OVERRIDE_EXPERIMENT_NAME would rename the experiment)."""
    monkeypatch.setattr(kfp.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp-context" / "context.json"))
    for var in ("KF_PIPELINES_ENDPOINT", "KF_PIPELINES_UI_ENDPOINT", "KF_PIPELINES_DEFAULT_EXPERIMENT_NAME",
                "KF_PIPELINES_OVERRIDE_EXPERIMENT_NAME", "KF_PIPELINES_IAP_OAUTH2_CLIENT_ID",
                "KF_PIPELINES_APP_OAUTH2_CLIENT_ID", "KF_PIPELINES_APP_OAUTH2_CLIENT_SECRET"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def secrets_in_env(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Fresh credential values in the driver's environment (the local store ignores them): none
    may reach the API server."""
    values = []
    for var in CREDENTIAL_VARS:
        values.append(f"{var.lower()}-{secrets.token_hex(12)}")
        monkeypatch.setenv(var, values[-1])
    return values


def make_cfg(tmp_path, namespace: str, experiment: str = "hetlora-rest"):
    return replace(load_config("configs/smoke.yaml"), **{
        "experiment": "submit-rest", "store.root": str(tmp_path / "store"), "federation.rounds": 2,
        "data.eval_max_tokens": 32, "kubeflow.namespace": namespace, "kubeflow.experiment": experiment})


class Backend:
    """The stand-in's ``on_run``: runs the round described by the posted config, unless told the
    round fails (then it returns False, or a state name, without running it)."""

    def __init__(self, fail: dict[Any, bool | str] | None = None) -> None:
        self.fail = fail or {}  # round index (any of its runs) or (pipeline name, round index) -> outcome
        self.rounds: list[int] = []
        self.specs: list[tuple[dict[str, Any], dict[str, Any] | None]] = []

    def __call__(self, spec: dict[str, Any], platform: dict[str, Any] | None, params: dict[str, Any]) -> bool | str:
        rnd = params["round_index"]
        self.rounds.append(rnd)
        self.specs.append((spec, platform))
        for key in (rnd, (spec["pipelineInfo"]["name"], rnd)):
            if key in self.fail:
                return self.fail[key]
        if spec["pipelineInfo"]["name"] == "hetlora-evaluate":
            evaluate_task(params["config_json"], rnd)
        else:
            execute_planned_round(config_from_dict(json.loads(params["config_json"])), rnd)
        return True


def submit_run(cfg: Any, host: str, **kw: Any) -> list[str]:
    """The driver with results going next to the run's store; returns the KFP run ids."""
    return _submit_run(cfg, host, Path(cfg.store.root).parent / "out", **kw)[1]


@pytest.fixture
def server_for() -> Iterator[Any]:
    started: list[KFPAPIServer] = []

    def start(backend: Backend, **kw: Any) -> KFPAPIServer:
        started.append(KFPAPIServer(backend, **kw).start())
        return started[-1]

    yield start
    for s in started:
        s.stop()


def all_tasks(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every task of the root DAG and of every component's DAG (ParallelFor bodies)."""
    out = {f"root/{k}": v for k, v in spec["root"]["dag"]["tasks"].items()}
    for name, comp in spec.get("components", {}).items():
        out.update({f"{name}/{k}": v for k, v in comp.get("dag", {}).get("tasks", {}).items()})
    return out


@contextlib.contextmanager
def backend_errors_shown(server: KFPAPIServer) -> Iterator[None]:
    """A run the stand-in failed because the round raised: show that traceback, not just the
    driver's RoundFailed."""
    try:
        yield
    except Exception as e:
        if server.errors:
            raise AssertionError(f"{e}\nbackend errors:\n" + "\n".join(server.errors)) from e
        raise


def free_closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_rounds_over_rest(tmp_path, server_for, secrets_in_env, capsys) -> None:
    cfg = make_cfg(tmp_path, namespace="team-a")
    backend = Backend()
    server = server_for(backend)

    with backend_errors_shown(server):
        ids = submit_run(cfg, server.url + "/", timeout_s=60)  # trailing slash: the client strips it

    assert not server.errors, server.errors
    assert backend.rounds == [0, 0, 1, 1]  # each round's run, then its evaluation's
    assert ids == list(server.runs) and len(set(ids)) == 4
    assert st.last_committed_round(st.open_store(cfg.store), cfg.experiment) == 1

    # nothing secret crossed the wire (bodies, query strings, headers)
    wire = b"".join(r.raw + json.dumps([r.path, r.query, r.headers]).encode() for r in server.requests)
    assert not [v for v in secrets_in_env if v.encode() in wire]

    # the experiment: looked up by name in the namespace before each run, created once
    created = server.calls("POST", f"{PREFIX}/experiments")
    assert [r.body for r in created] == [{"display_name": "hetlora-rest", "namespace": "team-a"}]
    exp_id = next(iter(server.experiments))
    lookups = server.calls("GET", f"{PREFIX}/experiments")
    assert len(lookups) == 4
    for r in lookups:
        assert r.query["namespace"] == ["team-a"]
        assert json.loads(r.query["filter"][0])["predicates"] == [
            {"operation": 1, "key": "display_name", "stringValue": "hetlora-rest"}]
    assert not server.calls("GET", f"{PREFIX}/healthz")  # a namespace is given: no multi-user probe

    # the runs as posted
    posted = server.posted_runs
    assert len(posted) == 4
    for i, (body, run_id) in enumerate(zip(posted, ids, strict=True)):
        rnd, kind = i // 2, ("round", "evaluate")[i % 2]
        assert body["experiment_id"] == exp_id
        assert body["display_name"] == f"submit-rest-{kind}-{rnd:04d}"
        assert "pipeline_version_reference" not in body  # inline spec, nothing uploaded
        spec, platform = body["pipeline_spec"]["pipeline_spec"], body["pipeline_spec"]["platform_spec"]
        assert spec["pipelineInfo"]["name"] == f"hetlora-{kind}"
        assert "kubernetes" in platform["platforms"]
        params = body["runtime_config"]["parameters"]
        # KFP's own default root (kubeflow.pipeline_root ""): none in the run, none in the spec.
        assert "pipeline_root" not in body["runtime_config"] and "defaultPipelineRoot" not in spec
        assert set(params) == {"config_json", "round_index"} | ({"round_started_at"} if kind == "evaluate" else set())
        assert params["round_index"] == rnd and type(params["round_index"]) is int
        if kind == "evaluate":  # the round's start: its recorded duration covers clients, aggregation and evaluation
            assert isinstance(params["round_started_at"], float) and params["round_started_at"] > 0
        sent = json.loads(params["config_json"])
        assert sent == json.loads(cfg.to_json())
        # caching off: kfp writes enable_cache=False into each root task's cachingOptions, and
        # proto3 JSON drops a false bool, so "off" is {} (no "enableCache") on the wire
        tasks = all_tasks(spec)
        assert tasks and all(t.get("cachingOptions", {}).get("enableCache") is not True for t in tasks.values()), {
            k: t.get("cachingOptions") for k, t in tasks.items()}
        assert all("cachingOptions" in t for k, t in tasks.items() if k.startswith("root/"))
        assert server.calls("GET", f"{PREFIX}/runs/{run_id}"), "run state never read"

    captured = capsys.readouterr()
    err = captured.err
    # kfp's own prints ("Experiment details: ...", "Run details: ...") and its FutureWarning stay off
    # the console: the progress lines below already link every run.
    assert "Run details" not in captured.out + err and "FutureWarning" not in err, captured
    for rnd in range(2):
        assert f"round {rnd + 1}/2 submitted: {server.url}/#/runs/details/{ids[2 * rnd]}" in err
        assert f"evaluation of round {rnd + 1} submitted: {server.url}/#/runs/details/{ids[2 * rnd + 1]}" in err


def test_failed_evaluation_run_says_the_round_is_committed_and_rerun_evaluates_it(tmp_path, server_for) -> None:
    cfg = make_cfg(tmp_path, namespace="team-a")
    backend = Backend(fail={("hetlora-evaluate", 0): False})
    server = server_for(backend)
    with pytest.raises(RoundFailed) as failed:
        submit_run(cfg, server.url, timeout_s=60)
    msg = str(failed.value)
    n = cfg.federation.rounds
    assert f"round 1/{n} evaluation run ended FAILED" in msg and f"Round 1/{n} is committed but not evaluated" in msg, msg
    assert f"rerun `hetlora submit` to evaluate it and resume at round 2/{n}" in msg, msg
    assert backend.rounds == [0, 0]
    backend.fail.clear()
    with backend_errors_shown(server):
        submit_run(cfg, server.url, timeout_s=60)
    assert backend.rounds == [0, 0, 0, 1, 1]  # round 0's evaluation again, then round 1 and its evaluation
    assert [s["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] for s in server.posted_runs][2] == "hetlora-evaluate"
    assert st.get_json(st.open_store(cfg.store), st.eval_key(cfg.experiment, 0)) is not None


def test_failed_run_names_its_link_and_rerun_resumes(tmp_path, server_for) -> None:
    cfg = make_cfg(tmp_path, namespace="kubeflow")  # the default: the client probes healthz
    backend = Backend(fail={1: False})
    server = server_for(backend)

    with pytest.raises(RoundFailed) as failed:
        submit_run(cfg, server.url, timeout_s=60)
    failed_id = list(server.runs)[2]  # round 0, its evaluation, round 1
    assert server.runs[failed_id]["state"] == "FAILED"
    assert re.search(rf"round 2/\d+ run ended FAILED: {re.escape(server.url)}/#/runs/details/{failed_id}\b",
                     str(failed.value)), str(failed.value)
    assert backend.rounds == [0, 0, 1]
    assert st.last_committed_round(st.open_store(cfg.store), cfg.experiment) == 0
    assert server.calls("GET", f"{PREFIX}/healthz")

    backend.fail.clear()
    with backend_errors_shown(server):
        ids = submit_run(cfg, server.url, timeout_s=60)
    assert backend.rounds == [0, 0, 1, 1, 1]  # round 0 not resubmitted; round 1 and its evaluation
    assert [b["runtime_config"]["parameters"]["round_index"] for b in server.posted_runs] == [0, 0, 1, 1, 1]
    assert ids == list(server.runs)[3:]
    assert all(server.runs[i]["state"] == "SUCCEEDED" for i in ids)
    assert st.last_committed_round(st.open_store(cfg.store), cfg.experiment) == 1
    # the experiment was found by name on the rerun, not created again
    assert len(server.calls("POST", f"{PREFIX}/experiments")) == 1
    assert {b["experiment_id"] for b in server.posted_runs} == set(server.experiments)
    assert not server.errors, server.errors


@pytest.mark.parametrize("namespace", ["kubeflow", "team-a"])
def test_unreachable_host_fails_fast(tmp_path, namespace) -> None:
    """Nothing listens: urllib3 (3 retries, no backoff) gives up at once. With the default
    namespace the kfp.Client constructor already fails (its healthz probe only retries
    ApiException, not connection errors); with another namespace the first call does (the
    experiment lookup). Either way the error is urllib3's MaxRetryError, not wrapped by the driver."""
    port = free_closed_port()
    cfg = make_cfg(tmp_path, namespace=namespace)
    t0 = time.monotonic()
    with pytest.raises(urllib3.exceptions.MaxRetryError) as e:
        submit_run(cfg, f"http://127.0.0.1:{port}", timeout_s=60)
    assert time.monotonic() - t0 < 20
    msg = str(e.value)
    assert f"port={port}" in msg and "Connection refused" in msg
    assert ("/apis/v2beta1/healthz" if namespace == "kubeflow" else "/apis/v2beta1/experiments") in msg


def test_canceled_run_is_reported_as_a_failed_round(tmp_path, server_for) -> None:
    """Regression: kfp.Client.wait_for_run_completion treats only succeeded/failed/skipped/error as
    final, so a run canceled in the UI was polled for timeout_s (6 h by default) and then raised a
    bare TimeoutError. The driver now polls get_run itself and knows CANCELED."""
    cfg = make_cfg(tmp_path, namespace="team-a")
    server = server_for(Backend(fail={0: "CANCELED"}))
    with pytest.raises(RoundFailed, match=r"round 1/\d+ run ended CANCELED: .*/#/runs/details/"):
        submit_run(cfg, server.url, timeout_s=600, poll_s=0.05)


def test_run_past_timeout_is_a_failed_round_with_its_link(tmp_path, server_for) -> None:
    """A run that never finishes: after --timeout the driver stops with the run's link (the run
    is left alone; rerunning resumes), instead of kfp's bare TimeoutError."""
    cfg = make_cfg(tmp_path, namespace="team-a")
    server = server_for(Backend(), running_polls=10**6)
    with pytest.raises(RoundFailed, match=r"run still RUNNING after 1 s: .*/#/runs/details/.*rerun `hetlora submit`"):
        submit_run(cfg, server.url, timeout_s=1, poll_s=0.1)


def test_cli_unreachable_host_is_a_clean_error(tmp_path) -> None:
    """`hetlora submit` against a closed port: exit 1, one line naming the host and the fix, no traceback."""
    from click.testing import CliRunner
    from hetlora_kfp.pipelines.cli import main

    port = free_closed_port()
    out = CliRunner().invoke(main, ["submit", "-c", "configs/smoke.yaml", "--host", f"http://127.0.0.1:{port}",
                                    "--set", "store.kind=s3", "--set", "store.endpoint=127.0.0.1:1",
                                    "--set", "store.retry_deadline_s=0.5", "--set", f"store.root={tmp_path}"])
    assert out.exit_code == 1, out.output
    assert "Traceback" not in out.output
    assert f"error: Kubeflow Pipelines API at http://127.0.0.1:{port} failed" in out.output
    assert "Connection refused" in out.output and "check --host" in out.output


# ---------------------------------------------------------------- resume after a kill, results.json


SUBPROCESS_TASK = r'''
import json, sys
from hetlora_core.config import config_from_dict
from hetlora_core.simulate import execute_planned_round
from hetlora_core.steps.evaluate import evaluate_task
kind, config_json, rnd = sys.argv[1], sys.argv[2], int(sys.argv[3])
if kind == "hetlora-evaluate":
    evaluate_task(config_json, rnd)
else:
    execute_planned_round(config_from_dict(json.loads(config_json)), rnd)
'''


class SubprocessBackend(Backend):
    """Runs each submitted pipeline in a fresh interpreter, with ``failpoints`` in its environment:
    a failpoint ``exit`` kills that process as a dying pod would, and the run ends FAILED."""

    def __init__(self, failpoints: str = "") -> None:
        super().__init__()
        self.failpoints, self.kinds = failpoints, []

    def __call__(self, spec: dict[str, Any], platform: dict[str, Any] | None, params: dict[str, Any]) -> bool | str:
        kind, rnd = spec["pipelineInfo"]["name"], params["round_index"]
        self.rounds.append(rnd)
        self.kinds.append(kind)
        env = {k: v for k, v in os.environ.items() if k != "HETLORA_FAILPOINTS"}
        env.update({"HETLORA_FAILPOINTS": self.failpoints} if self.failpoints else {})
        env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
        proc = subprocess.run([sys.executable, "-c", SUBPROCESS_TASK, kind, params["config_json"], str(rnd)],
                              env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
        self.last_log = proc.stderr[-3000:]
        return proc.returncode == 0


def global_shas(cfg: Any) -> list[str]:
    store = st.open_store(cfg.store)
    return [st.get_manifest(store, st.global_prefix(cfg.experiment, r))["sha256"]
            for r in range(st.last_committed_round(store, cfg.experiment) + 1)]


def comparable(results: dict[str, Any]) -> dict[str, Any]:
    """results.json without what differs between two runs of one config: timings and where the store is."""
    def strip(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if not k.endswith("_seconds") and k != "wall_seconds_this_invocation"}
        return [strip(v) for v in x] if isinstance(x, list) else x
    out = strip({k: v for k, v in results.items() if k != "store"})
    out["config"] = {k: v for k, v in out["config"].items() if k not in ("store", "kubeflow")}
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An uninterrupted submit run whose tasks run in subprocesses (the reference bytes)."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    cfg = make_cfg(tmp, namespace="team-a")
    with KFPAPIServer(SubprocessBackend()) as server:
        submit_run(cfg, server.url, timeout_s=600)
    return {"shas": global_shas(cfg), "results": json.loads((tmp / "out" / "results.json").read_text())}


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("rnd", [0, 1])
def test_submit_killed_after_commit_goes_on(rnd: int, tmp_path, server_for, uninterrupted, capsys) -> None:
    """The aggregate task of round ``rnd`` dies right after the commit: its run ends FAILED, yet the
    global is committed, so the driver says so and goes on (the round's evaluation run, then the
    rest) and ends on the uninterrupted run's bytes with a complete results.json."""
    cfg = make_cfg(tmp_path, namespace="team-a")
    backend = SubprocessBackend(f"round_committed@round={rnd}:exit")
    server = server_for(backend)
    submit_run(cfg, server.url, timeout_s=600)
    err = capsys.readouterr().err
    assert f"round {rnd + 1}: run ended FAILED: {server.url}/#/runs/details/" in err, err
    assert "committed all the same" in err, err
    assert [s["state"] for s in server.runs.values()].count("FAILED") == 1
    assert backend.kinds == ["hetlora-round", "hetlora-evaluate"] * 2, backend.kinds
    assert backend.rounds == [0, 0, 1, 1], backend.rounds
    assert global_shas(cfg) == uninterrupted["shas"]
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["baseline_ppl"] is not None and written["rounds_committed"] == 2
    assert all(r["global_ppl"] is not None and r["personal_ppl"] is not None for r in written["rounds"])
    assert comparable(written) == comparable(uninterrupted["results"])


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_submit_writes_the_same_results_as_simulate(tmp_path, server_for) -> None:
    from hetlora_core.simulate import simulate

    cfg = make_cfg(tmp_path / "submit", namespace="team-a")
    server = server_for(Backend())
    with backend_errors_shown(server):
        submit_run(cfg, server.url, timeout_s=600)
    submitted = json.loads((tmp_path / "submit" / "out" / "results.json").read_text())
    simulated = simulate(replace(cfg, **{"store.root": str(tmp_path / "sim" / "store")}), tmp_path / "sim", progress=False)
    assert (tmp_path / "submit" / "out" / "perplexity.png").is_file()
    assert submitted["rounds_committed"] == 2 and submitted["baseline_ppl"] is not None
    assert comparable(submitted) == comparable(json.loads(json.dumps(simulated)))
