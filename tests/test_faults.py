"""Fault injection: killed drivers resume to the same bytes, store outages, failed/slow/corrupt/poisoned clients.

Kills are real process deaths: ``HETLORA_FAILPOINTS=POINT:exit`` makes the process call
``os._exit(137)`` at that point, exactly what a SIGKILL, an OOM kill or a preempted pod leaves behind.
The in-process driver (``simulate``) runs in children forked from one warm worker process (imports
and the tiny model loaded once, ~15 s), so each kill/resume pair costs seconds; every child is a
separate process that shares nothing with the killed one except the store. One test kills the
kfp.local driver (``run_local``, each task a fresh subprocess) with SIGKILL mid-round.

Every injected fault and every resume is counted into bench-out/faults-summary.json (tests/tally.py, see
docs/reliability.md): faults injected, rounds lost (committed rounds that a fault made disappear or
change: must be 0, every test asserts it), resumes, rounds redone, and runs whose final global
adapter is byte-identical to the uninterrupted run's.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from tally import Tally

from hetlora_core import store as st
from hetlora_core.adapter import LoraAdapter, init_global
from hetlora_core.config import config_from_dict
from hetlora_core.steps.aggregate import aggregate as aggregate_round
from hetlora_core.steps.aggregate import aggregate_task
from hetlora_core.steps.common import load_global
from hetlora_core.steps.plan import plan_round
from hetlora_core.strategies import ClientUpdate, aggregate

ROOT = Path(__file__).resolve().parents[1]

# Small and fast: a 1-layer, 16-wide Llama, 4 Shakespeare clients, 2 local steps. Seconds per round.
BASE: dict[str, Any] = {
    "experiment": "faults",
    "model": {"name": "tiny", "tiny_hidden": 16, "tiny_layers": 1},
    "data": {"num_clients": 4, "max_chars": 6000, "seq_len": 16, "eval_max_tokens": 16},
    "ranks": {"r_min": 2, "r_max": 8, "tiers": [{"name": "small", "rank": 2}, {"name": "medium", "rank": 4},
                                                {"name": "large", "rank": 8}]},
    "pruning": {"lam": 5.0, "gamma": 0.5},  # pruning happens, so persisted ranks are part of what must resume
    "training": {"local_steps": 2, "batch_size": 2, "lr": 0.01, "bf16": False, "threads": 1},
    "federation": {"rounds": 2, "clients_per_round": 3, "seed": 7},
}
EXP = BASE["experiment"]


def cfg_dict(**dotted: Any) -> dict[str, Any]:
    """BASE with dotted overrides, as plain data (what the worker receives)."""
    out = json.loads(json.dumps(BASE))
    for key, value in dotted.items():
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


# ---------------------------------------------------------------- the warm worker (fork per run)

WORKER = r'''
import json, os, sys, time, traceback
import torch
torch.set_num_threads(1)  # deterministic and fork-safe: no OpenMP pool in the parent
from hetlora_core import runtime
from hetlora_core.config import config_from_dict
proto, sys.stdout = sys.stdout, sys.stderr  # only protocol lines on the real stdout

def reply(obj):
    proto.write("@@" + json.dumps(obj) + "\n")
    proto.flush()

def child(job):
    fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.setsid()  # its own process group: a test may SIGKILL the driver with everything it started
    os.environ.pop("HETLORA_FAILPOINTS", None)
    os.environ.update(job.get("env", {}))
    res = {"ok": False}
    try:
        cfg = config_from_dict(job["cfg"])
        if job.get("driver") == "run_local":
            from hetlora_kfp.pipelines.runners import run_local
            out = run_local(cfg, job["out"])
        else:
            from hetlora_core.simulate import simulate
            out = simulate(cfg, job["out"], progress=False)
        res = {"ok": True, "rounds_committed": out["rounds_committed"], "rounds": out["rounds"]}
    except BaseException as e:  # reported to the test, which asserts on type and message
        res = {"ok": False, "type": type(e).__name__, "message": str(e), "traceback": traceback.format_exc()}
    with open(job["result"], "w") as f:
        json.dump(res, f)
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(0 if res["ok"] else 3)

for line in sys.stdin:
    job = json.loads(line)
    if job["op"] == "warm":
        cfg = config_from_dict(job["cfg"])
        runtime.model(cfg)
        runtime.clients(cfg)
        import hetlora_core.simulate  # noqa: F401 - loaded once (with every step), inherited by every child
        reply({"ok": True})
    elif job["op"] == "ids":
        reply({"ids": runtime.client_ids(config_from_dict(job["cfg"]))})
    elif job["op"] == "start":
        pid = os.fork()
        if pid == 0:
            child(job)
        reply({"pid": pid})
    elif job["op"] == "wait":
        deadline = time.monotonic() + job["timeout"]
        while True:
            done, status = os.waitpid(job["pid"], os.WNOHANG)
            if done:
                reply({"rc": os.waitstatus_to_exitcode(status)})
                break
            if time.monotonic() > deadline:
                os.killpg(job["pid"], 9)
                os.waitpid(job["pid"], 0)
                reply({"rc": None, "timed_out": True})
                break
            time.sleep(0.05)
'''


class Run:
    """One driver run in a forked child: ``wait()`` gives (exit code, result dict)."""

    def __init__(self, worker: Worker, pid: int, result: Path, log: Path) -> None:
        self.worker, self.pid, self.result_path, self.log_path = worker, pid, result, log

    def wait(self, timeout: float = 300) -> tuple[int | None, dict[str, Any]]:
        rc = self.worker.call({"op": "wait", "pid": self.pid, "timeout": timeout})["rc"]
        res = json.loads(self.result_path.read_text()) if self.result_path.is_file() else {}
        return rc, res

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""


class Worker:
    def __init__(self, logdir: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HETLORA_FAILPOINTS", "HETLORA_S3_"))}
        env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
        self.logdir = logdir
        self.stderr = open(logdir / "worker.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER], cwd=ROOT, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr)
        self.n = 0

    def call(self, msg: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"fault worker died: {(self.logdir / 'worker.log').read_text()[-3000:]}")
            if line.startswith("@@"):
                return json.loads(line[2:])

    def start(self, cfg: dict[str, Any], out: Path, failpoints: str = "", env: dict[str, str] | None = None,
              driver: str = "simulate") -> Run:
        self.n += 1
        out.mkdir(parents=True, exist_ok=True)
        result, log = out / f"worker-result-{self.n}.json", out / f"worker-log-{self.n}.txt"
        result.unlink(missing_ok=True)
        e = dict(env or {})
        if failpoints:
            e["HETLORA_FAILPOINTS"] = failpoints
        pid = self.call({"op": "start", "cfg": cfg, "out": str(out), "env": e, "driver": driver,
                         "result": str(result), "log": str(log)})["pid"]
        return Run(self, pid, result, log)

    def client_ids(self, cfg: dict[str, Any]) -> list[str]:
        return self.call({"op": "ids", "cfg": cfg})["ids"]

    def run(self, cfg: dict[str, Any], out: Path, failpoints: str = "", env: dict[str, str] | None = None,
            timeout: float = 300, driver: str = "simulate") -> tuple[int | None, dict[str, Any], str]:
        r = self.start(cfg, out, failpoints, env, driver)
        rc, res = r.wait(timeout)
        return rc, res, r.log

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    w = Worker(tmp_path_factory.mktemp("fault-worker"))
    try:
        w.call({"op": "warm", "cfg": cfg_dict()})
        yield w
    finally:
        w.close()


def local(out: Path) -> st.LocalStore:
    return st.LocalStore(out / "store")


def global_shas(store: st.Store, exp: str = EXP) -> list[str]:
    """sha256 of every committed global adapter, verified against its bytes (get_artifact checks it)."""
    out = []
    for rnd in range(st.last_committed_round(store, exp) + 1):
        data, man = st.get_artifact(store, st.global_prefix(exp, rnd))
        assert hashlib.sha256(data).hexdigest() == man["sha256"]
        out.append(man["sha256"])
    return out


@pytest.fixture(scope="module")
def reference(worker: Worker, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The uninterrupted run every resumed run must reproduce byte for byte."""
    out = tmp_path_factory.mktemp("reference")
    rc, res, log = worker.run(cfg_dict(), out)
    assert rc == 0 and res["ok"], log
    store = local(out)
    plans = {r: json.loads(store.get_bytes(st.plan_key(EXP, r))) for r in range(2)}
    return {"shas": global_shas(store), "rounds": res["rounds"], "out": out,
            "selected": {r: [c["client_id"] for c in p["clients"]] for r, p in plans.items()}}


