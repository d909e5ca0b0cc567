"""`hetlora bench paper` end to end on the tiny profile: every method runs through the real
simulate path, the report is well formed, the plots are real PNGs, and a rerun resumes.
Numbers are not asserted (the tiny model is random); the code path is."""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from PIL import Image

from hetlora_core import bench_cli
from hetlora_core import bench_paper as bp
from hetlora_core.report import SECTIONS

# One short sweep stage keeps CI fast; the full stage list runs in `hetlora bench sweep`.
TINY_SWEEP = [("training.lr", [1e-3, 1e-2])]


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench")
    logs: list[str] = []
    mp = pytest.MonkeyPatch()
    mp.setattr(bp, "SWEEP", TINY_SWEEP)
    try:
        res = bp.run_paper("tiny", out, out / "docs" / "results.md", sweep=True, command="hetlora bench paper --profile tiny",
                           log=logs.append)
    finally:
        mp.undo()
    return {"out": out, "report": out / "docs" / "results.md", "res": res, "logs": logs}


def test_every_method_ran_once_per_seed(bench):
    recs = bench["res"]["records"]
    assert sorted(r["method"] for r in recs) == sorted(bp.METHODS)
    for r in recs:
        run_dirs = list((bench["out"] / "runs" / r["method"]).glob("seed0-*"))
        assert len(run_dirs) == 1 and (run_dirs[0] / "bench.json").is_file()
        assert len(r["rounds"]) == r["config"]["federation"]["rounds"]
        assert all(x["global_ppl"] is not None for x in r["rounds"])


def test_methods_are_overrides_of_one_base():
    base = bp.base_config("tiny")
    cfgs = {m: bp.method_config(base, m, 0, bp.PROFILES["tiny"]) for m in bp.METHODS}
    assert cfgs["homlora_rmin"].ranks.r_max == cfgs["homlora_rmin"].ranks.r_min == base.ranks.r_min
    assert cfgs["homlora_rmax"].ranks.r_max == base.ranks.r_max and cfgs["homlora_rmax"].strategy.name == "homlora"
    assert not cfgs["hetlora_noprune"].pruning.enabled and not cfgs["hetlora_nosparsity"].strategy.sparsity_weights
    assert cfgs["full_ft"].training.lr == bp.PROFILES["tiny"]["full_ft_lr"]
    # everything not named by a method's overrides is shared: same data, steps, rounds, seed
    for c in cfgs.values():
        assert (c.data, c.federation, c.model) == (base.data, base.federation, base.model)
        assert (c.training.local_steps, c.training.batch_size) == (base.training.local_steps, base.training.batch_size)


def test_report_is_well_formed(bench):
    text = bench["report"].read_text()
    for s in SECTIONS:
        assert s in text, s
    assert "hetlora bench paper --profile tiny" in text and "CPUs:" in text
    table = text.split("## Results", 1)[1].split("## The paper's claims", 1)[0]
    rows = [ln for ln in table.splitlines() if ln.startswith("| ") and not ln.startswith("| method")]
    assert sorted(r.split("|")[1].strip() for r in rows) == sorted(label for label, _ in bp.METHODS.values())
    assert "Settings chosen by the sweep" in text and "training.lr" in text
    assert "HetLoRA vs HomLoRA r_min" in text and "Observed order" in text and "HetLoRA vs HetLoRA w/o pruning" in text
    for png in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        path = bench["report"].parent / png
        with Image.open(path) as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] > 100
    assert {p.name for p in (bench["report"].parent / "results").glob("*.png")} >= {
        "perplexity.png", "ranks.png", "bytes.png", "params.png"}


def test_each_run_names_its_machine_and_the_report_lists_them(bench):
    """A report can join runs of several device calls (another card, a continuation): each record
    names where it ran, and the report counts runs per machine instead of trusting one meta file."""
    recs = bench["res"]["records"]
    assert all(r["machine"]["cpu"] and "torch" in r["machine"] for r in recs)
    text = bench["report"].read_text()
    cpu = recs[0]["machine"]["cpu"]
    line = next(ln for ln in text.splitlines() if ln.startswith("- Machines, per run record:"))
    assert line.startswith(f"- Machines, per run record: CPU {cpu}: {len(recs)} run(s) (") and "HetLoRA 1," in line
    assert "Resumed after a stopped call" not in text and "*" not in text.split("## Results")[1].split("Own-rank")[0]


