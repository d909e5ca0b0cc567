"""Shakespeare clients: parsing, deterministic client choice, disjoint splits, cache, batching."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hetlora_core import data
from hetlora_core.config import DataConfig
from hetlora_core.data import (
    ClientData,
    DataError,
    build_clients,
    eval_windows,
    sample_batch,
    shakespeare_roles,
)
from hetlora_core.models import load_tokenizer

# Small, fast settings: 4 clients of exactly 5,000 characters each.
SMALL = DataConfig(num_clients=4, min_chars=5000, max_chars=5000, seq_len=32, eval_max_tokens=128, seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    # Loaded (and lru-cached) from the real cache before any test points HETLORA_CACHE elsewhere.
    return load_tokenizer()


@pytest.fixture
def tmp_cache(tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private cache dir, so each test builds its clients instead of reading another test's."""
    monkeypatch.setenv("HETLORA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_roles_parse() -> None:
    roles = shakespeare_roles()
    assert 1000 <= len(roles) <= 1600
    assert len({play for play, _, _ in roles}) == 38
    big = [r for r in roles if len(r[2]) >= 5000]
    assert 200 <= len(big) <= 350
    names = {role for _, role, _ in roles}
    assert not any("&" in n or n.split()[0].upper() in {"ALL", "BOTH"} for n in names)
    assert not {"Citizens", "Lords", "All", "ALL", "Both"} & names
    hamlet = {role: text for play, role, text in roles if play == "Hamlet"}
    assert "HAMLET" in hamlet and "HORATIO" in hamlet
    assert "To be, or not to be" in hamlet["HAMLET"] and len(hamlet["HAMLET"]) > 50_000
    # Stage directions and markdown are gone.
    assert not any("_" in t or "*" in t for _, _, t in roles)
    assert "Exit" not in hamlet["HORATIO"].split("\n")


def test_titles_not_overwritten_by_epilogue_headings() -> None:
    plays = {play for play, _, _ in shakespeare_roles()}
    assert "EPILOGUE" not in plays and "Measure For Measure" in plays


def test_split_is_a_tail_at_a_speech_boundary() -> None:
    text = data.SPEECH_SEP.join(f"speech {i} " + "word " * 20 for i in range(10))
    train, heldout = data._split(text, 0.2)
    assert train and heldout
    assert train + data.SPEECH_SEP + heldout == text  # disjoint, nothing lost but the separator
    assert heldout.startswith("speech 8")
    # A single speech falls back to line boundaries.
    train, heldout = data._split("a b\nc d\ne f\ng h\ni j", 0.2)
    assert (train, heldout) == ("a b\nc d\ne f\ng h", "i j")


def test_build_clients_deterministic(tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = []
    for name in ("a", "b"):  # separate caches: the second build is not a cache hit
        monkeypatch.setenv("HETLORA_CACHE", str(tmp_path / name))
        runs.append(build_clients(SMALL, tokenizer))
    a, b = runs
    assert [c.client_id for c in a] == [c.client_id for c in b]
    assert all(torch.equal(x.train_ids, y.train_ids) and torch.equal(x.heldout_ids, y.heldout_ids) for x, y in zip(a, b, strict=True))
    monkeypatch.setenv("HETLORA_CACHE", str(tmp_path / "c"))
    other = build_clients(DataConfig(**{**SMALL.__dict__, "seed": 1}), tokenizer)
    assert [c.client_id for c in other] != [c.client_id for c in a]


def test_clients_shape_and_disjoint_split(tmp_cache: Path, tokenizer) -> None:
    clients = build_clients(SMALL, tokenizer)
    assert len(clients) == 4 and len({c.client_id for c in clients}) == 4
    for c in clients:
        assert isinstance(c, ClientData)
        assert "--" in c.client_id and c.client_id == c.client_id.lower()
        assert c.train_ids.dtype == torch.long and c.train_ids.dim() == 1
        assert c.heldout_ids.dtype == torch.long and c.heldout_ids.dim() == 1
        assert len(c.train_ids) > len(c.heldout_ids) > SMALL.seq_len
        assert c.num_chars == SMALL.max_chars  # every eligible role is longer: all are cut
        assert c.num_samples(32) == len(c.train_ids) // 32
        train_text = tokenizer.decode(c.train_ids)
        assert tokenizer.decode(c.heldout_ids[:40]) not in train_text
    assert (tmp_cache / "tokens").is_dir()


def test_cache_hit_identical(tmp_cache: Path, tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    first = build_clients(SMALL, tokenizer)
    files = sorted(p.name for p in (tmp_cache / "tokens").iterdir())
    assert len(files) == 2 and any(f.endswith(".safetensors") for f in files) and any(f.endswith(".json") for f in files)

    def no_rebuild(*_a: object) -> None:
        raise AssertionError("cache miss: clients were rebuilt")

    monkeypatch.setattr(data, "_build", no_rebuild)
    second = build_clients(SMALL, tokenizer)
    for x, y in zip(first, second, strict=True):
        assert (x.client_id, x.play, x.role, x.num_chars) == (y.client_id, y.play, y.role, y.num_chars)
        assert torch.equal(x.train_ids, y.train_ids) and torch.equal(x.heldout_ids, y.heldout_ids)


def test_corrupt_cache_is_rebuilt(tmp_cache: Path, tokenizer) -> None:
    first = build_clients(SMALL, tokenizer)
    (path,) = (tmp_cache / "tokens").glob("*.safetensors")
    path.write_bytes(b"garbage")
    again = build_clients(SMALL, tokenizer)
    assert torch.equal(first[0].train_ids, again[0].train_ids)


def test_too_few_roles(tmp_cache: Path, tokenizer) -> None:
    with pytest.raises(DataError, match=r"only \d+ roles .*lower data.min_chars"):
        build_clients(DataConfig(num_clients=500, min_chars=5000), tokenizer)


def test_too_short_for_seq_len(tmp_cache: Path, tokenizer) -> None:
    with pytest.raises(DataError, match="seq_len"):
        build_clients(DataConfig(num_clients=2, min_chars=100, max_chars=100, seq_len=128, eval_max_tokens=128), tokenizer)


def test_sample_batch() -> None:
    ids = torch.arange(1000, dtype=torch.long)
    a = sample_batch(ids, 8, 16, torch.Generator().manual_seed(3))
    b = sample_batch(ids, 8, 16, torch.Generator().manual_seed(3))
    c = sample_batch(ids, 8, 16, torch.Generator().manual_seed(4))
    assert a.shape == (8, 16) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.all(a[:, 1:] - a[:, :-1] == 1)  # contiguous windows
    rng_state = torch.random.get_rng_state()
    sample_batch(ids, 2, 16, torch.Generator().manual_seed(0))
    assert torch.equal(rng_state, torch.random.get_rng_state())  # the global RNG is untouched
    assert sample_batch(torch.arange(17), 4, 16, torch.Generator()).shape == (4, 16)
    with pytest.raises(DataError, match="seq_len"):
        sample_batch(torch.arange(16), 1, 16, torch.Generator())


def test_eval_windows() -> None:
    ids = torch.arange(1000)
    w = eval_windows(ids, 64, 300)
    assert w.shape == (4, 64) and torch.equal(w.flatten(), ids[:256])
    assert eval_windows(ids, 64, 10_000).shape == (15, 64)
    assert eval_windows(ids[:70], 64, 64).shape == (1, 64)
    with pytest.raises(DataError):
        eval_windows(ids[:10], 64, 128)