# ---------------------------------------------------------------- 1. resume after a kill at every point


def _points(ref_selected: dict[int, list[str]]) -> dict[str, tuple[str, int]]:
    """failpoint spec -> (what it models, rounds committed right after the kill)."""
    c1 = ref_selected[1][1]  # a client in the middle of round 1: some uploads exist, some do not
    return {
        f"train_start@round=1@client={c1}:exit": ("client training starts", 1),
        f"train_uploaded@round=1@client={c1}:exit": ("between a client's upload and its prune", 1),
        "put_artifact_between@key=round-0001/global:exit": ("global payload written, manifest not", 1),
        "aggregate_start@round=1:exit": ("aggregation starts", 1),
        "round_committed@round=1:exit": ("after the commit, before evaluation", 2),
        "round_committed@round=0:exit": ("after round 0's commit, before its evaluation and the baseline's", 1),
    }


POINTS = ["train_start", "train_uploaded", "put_artifact_between", "aggregate_start", "round_committed@round=1",
          "round_committed@round=0"]
SLOW_POINTS = ["prune_done@round=0", "put_artifact_between@key=round-0000/global", "train_step@round=0@step=1",
               "put_artifact_between@key=round-0001/clients"]


def check_resume(worker: Worker, reference: dict[str, Any], out: Path, spec: str, committed_after_kill: int,
                 tally: Tally, driver: str = "simulate") -> None:
    rc, res, log = worker.run(cfg_dict(), out, failpoints=spec, driver=driver, timeout=900)
    tally.fault("process kill (" + spec.split("@")[0].split(":")[0] + ")")
    if driver == "simulate":
        assert rc == 137, f"the failpoint {spec} did not kill the run (rc={rc}): {res} {log[-2000:]}"
    else:  # the task subprocess died; the driver reports the failed round and how to resume
        assert rc == 3 and res["type"] == "RoundFailed", f"{spec}: rc={rc} {res} {log[-2000:]}"
        # Rounds counted from 1 as the progress display counts them: the next round is committed + 1.
        assert "rerun `hetlora run` to" in res["message"], res
        assert re.search(rf"(resume at round {committed_after_kill + 1}/\d+|to finish)\b", res["message"]), res
        if committed_after_kill and spec.startswith("round_committed"):
            assert f"Round {committed_after_kill}/" in res["message"] and "is committed but not evaluated" in res["message"], res
    store = local(out)
    assert st.last_committed_round(store, EXP) == committed_after_kill - 1, spec
    before = global_shas(store)
    assert before == reference["shas"][:len(before)], "a committed round changed"
    nxt = st.global_prefix(EXP, committed_after_kill)
    if committed_after_kill < 2:
        assert st.get_manifest(store, nxt) is None  # nothing of the interrupted round is visible
        with pytest.raises(st.NotFound, match="not committed"):
            st.get_artifact(store, nxt)
    if "put_artifact_between@key=" in spec and spec.endswith("/global:exit"):
        # The torn global: its payload is on disk without a manifest, and invisible to every reader.
        assert store.exists(f"{nxt}/adapter.safetensors")
        if committed_after_kill:
            prev = load_global(config_from_dict(cfg_dict()), store, committed_after_kill, None)
            assert hashlib.sha256(prev.to_bytes()).hexdigest() == reference["shas"][committed_after_kill - 1]
    commits = [(out / "store" / st.global_prefix(EXP, r) / st.MANIFEST).stat().st_mtime_ns for r in range(committed_after_kill)]
    rc, res, log = worker.run(cfg_dict(), out, driver=driver, timeout=900)  # the same command again, no failpoint
    tally.add("resumes")
    assert rc == 0 and res["ok"], f"resume after {spec} failed: {res.get('traceback', '')} {log[-2000:]}"
    # It resumed: committed rounds were not redone (their commits were not rewritten).
    assert commits == [(out / "store" / st.global_prefix(EXP, r) / st.MANIFEST).stat().st_mtime_ns
                       for r in range(committed_after_kill)]
    assert res["rounds_committed"] == 2
    after = global_shas(store)
    tally.add("rounds_lost", sum(1 for a, b in zip(before, after, strict=False) if a != b) + max(0, len(before) - len(after)))
    tally.add("rounds_redone", 2 - committed_after_kill)
    assert after == reference["shas"], f"resumed run after {spec} ended on different bytes"
    tally.add("runs_ending_on_reference_bytes")
    # The report is complete too: every round evaluated (round_committed kills before evaluation).
    assert [r["global_ppl"] is not None for r in res["rounds"]] == [True, True]
    assert [r["participants"] for r in res["rounds"]] == [r["participants"] for r in reference["rounds"]]
    written = json.loads((out / "results.json").read_text())
    assert written["rounds_committed"] == 2 and written["baseline_ppl"] is not None
    assert [r["global_ppl"] is not None and r["personal_ppl"] is not None for r in written["rounds"]] == [True, True]


