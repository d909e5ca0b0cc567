"""The bench's GPU profile machinery, checked on the CPU at tiny size (CI has no GPU): the worker
pool and its deadline, a broken run that does not lose the others, the report rebuilt from runs
brought back from another machine, the next-speech task with ROUGE-L, and the claim verdicts."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from hetlora_core import bench_paper as bp
from hetlora_core.bench_jobs import Job, run_jobs
from hetlora_core.bench_task import task_overrides
from hetlora_core.claims import claims
from hetlora_core.config import replace


def _jobs(tmp: Path, methods: list[str], seeds: int = 1, profile: str = "gpu-tiny") -> list[Job]:
    base = bp.base_config(profile)
    return bp._jobs(profile, base, bp.PROFILES[profile], methods, seeds, tmp)


def test_gpu_profile_has_the_papers_shape() -> None:
    b = bp.base_config("gpu")
    assert (b.ranks.r_min, b.ranks.r_max) == (5, 50) and sorted(t.rank for t in b.ranks.tiers) == [5, 10, 25, 50]
    assert (b.training.local_steps, b.training.batch_size) == (5, 8)
    assert b.federation.rounds >= 20 and 5 <= b.federation.clients_per_round <= 10 and b.data.num_clients >= 20
    assert b.model.name == "smollm2-135m" and b.model.device == "auto" and b.model.dtype == "auto" and b.training.bf16 is None
    assert bp.PROFILES["gpu"]["seeds"] == 3


def test_job_order_seed_by_seed_full_ft_first_in_each(tmp_path: Path) -> None:
    jobs = _jobs(tmp_path, ["hetlora", "full_ft", "homlora_rmin"], seeds=2)
    order = [(j.meta["method"], j.meta["seed"]) for j in jobs]
    assert order == [("full_ft", 0), ("hetlora", 0), ("homlora_rmin", 0), ("full_ft", 1), ("hetlora", 1), ("homlora_rmin", 1)]
    assert len({j.run_dir for j in jobs}) == len(jobs)


def test_deadline_skips_runs_not_started(tmp_path: Path) -> None:
    logs: list[str] = []
    recs, missing = run_jobs(_jobs(tmp_path, ["hetlora", "homlora_rmin"]), 1, logs.append, deadline=time.time() - 1)
    assert recs == [] and len(missing) == 2 and all("deadline" in m for m in missing)
    assert not list(tmp_path.rglob("bench.json"))


def test_a_broken_run_is_reported_and_the_others_finish(tmp_path: Path) -> None:
    jobs = _jobs(tmp_path, ["hetlora", "homlora_rmin"])
    jobs[0].run_dir.parent.mkdir(parents=True)
    jobs[0].run_dir.write_text("not a folder")  # the run cannot create its store here
    logs: list[str] = []
    recs, missing = run_jobs(jobs, 1, logs.append)
    assert [r["method"] for r in recs] == ["homlora_rmin"]
    assert len(missing) == 1 and missing[0].startswith("hetlora seed 0: failed") and str(jobs[0].run_dir) in missing[0]


@pytest.mark.slow
def test_workers_and_report_rebuilt_elsewhere(tmp_path: Path) -> None:
    """Two spawned workers give the same numbers as one process; ``--no-run`` rebuilds the report
    from the finished runs with the machine facts recorded where they ran."""
    out1, out2 = tmp_path / "one", tmp_path / "two"
    methods = ["hetlora", "homlora_rmax"]
    r1 = bp.run_paper("gpu-tiny", out1, out1 / "r.md", methods, seeds=1, log=lambda s: None)
    r2 = bp.run_paper("gpu-tiny", out2, out2 / "r.md", methods, seeds=1, log=lambda s: None, workers=2)
    for a, b in zip(r1["records"], r2["records"], strict=True):
        assert a["method"] == b["method"]
        assert [x["global_ppl"] for x in a["rounds"]] == pytest.approx([x["global_ppl"] for x in b["rounds"]], rel=1e-5)
    meta = next(out2.glob("bench-meta-*.json"))
    saved = json.loads(meta.read_text())
    assert saved["machine"]["workers"] == 2 and saved["wall_seconds"] > 0
    saved["machine"].update(gpu="Some Accelerator X1", gpu_memory_gib=80.0)  # as if the runs had come back from a GPU box
    meta.write_text(json.dumps(saved))
    (out2 / "r.md").unlink()
    again = bp.run_paper("gpu-tiny", out2, out2 / "r.md", methods, seeds=2, log=lambda s: None, run=False)
    text = (out2 / "r.md").read_text()
    assert "Some Accelerator X1" in text and "shared by 2 worker processes" in text
    assert len(again["records"]) == 2 and len(again["meta"]["missing"]) == 2  # seed 1 never ran: listed, not run
    assert "2 of 4 planned runs are missing" in text and "## The paper's claims" in text


def test_next_speech_task_exports_once_and_reports_rouge(tmp_path: Path) -> None:
    base = bp.base_config("tiny")
    logs: list[str] = []
    ov = task_overrides("next-speech", base, tmp_path, logs.append)
    folder = Path(ov["data.path"])
    assert ov["data.source"] == "folder" and ov["data.format"] == "prompt_completion"
    ids = sorted(p.name for p in folder.iterdir() if p.is_dir())
    assert len(ids) == base.data.num_clients
    first = json.loads((folder / ids[0] / "train.jsonl").read_text().splitlines()[0])
    assert set(first) == {"prompt", "completion"} and first["prompt"].split(":", 1)[0].isupper()
    stamp = (folder / ".complete").stat().st_mtime_ns
    assert task_overrides("next-speech", base, tmp_path, logs.append) == ov and (folder / ".complete").stat().st_mtime_ns == stamp
    elsewhere = task_overrides("next-speech", base, tmp_path / "copied", logs.append)  # e.g. runs brought back from a GPU box
    assert elsewhere["data.path"] != ov["data.path"]
    assert bp.config_hash(replace(base, **ov)) == bp.config_hash(replace(base, **elsewhere))
    with pytest.raises(ValueError, match="unknown bench task"):
        task_overrides("reddit", base, tmp_path, logs.append)
    res = bp.run_paper("tiny", tmp_path, tmp_path / "r.md", ["homlora_rmin"], seeds=1, log=logs.append, task="next-speech")
    rl = [x["rouge_l"] for x in res["records"][0]["rounds"]]
    assert all(v is not None and 0.0 <= v <= 1.0 for v in rl)
    text = (tmp_path / "r.md").read_text()
    assert "task `next-speech`" in text and "| ROUGE-L |" in text


def _summary(final: dict[str, list[float]], base: float = 100.0, curves: dict[str, list[list[float]]] | None = None) -> dict:
    S = {}
    for m, xs in final.items():
        cs = (curves or {}).get(m) or [[base, (base + x) / 2, x] for x in xs]
        S[m] = {"final": dict(enumerate(xs)), "seeds": list(range(len(xs))), "curves": cs, "base_ppl": base}
    return S


def test_claim_verdicts_follow_the_numbers() -> None:
    S = _summary({"hetlora": [50.0, 51.0, 52.0], "homlora_rmin": [60.0, 61.5, 62.0], "homlora_rmax": [50.5, 50.0, 52.5],
                  "recon_svd": [45.0, 46.0, 47.0], "full_ft": [48.0, 49.0, 50.0]},
                 curves={"hetlora": [[100.0, 58.0, 50.0], [100.0, 59.0, 51.0], [100.0, 61.0, 52.0]]})
    v = {r["claim"]: r["verdict"] for r in claims(S)}
    assert v["HetLoRA beats HomLoRA r_min"] == "holds"
    assert v["HetLoRA beats HomLoRA r_max"].startswith("not shown")
    assert v["HetLoRA beats Recon+SVD (FlexLoRA)"] == "reversed"
    assert v["HetLoRA within reach of full fine-tuning (>= 90% of its gain)"] == "holds"  # 50/52 .. 48/50 of the gain
    assert v["HetLoRA converges faster than HomLoRA r_min"] == "holds"  # reaches r_min's final a round earlier, every seed
    one = claims(_summary({"hetlora": [50.0], "homlora_rmin": [60.0]}))
    assert one[0]["verdict"].startswith("not shown (one seed")


def test_runs_that_cannot_finish_before_the_stop_are_not_started(tmp_path: Path) -> None:
    """With a stop time, a method whose earlier runs (e.g. from the last device call) took longer
    than the time left is not started; a method never timed keeps the general deadline."""
    jobs = _jobs(tmp_path, ["hetlora", "homlora_rmin"], seeds=2)
    done = next(j for j in jobs if j.meta["method"] == "hetlora" and j.meta["seed"] == 0)
    done.run_dir.mkdir(parents=True)
    (done.run_dir / "bench.json").write_text(json.dumps({"method": "hetlora", "wall_seconds": 100.0}))
    stop = time.time() + 60
    fitted = bp._fit_to_stop(jobs, stop, tmp_path)
    by = {(j.meta["method"], j.meta["seed"]): j for j in fitted}
    assert by[("hetlora", 1)].deadline == pytest.approx(stop - 100) and by[("homlora_rmin", 1)].deadline is None
    logs: list[str] = []
    recs, missing = run_jobs([by[("hetlora", 1)]], 1, logs.append, deadline=None)  # no general deadline: its own one
    assert recs == [] and missing == ["hetlora seed 1: not started (deadline)"]


def test_claims_without_a_common_seed_say_so() -> None:
    """Partial benches (a deadline, a failed run) can leave two methods with disjoint seeds."""
    S = _summary({"hetlora": [50.0], "homlora_rmin": [60.0], "full_ft": [45.0]})
    S["homlora_rmin"]["final"] = {1: 60.0}
    S["homlora_rmin"]["seeds"] = [1]
    S["full_ft"]["final"] = {2: 45.0}
    S["full_ft"]["seeds"] = [2]
    rows = {r["claim"].split(" (")[0]: r for r in claims(S)}
    assert rows["HetLoRA beats HomLoRA r_min"]["verdict"] == "not shown (no seed in common)"
    assert rows["HetLoRA converges faster than HomLoRA r_min"]["verdict"] == "not shown (no seed in common)"
    assert rows["HetLoRA within reach of full fine-tuning"]["verdict"] == "not shown (no seed in common)"


@pytest.mark.parametrize("verbose", [False, True])
def test_bench_workers_quiet_the_libraries_unless_verbose(verbose: bool) -> None:
    """A spawned worker starts with fresh warning filters: its init must quiet the libraries as the
    parent's console is (transformers' FutureWarning once per client training filled the bench log)."""
    import subprocess
    import sys

    code = ("import warnings; from hetlora_core.bench_jobs import _worker_init; "
            f"_worker_init(0, {verbose}, workers=2); warnings.warn('noisy library', FutureWarning); "
            "from transformers.utils import logging as l; print(l.is_progress_bar_enabled()); "
            "from hetlora_core.threads import task_threads; print(task_threads(0, cpus=4))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={k: v for k, v in os.environ.items() if not k.startswith("HETLORA_")})
    assert ("noisy library" in p.stderr) is verbose
    # and each of 2 workers' runs takes half the CPUs, not all of them (oversubscribed before)
    assert p.stdout.split() == [str(verbose), "2"]