def test_machines_of_mixed_records_are_counted_and_old_records_said_unrecorded():
    from hetlora_core.report_runs import machine_lines, note_lines

    h100 = {"gpu": "NVIDIA H100", "cpu": "Xeon", "torch": "2.11"}
    recs = [{"method": "full_ft", "machine": h100}, {"method": "full_ft", "machine": h100}, {"method": "hetlora"}]
    (line,) = machine_lines(recs, {"full_ft": "full fine-tuning", "hetlora": "HetLoRA"})
    assert line == ("- Machines, per run record: NVIDIA H100 (CPU Xeon): 2 run(s) (full fine-tuning 2); not recorded "
                    "(records from before runs named their machine): 1 run(s) (HetLoRA 1).")
    assert machine_lines([{"method": "hetlora"}], {}) == []  # no record names one: the invocation's line stands alone
    assert note_lines("two\n\ncards ") == ["- Note (given with `--note` when this report was written): two cards"]
    assert note_lines("  ") == [] and note_lines(None) == []


def test_sweep_summary_is_applied(bench):
    summary = json.loads((bench["out"] / "sweep" / "summary.json").read_text())
    assert set(summary["choices"]) == {"training.lr"} and len(summary["rows"]) == 2
    het = next(r for r in bench["res"]["records"] if r["method"] == "hetlora")
    assert het["config"]["training"]["lr"] == summary["choices"]["training.lr"]
    assert het["config"]["data"]["seed"] != summary["data_seed"]  # validation roles differ from reported ones


def test_rerun_skips_finished_pairs_and_resumes_a_missing_one(bench, monkeypatch):
    out, logs = bench["out"], []
    redo = next((out / "runs" / "zero_pad").glob("seed0-*")) / "bench.json"
    redo.unlink()
    bp.run_paper("tiny", out, bench["report"], log=logs.append)
    ran = [ln for ln in logs if ln.startswith("run ")]
    assert len(ran) == 1 and "zero_pad" in ran[0] and redo.is_file()
    assert sum(ln.startswith("skip ") for ln in logs) == len(bp.METHODS) - 1

    def boom(*a, **k):
        raise AssertionError("a finished (method, seed) must not be simulated again")

    monkeypatch.setattr("hetlora_core.simulate.simulate", boom)
    logs.clear()
    bp.run_paper("tiny", out, bench["report"], methods=["hetlora", "full_ft"], log=logs.append)
    assert sum(ln.startswith("skip ") for ln in logs) == 2


def test_cli_group(bench):
    @click.group()
    def main() -> None:
        pass

    bench_cli.register(main)
    r = CliRunner().invoke(main, ["bench", "paper", "--help"])
    assert r.exit_code == 0 and "--profile" in r.output and "--methods" in r.output
    assert CliRunner().invoke(main, ["bench", "sweep", "--help"]).exit_code == 0
    report = bench["out"] / "cli.md"
    r = CliRunner().invoke(main, ["bench", "paper", "--profile", "tiny", "--out", str(bench["out"]), "--report", str(report),
                                  "--methods", "hetlora,homlora_rmin", "--note", "runs of two calls on two cards"])
    assert r.exit_code == 0, r.output
    text = report.read_text()
    assert "| HetLoRA |" in text and (bench["out"] / "cli" / "perplexity.png").is_file()
    assert "- Note (given with `--note` when this report was written): runs of two calls on two cards" in text
    bad = CliRunner().invoke(main, ["bench", "paper", "--profile", "tiny", "--out", str(bench["out"]), "--methods", "nope"])
    assert bad.exit_code != 0 and "unknown method" in bad.output


@pytest.mark.parametrize(("noprune", "ranks", "says"), [
    ({0: 10.1, 1: 9.9, 2: 10.05}, [[8, 7.8]] * 3, "likely too few components"),  # within noise, 2.5% of the rank cut
    ({0: 10.1, 1: 9.9, 2: 10.05}, [[8, 6]] * 3, "with no measurable cost or gain"),  # within noise, 25% cut
    ({0: 11.0, 1: 11.1, 2: 11.2}, [[8, 6]] * 3, "**better**"),  # pruning helps: no excuse needed
])
def test_pruning_ablation_says_whether_it_differs_and_why_not(noprune: dict, ranks: list, says: str) -> None:
    from hetlora_core.report import _pruning_why, judge, paired

    S = {"hetlora": {"final": {0: 10.0, 1: 10.0, 2: 10.0}, "ranks": ranks},
         "hetlora_noprune": {"final": noprune, "ranks": [[8, 8]] * 3}}
    j = judge(*paired(S, "hetlora", "hetlora_noprune"))
    line = f"**{j}**." + _pruning_why(S, j)  # as the verdict's "HetLoRA vs HetLoRA w/o pruning" line ends
    assert says in line
    assert ("Why not" in line) is (says != "**better**")


ROOT = Path(__file__).resolve().parents[1]


def _script_methods(name: str) -> list[str]:
    line = next(ln for ln in (ROOT / "benchmarks" / "gpu_paper.sh").read_text().splitlines() if ln.startswith(f"{name}="))
    return line.split("=", 1)[1].split(",")


