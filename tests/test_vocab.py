"""model.vocab = corpus: the cut model computes exactly the kept logits of the full model, client ids
are renumbered consistently, adapters stay interchangeable, and older run records still match."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hetlora_core import runtime, vocab
from hetlora_core.adapter import init_global
from hetlora_core.bench_paper import config_hash
from hetlora_core.config import ConfigError, load_config, replace
from hetlora_core.data import ClientData
from hetlora_core.evaluation import evaluate
from hetlora_core.peft_bridge import spec_from_model
from hetlora_core.run import RunConfigMismatch, check_or_record_config
from hetlora_core.simulate import simulate
from hetlora_core.store import LocalStore, get_artifact, global_prefix

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cfgs():
    base = load_config(ROOT / "configs/smoke.yaml")
    return base, replace(base, **{"model.vocab": "corpus"})


def test_cut_model_gives_the_full_models_logits_on_kept_tokens(cfgs):
    full_cfg, cut_cfg = cfgs
    full, cut = runtime.model(full_cfg), runtime.model(cut_cfg)
    keep = runtime._keep(cut_cfg.model, cut_cfg.data)
    assert full is not cut and full.config.vocab_size == 49152  # the shared base is untouched
    assert cut.config.vocab_size == len(keep) < 30000
    assert cut.get_output_embeddings().weight is cut.get_input_embeddings().weight  # still tied
    assert not cut.get_input_embeddings().weight.requires_grad  # still frozen
    raw = next(iter(runtime._raw_clients(full_cfg.model, full_cfg.data))).train_ids[:24]
    mapped = runtime.clients(cut_cfg)[next(iter(runtime.clients(full_cfg)))].train_ids[:24]
    assert torch.equal(keep[mapped], raw)  # renumbering is the inverse of `keep`
    with torch.no_grad():
        a = full(raw[None]).logits[0][:, keep]
        b = cut(mapped[None]).logits[0]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_keep_covers_clients_and_special_tokens(cfgs):
    _, cut_cfg = cfgs
    keep = runtime._keep(cut_cfg.model, cut_cfg.data)
    assert torch.equal(keep, torch.unique(keep))  # sorted, no duplicates
    tok = runtime.tokenizer(cut_cfg)
    for c in runtime._raw_clients(cut_cfg.model, cut_cfg.data):
        assert torch.isin(c.train_ids, keep).all() and torch.isin(c.heldout_ids, keep).all()
    assert torch.isin(torch.tensor([tok.eos_token_id]), keep).all()


def test_token_outside_the_kept_set_is_a_clear_error():
    c = ClientData("x--y", "X", "Y", torch.tensor([1, 2, 3]), torch.tensor([7]), 10)
    with pytest.raises(vocab.VocabError, match="model.vocab: full"):
        vocab.remap_clients([c], torch.tensor([1, 2, 3]), 10)


def test_adapter_fits_both_models_and_cut_eval_is_lower(cfgs):
    """q/v adapters do not depend on the vocabulary; the cut softmax has fewer classes, so the
    same model state scores a lower perplexity (normalised over fewer tokens)."""
    full_cfg, cut_cfg = cfgs
    full, cut = runtime.model(full_cfg), runtime.model(cut_cfg)
    assert spec_from_model(full, full_cfg.model.target_modules) == spec_from_model(cut, cut_cfg.model.target_modules)
    ad = init_global(spec_from_model(full, full_cfg.model.target_modules), 4, 2.0, 0)
    f = evaluate(full, ad, list(runtime.clients(full_cfg).values())[:1], full_cfg)
    c = evaluate(cut, ad, list(runtime.clients(cut_cfg).values())[:1], cut_cfg)
    assert f.tokens == c.tokens and c.ppl < f.ppl


def test_simulate_with_corpus_vocab(cfgs, tmp_path):
    _, cut_cfg = cfgs
    cfg = replace(cut_cfg, **{"federation.rounds": 1})
    res = simulate(cfg, tmp_path, progress=False)
    ppl = res["rounds"][0]["global_ppl"]
    # The random tiny model starts near uniform over the KEPT tokens (not 49,152) and training helps.
    assert res["baseline_ppl"] < 1.5 * runtime.model(cfg).config.vocab_size and ppl < res["baseline_ppl"]
    blob, _ = get_artifact(LocalStore(tmp_path / "store"), global_prefix(cfg.experiment, 0))
    assert blob


def test_bad_vocab_value_names_the_field():
    with pytest.raises(ConfigError, match="model.vocab"):
        load_config(None, {"model.vocab": "tiny"})


def test_late_default_keeps_old_hashes_and_resumes(cfgs, tmp_path):
    """Runs recorded before model.vocab existed keep their hash and still resume."""
    full_cfg, cut_cfg = cfgs
    assert config_hash(full_cfg) != config_hash(cut_cfg)
    d = full_cfg.to_dict()
    del d["model"]["vocab"]
    assert "vocab" not in json.dumps(d["model"])
    store = LocalStore(tmp_path)
    store.put_bytes(f"{full_cfg.experiment}/config.json", json.dumps(d).encode())
    check_or_record_config(full_cfg, store)  # an old record without the field: same run
    with pytest.raises(RunConfigMismatch, match="model"):
        check_or_record_config(cut_cfg, store)