@pytest.mark.parametrize("point", POINTS)
def test_kill_and_resume_is_bit_identical(point: str, worker: Worker, reference: dict[str, Any], tmp_path: Path,
                                          tally: Tally) -> None:
    spec, (_what, committed) = next((k, v) for k, v in _points(reference["selected"]).items() if k.startswith(point))
    check_resume(worker, reference, tmp_path, spec, committed, tally)


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("rnd", [0, 1])
def test_kfp_local_aggregate_killed_after_commit_goes_on(rnd: int, worker: Worker, reference: dict[str, Any], tmp_path: Path,
                                                        tally: Tally) -> None:
    """`hetlora run` (kfp.local): the aggregate task dies right after committing round ``rnd``. The
    task's retry (or, where it has none left, the runner: the pipeline run failed but the global is
    committed) goes on to the round's evaluation pipeline, then the rest, and the run finishes on the in-process reference's bytes with a
    complete results.json, in the same invocation."""
    rc, res, log = worker.run(cfg_dict(), tmp_path, failpoints=f"round_committed@round={rnd}:exit", driver="run_local",
                              timeout=900)
    tally.fault("process kill (round_committed)")
    assert rc == 0 and res["ok"], f"{res.get('traceback', '')} {log[-2000:]}"
    # Killed, then retried (the IR's retry policy): a retry finds the round committed.
    attempts = sorted(p.name for p in (tmp_path / "logs" / st.round_name(rnd)).glob("*aggregate-round.log"))
    assert len(attempts) >= 2, f"the aggregate task was not killed: {attempts}"
    assert res["rounds_committed"] == 2 and global_shas(local(tmp_path)) == reference["shas"]
    assert [r["global_ppl"] is not None for r in res["rounds"]] == [True, True]
    tally.add("runs_ending_on_reference_bytes")