def test_gpu_script_runs_only_methods_that_exist():
    """benchmarks/gpu_paper.sh names methods for `run`: each must be one bench paper still runs."""
    for name in ("LORA_METHODS", "SPEECH_METHODS"):
        assert set(_script_methods(name)) <= set(bp.METHODS), name
    assert not set(bp.METHODS) & set(bp.REMOVED_METHODS)


def test_a_removed_method_is_not_run(tmp_path):
    with pytest.raises(click.BadParameter, match=r"hetlora_rankaware: its setting strategy.normalisation: rank_aware .*was removed.*--no-run"):
        bp.run_paper("tiny", tmp_path, tmp_path / "r.md", methods=["hetlora", "hetlora_rankaware"], log=lambda s: None)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("methods", [None, ["hetlora", "hetlora_rankaware", "hetlora_lossform"]])
def test_no_run_still_reports_the_recorded_runs_of_a_removed_method(tmp_path, methods):
    """docs/results-gpu.md is rebuilt from docs/results-gpu/gpu-runs.tgz (benchmarks/gpu_paper.sh
    report): its records, made before strategy.normalisation was removed, are all found (the run
    folders' config hashes did not change) and the removed hetlora_rankaware keeps its row."""
    with tarfile.open(ROOT / "docs" / "results-gpu" / "gpu-runs.tgz") as tar:
        tar.extractall(tmp_path, filter="data")
    res = bp.run_paper("gpu", tmp_path / "gpu", tmp_path / "r.md", methods=methods, run=False, log=lambda s: None)
    got = sorted((r["method"], r["seed"]) for r in res["records"])
    on_disk = sorted((f.parts[-3], int(f.parent.name.split("-")[0].removeprefix("seed")))
                     for f in (tmp_path / "gpu" / "runs").glob("*/seed*/bench.json"))
    assert got == [x for x in on_disk if methods is None or x[0] in methods] and ("hetlora_rankaware", 1) in got
    text = (tmp_path / "r.md").read_text()
    assert "| HetLoRA rank-aware | 58.94 ± 0.80 |" in text and "| HetLoRA | 54.30 ± 0.41 |" in text
    assert "HetLoRA vs HetLoRA rank-aware" in text and "**No longer in the code**: HetLoRA rank-aware (`hetlora_rankaware`)" in text
    assert not any("hetlora_rankaware seed 0" in m or "hetlora_rankaware seed 1" in m for m in res["meta"]["missing"])
    if methods is None:  # full fine-tuning's three runs were resumed after a call's time limit (after 17, 18, 17 rounds)
        row = next(ln for ln in text.splitlines() if ln.startswith("| full fine-tuning |"))
        assert row.endswith(" | 82* |")  # the mean of the three resumed attempts' 93, 62 and 91 s
        assert ("\\* Resumed after a stopped call: full fine-tuning (3 of 3 run(s): seed 0 after 17, seed 1 after 18, "
                "seed 2 after 17 of 20 rounds)") in text
        assert "Resumed runs (* in the table) count only their rounds after the resume." in text


def test_store_fsync_and_kept_uploads_are_operational_not_part_of_a_runs_hash():
    """The gpu profile's scratch store skips fsync (full fine-tuning's 0.5 GB writes); that cannot
    change a number, so runs recorded before the setting existed keep their folders, and a run's
    folder does not depend on it; a setting that changes the numbers still changes the hash."""
    cfg = bp.base_config("gpu")
    assert cfg.store.fsync is False and bp.base_config("full").store.fsync is True
    assert cfg.strategy.keep_uploads_mb > 0 and bp.base_config("full").strategy.keep_uploads_mb == 0
    flipped = bp.replace(cfg, **{"store.fsync": True, "strategy.keep_uploads_mb": 0.0, "kubeflow.pipeline_root": "s3://x/y"})
    assert bp.config_hash(flipped) == bp.config_hash(cfg)
    assert bp.config_hash(bp.replace(cfg, **{"training.lr": 1e-3})) != bp.config_hash(cfg)


def test_a_rank_curve_hidden_under_another_is_named_in_the_legend():
    from hetlora_core.report import same_line_labels

    got = same_line_labels({"HetLoRA": [22.5, 21.0], "w/o pruning": [22.5, 22.5], "zero-padding": [22.5, 22.5],
                            "w/o sparsity": [22.5, 21.0 + 1e-12], "lossform": [22.5, 21.5]})
    assert got == {"HetLoRA": "HetLoRA", "w/o pruning": "w/o pruning", "zero-padding": "zero-padding (same as w/o pruning)",
                   "w/o sparsity": "w/o sparsity (same as HetLoRA)", "lossform": "lossform"}
