"""The shipped bring-your-own-data example (examples/shakespeare-pc, configs/folder-example.yaml):
it is exactly what the export command its README names writes, and a run on it reports held-out
perplexity and ROUGE-L for every round (tiny model here, so the test stays short; the README's
figures come from SmolLM2)."""

from __future__ import annotations

import math
from pathlib import Path

from hetlora_core.config import load_config
from hetlora_core.export_data import export_shakespeare
from hetlora_core.simulate import simulate

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "shakespeare-pc"
# The command in examples/shakespeare-pc/README.md.
EXPORT = {"data.num_clients": 4, "data.min_chars": 3000, "data.max_chars": 3000}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.jsonl"))}


def test_example_is_what_the_documented_export_writes(tmp_path: Path) -> None:
    assert "--format prompt_completion" in (EXAMPLE / "README.md").read_text()
    cfg = load_config(None, EXPORT)
    export_shakespeare(cfg.data, tmp_path / "pc", "prompt_completion")
    shipped, fresh = _files(EXAMPLE), _files(tmp_path / "pc")
    assert len(shipped) == 8 and sorted(shipped) == sorted(fresh)
    for name in shipped:
        assert shipped[name] == fresh[name], f"examples/shakespeare-pc/{name} differs from a fresh export"


def test_a_run_on_the_example_reports_rouge_l_per_round(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)  # the config's data.path is relative to the repository
    cfg = load_config(ROOT / "configs" / "folder-example.yaml", {
        "model.name": "tiny", "data.seq_len": 64, "data.eval_max_tokens": 64, "data.rouge_max_prompts": 2,
        "data.rouge_max_new_tokens": 4, "training.local_steps": 1, "training.batch_size": 2})
    res = simulate(cfg, tmp_path / "run", progress=False)
    rounds = res["rounds"]
    assert [r["round"] for r in rounds] == [0, 1]
    for r in rounds:
        assert 0.0 <= r["rouge_l"] <= 1.0, r
        assert set(r["per_client_rouge_l"]) == {p.name for p in EXAMPLE.iterdir() if p.is_dir()}
        assert math.isfinite(r["global_ppl"]) and r["global_ppl"] > 1.0