@pytest.mark.slow
@pytest.mark.parametrize("spec", SLOW_POINTS)
def test_kill_and_resume_more_points(spec: str, worker: Worker, reference: dict[str, Any], tmp_path: Path,
                                     tally: Tally) -> None:
    committed = 0 if "round=0" in spec or "round-0000" in spec else 1
    if spec.startswith("train_step"):
        spec = spec.replace("@step", f"@client={reference['selected'][0][0]}@step")
    check_resume(worker, reference, tmp_path, spec + ":exit", committed, tally)


def test_killed_at_every_point_in_one_run(worker: Worker, reference: dict[str, Any], tmp_path: Path,
                                          tally: Tally) -> None:
    """The same run killed again and again (round 0 and round 1, every point), then finished."""
    c0, c1 = reference["selected"][0][0], reference["selected"][1][2]
    chain = [f"train_start@round=0@client={c0}", f"train_uploaded@round=0@client={c0}", f"prune_done@round=0@client={c0}",
             "put_artifact_between@key=round-0000/global", "aggregate_start@round=0", "round_committed@round=0",
             f"train_start@round=1@client={c1}", f"put_artifact_between@key=round-0001/clients/{c1}",
             "aggregate_start@round=1", "put_artifact_between@key=round-0001/global", "round_committed@round=1"]
    store = local(tmp_path)
    for spec in chain:
        before = global_shas(store) if (tmp_path / "store").is_dir() else []
        rc, _res, log = worker.run(cfg_dict(), tmp_path, failpoints=spec + ":exit")
        tally.fault("process kill (chained)")
        assert rc == 137, f"{spec}: {log[-1500:]}"
        now = global_shas(store)
        assert now[:len(before)] == before and now == reference["shas"][:len(now)], spec
    rc, res, log = worker.run(cfg_dict(), tmp_path)
    tally.add("resumes")
    assert rc == 0 and res["rounds_committed"] == 2, log[-2000:]
    assert global_shas(store) == reference["shas"]
    tally.add("runs_ending_on_reference_bytes")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_kfp_local_driver_killed_mid_round_resumes(worker: Worker, reference: dict[str, Any], tmp_path: Path,
                                                   tally: Tally) -> None:
    """SIGKILL the kfp.local driver (and the task it is running) while round 1 trains; rerun resumes at round 1."""
    cfg = cfg_dict()
    run = worker.start(cfg, tmp_path, driver="run_local")
    store = local(tmp_path)
    trigger = f"{st.round_prefix(EXP, 1)}/clients/{reference['selected'][1][0]}/trained/manifest.json"
    deadline = time.monotonic() + 600
    while not ((tmp_path / "store").is_dir() and store.exists(trigger)):
        assert time.monotonic() < deadline, f"round 1 never started: {run.log[-3000:]}"
        if run.result_path.is_file():
            pytest.fail(f"run_local ended before the kill: {run.result_path.read_text()[:3000]}")
        time.sleep(0.2)
    os.killpg(run.pid, signal.SIGKILL)  # the driver and the task subprocess it is waiting on
    tally.fault("process kill (kfp.local driver, SIGKILL)")
    rc, _ = run.wait(60)
    assert rc == -signal.SIGKILL
    assert st.last_committed_round(store, EXP) == 0
    assert global_shas(store) == reference["shas"][:1]
    rc, res = worker.start(cfg, tmp_path, driver="run_local").wait(900)
    tally.add("resumes")
    assert rc == 0 and res["ok"], res.get("traceback")
    assert res["rounds_committed"] == 2
    assert global_shas(store) == reference["shas"], "kfp.local resume differs from the in-process reference"
    tally.add("runs_ending_on_reference_bytes")
    tally.add("rounds_redone", 1)


