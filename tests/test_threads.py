"""Torch threads per task: the cgroup quota and the affinity mask, shared by concurrent tasks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hetlora_core import threads


def test_cgroup_v2_and_v1_quotas(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert threads.cgroup_cpu_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads.cgroup_cpu_quota(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert threads.cgroup_cpu_quota(v1) == 3.0
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert threads.cgroup_cpu_quota(v1) is None
    assert threads.cgroup_cpu_quota(tmp_path / "none") is None


def test_task_threads_share_the_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    assert threads.task_threads(3, concurrent=2, cpus=16) == 3  # training.threads set: used as is
    assert threads.task_threads(0, concurrent=2, cpus=16) == 8
    assert threads.task_threads(0, concurrent=2, cpus=1.5) == 1  # never 0
    monkeypatch.setenv(threads.CONCURRENT_TASKS_ENV, "4")
    assert threads.task_threads(0, cpus=8) == 2
    monkeypatch.delenv(threads.CONCURRENT_TASKS_ENV)
    assert threads.task_threads(0, cpus=8) == 8
    monkeypatch.setenv(threads.TASK_THREADS_ENV, "3")  # a runner deciding for its tasks (bench --threads)
    assert threads.task_threads(0, cpus=8) == 3 and threads.task_threads(5, cpus=8) == 5  # the config still wins
    monkeypatch.setenv(threads.TASK_THREADS_ENV, "junk")
    assert threads.task_threads(0, cpus=8) == 8


def test_kfp_local_round_tells_model_tasks_how_many_share_the_machine(tmp_path: Path) -> None:
    """The env var is set on the kfp.local build only; the compiled (cluster) pipeline has none. A
    tier's loop runs up to two clients at once there, so a tier with several clients in the round
    shares the CPUs (2) and a tier with one client runs alone (1), as does evaluate."""
    import yaml
    from hetlora_kfp.pipelines.round import build_evaluate_pipeline, build_round_pipeline
    from kfp import compiler

    from hetlora_core.config import load_config
    from hetlora_core.steps.plan import ClientPlan, RoundPlan

    cfg = load_config("configs/smoke.yaml")
    chosen = [ClientPlan("a", "small", 2), ClientPlan("b", "large", 8), ClientPlan("c", "large", 8), ClientPlan("d", "large", 8)]
    plan = RoundPlan("smoke", 0, chosen, {p.client_id: {"rank": p.rank, "tier": p.tier} for p in chosen})
    envs: dict[int | None, dict[str, list[dict[str, str]]]] = {}
    for n in (2, None):
        envs[n] = {}
        for build in (build_round_pipeline(cfg, plan, concurrent_tasks=n),
                      build_evaluate_pipeline(cfg, 0, state=plan.state, concurrent_tasks=n)):
            compiler.Compiler().compile(build, str(tmp_path / "p.yaml"))
            spec = next(yaml.safe_load_all((tmp_path / "p.yaml").read_text()))
            envs[n].update({name: ex["container"].get("env", []) for name, ex in spec["deploymentSpec"]["executors"].items()})
    shared = {"name": threads.CONCURRENT_TASKS_ENV, "value": "2"}
    alone = {"name": threads.CONCURRENT_TASKS_ENV, "value": "1"}
    train_tasks = sorted(e for e in envs[2] if "train" in e)
    assert len(train_tasks) == 2  # 2 tiers' train loops: small (1 client), large (3 clients)
    assert [shared in envs[2][e] for e in train_tasks] == [False, True] and alone in envs[2][train_tasks[0]]
    (evaluate,) = [e for e in envs[2] if "evaluate" in e]
    assert alone in envs[2][evaluate] and shared not in envs[2][evaluate]
    assert not any(shared in env or alone in env for e, env in envs[2].items() if e not in (*train_tasks, evaluate))
    assert not any(shared in env or alone in env for env in envs[None].values())


def test_loop_share() -> None:
    from hetlora_kfp.pipelines.round import loop_share

    assert [loop_share(2, n) for n in (1, 2, 5)] == [1, 2, 2]
    assert loop_share(None, 3) is None  # the cluster: a pod's own quota counts


def test_kfp_local_runs_at_most_two_iterations_of_a_loop_at_once() -> None:
    """loop_share's premise (pipelines/round.py): kfp.local caps a ParallelFor at two workers. A kfp
    upgrade that changes the cap must change loop_share's bound too."""
    from kfp.local.orchestrator.enhanced_dag_orchestrator import ParallelExecutor

    assert ParallelExecutor().max_workers == 2 and ParallelExecutor(8).max_workers == 2


def test_bench_threads_reach_the_runs_and_do_not_outlive_the_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """`bench paper --threads N` sets the runs' thread count through the environment (spawned workers
    inherit it); a later `--threads 0` in the same process clears it instead of keeping N."""
    import torch

    from hetlora_core.bench_paper import set_threads

    monkeypatch.delenv(threads.TASK_THREADS_ENV, raising=False)
    before = torch.get_num_threads()
    try:
        set_threads(1)
        assert threads.task_threads(0, cpus=8) == 1
        set_threads(0)
        assert threads.TASK_THREADS_ENV not in os.environ and threads.task_threads(0, cpus=8) == 8
    finally:
        torch.set_num_threads(before)