# ---------------------------------------------------------------- 2. object-store outage (real MinIO)


def s3_cfg(minio_store_config: Any, deadline: float, rounds_: int = 2) -> dict[str, Any]:
    return cfg_dict(**{"store.kind": "s3", "store.endpoint": minio_store_config.endpoint,
                       "store.bucket": minio_store_config.bucket, "store.retry_deadline_s": deadline,
                       "federation.rounds": rounds_})


def s3_env(minio_server: Any) -> dict[str, str]:
    return {"HETLORA_S3_ACCESS_KEY": minio_server.access_key, "HETLORA_S3_SECRET_KEY": minio_server.secret_key}


def wait_for_key(store: st.Store, key: str, run: Run, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not store.exists(key):
        if run.result_path.is_file():
            pytest.fail(f"the run ended before {key} appeared: {run.result_path.read_text()[:3000]}")
        assert time.monotonic() < deadline, f"{key} never appeared: {run.log[-3000:]}"
        time.sleep(0.1)


@pytest.mark.minio
@pytest.mark.timeout(400)
def test_minio_restart_mid_round_completes_with_the_same_bytes(worker: Worker, reference: dict[str, Any],
                                                               minio_server: Any, minio_store_config: Any,
                                                               tmp_path: Path, tally: Tally) -> None:
    cfg = s3_cfg(minio_store_config, deadline=30.0)
    c = reference["selected"][1][0]
    # The client sleeps 4 s right after its upload: MinIO goes down in that window, so the prune
    # step and the other clients' downloads/uploads meet a dead endpoint and must retry.
    run = worker.start(cfg, tmp_path, failpoints=f"train_uploaded@round=1@client={c}:sleep=4", env=s3_env(minio_server))
    store = st.open_store(minio_store_config)
    wait_for_key(store, f"{st.client_prefix(EXP, 1, c)}/trained/manifest.json", run)
    minio_server.stop()
    tally.fault("object store down mid-round (restarted within the deadline)")
    try:
        time.sleep(6.0)  # the run is now retrying against a dead endpoint
        assert not run.result_path.is_file(), "the run gave up while MinIO was down (deadline 30 s)"
    finally:
        minio_server.start()
    rc, res = run.wait(300)
    assert rc == 0 and res["ok"], res.get("traceback")
    assert "retry" in run.log  # the store said it retried
    assert res["rounds_committed"] == 2
    assert global_shas(store) == reference["shas"], "an outage changed the result"
    tally.add("runs_ending_on_reference_bytes")


@pytest.mark.minio
@pytest.mark.timeout(400)
def test_minio_down_past_the_deadline_fails_clearly_and_leaves_nothing_half_done(
        worker: Worker, reference: dict[str, Any], minio_server: Any, minio_store_config: Any, tmp_path: Path,
        tally: Tally) -> None:
    cfg = s3_cfg(minio_store_config, deadline=3.0)
    # Widen the window between the global's payload and its manifest (the commit) to 5 s.
    run = worker.start(cfg, tmp_path, failpoints="put_artifact_between@key=round-0001/global:sleep=5",
                       env=s3_env(minio_server))
    store = st.open_store(minio_store_config)
    wait_for_key(store, f"{st.global_prefix(EXP, 1)}/adapter.safetensors", run)
    minio_server.stop()
    tally.fault("object store down past store.retry_deadline_s")
    try:
        rc, res = run.wait(120)
    finally:
        minio_server.start()
    # The runner words every failure the same way for every executor; the cause is named in it.
    assert rc == 3 and res["type"] == "RoundFailed" and "StoreUnavailable" in res["message"], res
    msg = res["message"]
    assert minio_store_config.endpoint in msg and "is unavailable" in msg and "retry_deadline_s=3" in msg, msg
    assert "Is the server running?" in msg
    assert st.last_committed_round(store, EXP) == 0  # round 1 not committed...
    assert st.get_manifest(store, st.global_prefix(EXP, 1)) is None  # ...its torn payload is invisible
    assert global_shas(store) == reference["shas"][:1]  # round 0 untouched
    # Once the store is back, the same command finishes the run on the same bytes.
    rc, res = worker.start(cfg, tmp_path, env=s3_env(minio_server)).wait(300)
    tally.add("resumes")
    assert rc == 0 and res["rounds_committed"] == 2, res.get("traceback")
    assert global_shas(store) == reference["shas"]
    tally.add("runs_ending_on_reference_bytes")


# ---------------------------------------------------------------- 3. failed and slow clients (real runs)


def one_round(**dotted: Any) -> dict[str, Any]:
    return cfg_dict(**{"federation.rounds": 1, "federation.clients_per_round": 4, **dotted})


def test_crashed_client_is_dropped_when_the_quorum_holds(worker: Worker, tmp_path: Path, tally: Tally) -> None:
    cfg = one_round(**{"federation.quorum": 0.75})
    ids = worker.client_ids(cfg)
    assert len(ids) == 4  # all four are selected
    bad = ids[1]
    rc, res, log = worker.run(cfg, tmp_path, failpoints=f"train_start@round=0@client={bad}:raise")
    tally.fault("client crash")
    assert rc == 0 and res["ok"], log[-3000:]
    assert f"client {bad} failed in round 0: injected fault at train_start" in log  # the task said why
    man = st.get_manifest(local(tmp_path), st.global_prefix(EXP, 0))
    assert man is not None and sorted(man["participants"]) == [c for c in ids if c != bad]
    assert list(man["dropped"]) == [bad] and "not committed" in man["dropped"][bad]
    assert res["rounds"][0]["dropped"] == man["dropped"]


def test_quorum_miss_fails_clearly_and_keeps_the_global(worker: Worker, reference: dict[str, Any], tmp_path: Path,
                                                        tally: Tally) -> None:
    shutil.copytree(reference["out"] / "store", tmp_path / "store")  # a copy of the uninterrupted run
    key = reference["out"] / "store.server.key"  # and its server key, which lies beside the store
    shutil.copy2(key, tmp_path / key.name)
    store = local(tmp_path)
    store.delete_prefix(st.round_prefix(EXP, 1))  # round 0 committed; round 1 is to be run
    before = global_shas(store)
    assert len(before) == 1
    bad = reference["selected"][1][0]
    rc, res, log = worker.run(cfg_dict(), tmp_path, failpoints=f"train_start@round=1@client={bad}:raise")
    tally.fault("client crash (quorum 1.0)")
    assert rc == 3 and res["type"] == "RoundFailed" and "QuorumError" in res["message"], res
    msg = res["message"]
    assert re.search(r"round 2/\d+ \(round-0001\): 2 valid client uploads, quorum needs 3 of 3", msg), msg
    assert "federation.quorum=1.0" in msg, msg
    assert "global adapter is unchanged" in msg and bad in msg
    assert st.last_committed_round(store, EXP) == 0 and global_shas(store) == before
    assert st.get_manifest(store, st.global_prefix(EXP, 1)) is None


def test_slow_client_passes_its_timeout_and_is_dropped(worker: Worker, tmp_path: Path, tally: Tally) -> None:
    cfg = one_round(**{"federation.quorum": 0.75, "federation.client_timeout_s": 3})
    ids = worker.client_ids(cfg)
    slow = ids[2]
    # Step 0 of the slow client takes 3.5 s: at step 1 its 3 s budget has passed.
    rc, res, log = worker.run(cfg, tmp_path, failpoints=f"train_step@round=0@client={slow}@step=0:sleep=3.5")
    tally.fault("slow client (timeout)")
    assert rc == 0 and res["ok"], log[-3000:]
    assert (f"client {slow} failed in round 0: client {slow}: 1 of 2 local steps done when "
            "federation.client_timeout_s=3 passed") in log
    r0 = res["rounds"][0]
    assert sorted(r0["participants"]) == sorted(c for c in ids if c != slow) and list(r0["dropped"]) == [slow]


# ---------------------------------------------------------------- 3b. corrupt, missing, NaN uploads (store level)

SPEC = {"layers.0.q_proj": (16, 16), "layers.0.v_proj": (8, 16)}
SCALE = 2.0


def agg_cfg(**sections: dict[str, Any]) -> Any:
    """A model-free config for store-level aggregation tests (8 clients, explicit ranks)."""
    data: dict[str, Any] = {"experiment": "agg", "model": {"lora_scale": SCALE},
                            "ranks": {"r_min": 2, "r_max": 8, "assignment": "explicit", "explicit": [2, 4, 8, 8, 4, 2, 8, 8]},
                            "data": {"num_clients": 8}, "federation": {"clients_per_round": 8, "quorum": 0.25}}
    for k, v in sections.items():
        data[k] = {**data.get(k, {}), **v}
    return config_from_dict(data)


def trained(rank: int, seed: int, spec: dict[str, tuple[int, int]] = SPEC, scale: float = SCALE) -> LoraAdapter:
    """What an honest client of rank ``rank`` sends: the global's A plus a small step, a small B."""
    g = init_global(SPEC, 8, SCALE, 0).truncate(rank)
    gen = torch.Generator().manual_seed(seed)

    def noise(*shape: int) -> Any:
        """Small float32 numpy noise (adapters are numpy) from one seeded stream."""
        return 0.01 * torch.randn(*shape, generator=gen).numpy()

    A = {m: (g.A[m] if SPEC.get(m) == spec[m] else 0) + noise(rank, spec[m][1]) for m in spec}
    B = {m: noise(spec[m][0], rank) for m in spec}
    return LoraAdapter(A, B, scale)


def upload(store: st.Store, cfg: Any, client: str, adapter: LoraAdapter | bytes, **man: Any) -> str:
    prefix = st.client_prefix(cfg.experiment, 0, client)
    data = adapter if isinstance(adapter, bytes) else adapter.to_bytes()
    st.put_artifact(store, prefix, data, {"client_id": client, "num_samples": 10, **man})
    return prefix


def test_corrupt_missing_nan_and_malformed_uploads_are_never_aggregated(tmp_path: Path, tally: Tally) -> None:
    cfg = agg_cfg(store={"root": str(tmp_path)})
    store = st.open_store(cfg.store)
    ids = [f"c{i}" for i in range(8)]
    plan = plan_round(cfg, store, ids, 0)
    ranks = {c.client_id: c.rank for c in plan.clients}
    honest = {"c0": trained(ranks["c0"], 0), "c1": trained(ranks["c1"], 1)}
    for c, a in honest.items():
        upload(store, cfg, c, a)
    # c2: checksum mismatch (bytes overwritten after the manifest was written)
    p = upload(store, cfg, "c2", trained(ranks["c2"], 2))
    raw = bytearray(store.get_bytes(p + "/adapter.safetensors"))
    raw[-5] ^= 0xFF
    store.put_bytes(p + "/adapter.safetensors", bytes(raw))
    # c3: payload without manifest (crashed between the two writes, or never committed)
    store.put_bytes(st.client_prefix(cfg.experiment, 0, "c3") + "/adapter.safetensors", trained(ranks["c3"], 3).to_bytes())
    # c4: a NaN tensor with a perfectly valid manifest and checksum
    nan = trained(ranks["c4"], 4)
    nan.B["layers.0.q_proj"][0, 0] = float("nan")
    upload(store, cfg, "c4", nan)
    # c5: num_samples 0 in its manifest (would divide by zero in sample weights)
    upload(store, cfg, "c5", trained(ranks["c5"], 5), num_samples=0)
    # c6: an extra module (not a target of the base model)
    upload(store, cfg, "c6", trained(ranks["c6"], 6, {**SPEC, "layers.0.k_proj": (16, 16)}))
    # c7: a different LoRA scale
    upload(store, cfg, "c7", trained(ranks["c7"], 7, scale=4.0))
    tally.fault("bad client upload (checksum, missing manifest, NaN, num_samples, extra module, scale)", 6)

    out = json.loads(aggregate_task(cfg.to_json(), 0, []))
    man = st.get_manifest(store, st.global_prefix(cfg.experiment, 0))
    assert man is not None and sorted(man["participants"]) == ["c0", "c1"] == sorted(out["participants"])
    reasons = man["dropped"]
    assert sorted(reasons) == ["c2", "c3", "c4", "c5", "c6", "c7"]
    assert "sha256 mismatch" in reasons["c2"]
    assert "no manifest.json" in reasons["c3"] and "not committed" in reasons["c3"]
    assert "contains NaN or Inf" in reasons["c4"] and "layers.0.q_proj.lora_B" in reasons["c4"]
    assert "num_samples must be a positive integer, got 0" in reasons["c5"]
    assert "modules or shapes differ" in reasons["c6"] and "extra ['layers.0.k_proj']" in reasons["c6"]
    assert "scale 4.0 differs from model.lora_scale 2.0" in reasons["c7"]
    for c, why in reasons.items():
        assert st.client_prefix(cfg.experiment, 0, c) in why, f"{c}: reason does not say where: {why}"
    # "Never aggregated": the global is exactly what the two honest uploads alone give.
    expect, _ = aggregate(init_global(SPEC, 8, SCALE, cfg.federation.seed),
                          [ClientUpdate(c, a, 10) for c, a in honest.items()], cfg.strategy, 8)
    assert man["sha256"] == hashlib.sha256(expect.to_bytes()).hexdigest()


def test_first_client_cannot_impose_its_modules(tmp_path: Path, tally: Tally) -> None:
    """Regression: the module set used to come from the first valid upload, so one bad client
    (first in plan order) got every honest client dropped. Round 0: the majority decides; later
    rounds: the committed global does."""
    cfg = agg_cfg(federation={"quorum": 0.25})
    store = st.LocalStore(tmp_path)
    ids = [f"c{i}" for i in range(8)]
    for rnd in (0, 1):
        plan = plan_round(cfg, store, ids, rnd)
        ranks = {c.client_id: c.rank for c in plan.clients}
        for c in ids:
            spec = {**SPEC, "layers.0.extra": (4, 4)} if c == "c0" else SPEC
            a = trained(ranks[c], rnd * 10 + int(c[1:]), spec)
            st.put_artifact(store, st.client_prefix(cfg.experiment, rnd, c), a.to_bytes(), {"num_samples": 10})
        tally.fault("client upload with extra module (first in order)")
        man = aggregate_round(cfg, store, plan)
        assert man["participants"] == ids[1:] and list(man["dropped"]) == ["c0"], (rnd, man["dropped"])
    r0 = st.get_manifest(store, st.global_prefix(cfg.experiment, 0))["dropped"]["c0"]
    assert "modules or shapes differ from the 7 upload(s) that agree: extra ['layers.0.extra']" in r0
    assert "unknown module(s) ['layers.0.extra']" in man["dropped"]["c0"]


# ---------------------------------------------------------------- 5. poisoned client (norm clipping)


def _delta_norm(a: LoraAdapter) -> float:
    return math.sqrt(sum(v * v for v in a.delta_norms().values()))


def _poisoned_round(tmp_path: Path, clip: float | None, poison: str = "B", norm_ratio: float | None = None) -> tuple[dict[str, Any], LoraAdapter]:
    """One round of three honest clients and ``evil``; the norm-ratio check is off unless asked for,
    so that clipping is what is tested."""
    cfg = agg_cfg(strategy={"clip_norm": clip, "norm_ratio": norm_ratio}, federation={"quorum": 0.75, "clients_per_round": 4},
                  ranks={"explicit": [2, 4, 8, 8]}, data={"num_clients": 4})
    store = st.LocalStore(tmp_path / f"clip-{clip}-{poison}-{norm_ratio}")
    ids = ["a", "b", "c", "evil"]
    plan = plan_round(cfg, store, ids, 0)
    for c in plan.clients:
        a = trained(c.rank, ord(c.client_id[0]))
        if c.client_id == "evil":  # a valid adapter (format, shapes, ranks, finite), with a huge update
            if poison == "B":
                a.B = {m: b * 1e5 for m, b in a.B.items()}
            else:
                a.A = {m: t * 1e5 for m, t in a.A.items()}
        upload(store, cfg, c.client_id, a)
    man = aggregate_round(cfg, store, plan)
    data, _ = st.get_artifact(store, st.global_prefix(cfg.experiment, 0))
    return man, LoraAdapter.from_bytes(data)


def test_poisoned_client_is_clipped(tmp_path: Path, tally: Tally) -> None:
    honest_cfg_norm = _delta_norm(trained(8, 1))
    man, g = _poisoned_round(tmp_path, None)
    tally.fault("poisoned client (huge-norm update), no clipping")
    assert man["clipped"] == [] and "evil" in man["participants"]
    exploded = _delta_norm(g)
    assert exploded > 1000 * honest_cfg_norm  # one client moved the global by orders of magnitude
    man, g = _poisoned_round(tmp_path, 1.0)
    tally.fault("poisoned client (huge-norm update), clip_norm=1.0")
    assert man["clipped"] == ["evil"]
    assert _delta_norm(g) <= 1.0 + 1e-6 and _delta_norm(g) < exploded / 1000


def test_poisoned_client_inflating_A_is_clipped(tmp_path: Path, tally: Tally) -> None:
    """clip_norm bounds the whole update: factor averaging averages A and B separately, so a client
    that inflates A (its B clipped, its A not) used to move the global by the cross terms with the
    other clients' B (125 for clip_norm 1.0); each factor's change is bounded too now (robust.factor_clip)."""
    man, g = _poisoned_round(tmp_path, 1.0, poison="A")
    tally.fault("poisoned client (inflated A), clip_norm=1.0")
    assert man["clipped"] == ["evil"]
    assert _delta_norm(g) <= 10.0


@pytest.mark.parametrize("poison", ["B", "A"])
def test_poisoned_client_is_dropped_by_the_default_norm_ratio(poison: str, tmp_path: Path, tally: Tally) -> None:
    """Robust aggregation by default (strategy.norm_ratio: 10): the same poisoned client, without any
    clip_norm, is dropped with a reason naming it, its norm, the median and the ratio; the global is
    what the honest clients alone give."""
    man, g = _poisoned_round(tmp_path, None, poison=poison, norm_ratio=10.0)
    tally.fault(f"poisoned client (inflated {poison}), default norm_ratio")
    assert man["participants"] == ["a", "b", "c"] and list(man["dropped"]) == ["evil"]
    why = man["dropped"]["evil"]
    assert "clients/evil" in why and "strategy.norm_ratio=10" in why and "median" in why, why
    assert "update norm per rank component" in why, why  # (A inflated with B deflated: tests/test_robust.py)
    assert _delta_norm(g) < 1.0  # the honest clients' scale, not 1e5 of it
