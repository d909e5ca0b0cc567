"""Folder data (``data.source: folder``): the export round-trip, the three formats, loss masks,
truncation accounting, malformed input and unsafe folders.

Each expectation is computed independently of the code under test (the built-in Shakespeare
tokens, a tokenizer call on the known answer text, hand-counted records), so a wrong join, a
shifted mask or a silently cut completion fails."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from hetlora_core.config import ConfigError, DataConfig, StoreConfig, config_from_dict
from hetlora_core.corpus import DataError
from hetlora_core.data import IGNORE, Batch, build_clients
from hetlora_core.datasource import LocalSource, check_client_id, client_ids
from hetlora_core.export_data import export_shakespeare
from hetlora_core.folder_data import build_folder_client
from hetlora_core.instruct import encode, segments
from hetlora_core.models import load_tokenizer
from hetlora_core.records import Record, parse_file

SMALL = DataConfig(num_clients=4, min_chars=5000, max_chars=5000, seq_len=32, eval_max_tokens=128, seed=0)
STORE = StoreConfig()


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def plain_tok(tok):
    """The same tokenizer without a chat template (the plain-join path)."""
    import copy

    t = copy.deepcopy(tok)
    t.chat_template = None
    return t


def folder_cfg(path: Path, **kw) -> DataConfig:
    return DataConfig(source="folder", path=str(path), num_clients=kw.pop("num_clients", 1), seq_len=kw.pop("seq_len", 32),
                      eval_max_tokens=kw.pop("eval_max_tokens", 64), **kw)


def write(folder: Path, name: str, lines: list[dict] | str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(lines if isinstance(lines, str) else "".join(json.dumps(x) + "\n" for x in lines))


def answer_text(tok, labels: list[int]) -> str:
    return tok.decode([x for x in labels if x != IGNORE])


# ---------------------------------------------------------------- the export round-trip


def test_text_export_gives_the_same_token_streams_as_the_built_in_source(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("HETLORA_CACHE", str(tmp_path / "cache"))
    built_in = build_clients(SMALL, tok)
    ids = export_shakespeare(SMALL, tmp_path / "exp", "text")
    assert ids == [c.client_id for c in built_in]
    cfg = DataConfig(**{**SMALL.__dict__, "source": "folder", "path": str(tmp_path / "exp")})
    full = config_from_dict({"data": {**cfg.__dict__}, "federation": {"clients_per_round": 2}})
    assert client_ids(full) == sorted(ids)
    for c in built_in:
        f = build_folder_client(cfg, STORE, tok, c.client_id)
        assert torch.equal(f.train_ids, c.train_ids) and torch.equal(f.heldout_ids, c.heldout_ids), c.client_id
        assert f.train_samples is None


def test_prompt_completion_export_is_next_speech_pairs(tok, tmp_path):
    cfg = DataConfig(num_clients=2, min_chars=1500, max_chars=1500, seed=0)
    ids = export_shakespeare(cfg, tmp_path / "pc", "prompt_completion")
    recs = [json.loads(ln) for ln in (tmp_path / "pc" / ids[0] / "train.jsonl").read_text().splitlines()]
    assert recs and all(set(r) == {"prompt", "completion"} and r["completion"] for r in recs)
    # prompt = "<another speaker>:\n<their speech>"; the speaker is never the client's own role
    role = ids[0].split("--", 1)[1].replace("-", " ").upper()
    assert all(":\n" in r["prompt"] and r["prompt"].split(":\n", 1)[0].upper() != role for r in recs)
    assert (tmp_path / "pc" / ids[0] / "eval.jsonl").stat().st_size > 0
    with pytest.raises(DataError, match="not empty"):
        export_shakespeare(cfg, tmp_path / "pc", "text")


# ---------------------------------------------------------------- formats and masks


def test_each_format_parses_and_auto_detects(tmp_path):
    txt = parse_file("c/train.jsonl", b'{"text": "a"}\n\n{"text": "b", "id": 3}\n', "auto", 1024)
    assert txt == [Record("text", text="a"), Record("text", text="b")]
    pc = parse_file("c/train.jsonl", b'{"prompt": "p", "completion": "c"}\n', "auto", 1024)
    assert pc == [Record("prompt_completion", messages=(("user", "p"), ("assistant", "c")))]
    chat = parse_file("c/train.jsonl", json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                                                                {"role": "assistant", "content": "a"}]}).encode(), "auto", 1024)
    assert chat[0].kind == "chat" and chat[0].messages == (("system", "s"), ("user", "u"), ("assistant", "a"))
    assert parse_file("c/x.txt", b"whole\n\nfile", "auto", 1024) == [Record("text", text="whole\n\nfile")]
    with pytest.raises(DataError, match="prompt_completion record"):  # forced format: every line must match it
        parse_file("c/train.jsonl", b'{"text": "a"}\n', "prompt_completion", 1024)


@pytest.mark.parametrize("content, line, msg", [
    (b'{"text": "a"}\n{"text": "b"\n', 2, "malformed JSON"),
    (b'{"text": "a"}\n\n{"prompt": "p", "completion": "c"}\n', 3, "one format per file"),
    (b'{"prompt": "p", "completion": ""}\n', 1, "non-empty"),
    (b'{"messages": [{"role": "assistant", "content": "a"}]}\n', 1, "after at least one"),
    (b'{"messages": [{"role": "robot", "content": "a"}]}\n', 1, "messages\\[0\\]"),
    (b'[1, 2]\n', 1, "cannot tell the format"),
    (b'{"text": "\xff"}\n', 1, "malformed JSON"),
])
def test_malformed_lines_are_reported_with_file_and_line(content, line, msg):
    with pytest.raises(DataError, match=f"alice/train.jsonl:{line}: .*{msg}"):
        parse_file("alice/train.jsonl", content, "auto", 1024)


def test_prompt_completion_mask_counts_only_the_completion(tok, plain_tok):
    rec = Record("prompt_completion", messages=(("user", "Hi there"), ("assistant", "Hello.")))
    ids, labels, cp, ca = encode(tok, rec, 512)
    assert (cp, ca) == (0, 0) and len(ids) == len(labels)
    expected = tok("Hello.<|im_end|>\n", add_special_tokens=False)["input_ids"]  # the template's assistant turn
    assert [x for x in labels if x != IGNORE] == expected and labels[-len(expected):] == expected
    assert sum(x != IGNORE for x in labels) == len(expected) == 4
    # no template: the documented plain join "prompt\n" + completion + EOS
    ids, labels, _, _ = encode(plain_tok, rec, 512)
    assert plain_tok.decode(ids) == "Hi there\nHello." + plain_tok.eos_token
    assert answer_text(plain_tok, labels) == "Hello." + plain_tok.eos_token


def test_chat_mask_counts_only_assistant_turns(tok, plain_tok):
    rec = Record("chat", messages=(("system", "Be brief."), ("user", "One?"), ("assistant", "Uno."),
                                   ("user", "Two?"), ("assistant", "Dos.")))
    ids, labels, _, _ = encode(tok, rec, 512)
    assert answer_text(tok, labels) == "Uno.<|im_end|>\nDos.<|im_end|>\n"
    assert tok.decode(ids) == tok.apply_chat_template([{"role": r, "content": c} for r, c in rec.messages], tokenize=False)
    ids, labels, _, _ = encode(plain_tok, rec, 512)
    eos = plain_tok.eos_token
    assert plain_tok.decode(ids) == f"system: Be brief.\nuser: One?\nassistant: Uno.{eos}user: Two?\nassistant: Dos.{eos}"
    assert answer_text(plain_tok, labels) == f"Uno.{eos}Dos.{eos}"
    assert "".join(t for t, _ in segments(plain_tok, rec)) == plain_tok.decode(ids)


def test_truncation_cuts_the_prompt_first_and_counts_everything(tok):
    long_prompt = " ".join(f"word{i}" for i in range(200))
    rec = Record("prompt_completion", messages=(("user", long_prompt), ("assistant", "Short answer.")))
    full_ids, full_labels, _, _ = encode(tok, rec, 10_000)
    n_answer = sum(x != IGNORE for x in full_labels)
    ids, labels, cp, ca = encode(tok, rec, 32)
    assert len(ids) == 32 and ca == 0 and cp == len(full_ids) - 32
    assert ids == full_ids[-32:] and sum(x != IGNORE for x in labels) == n_answer  # completion intact
    # an answer longer than seq_len: the prompt keeps one token, the answer's tail is cut and counted
    rec2 = Record("prompt_completion", messages=(("user", "Q"), ("assistant", long_prompt)))
    full2, lab2, _, _ = encode(tok, rec2, 10_000)
    ids2, labels2, cp2, ca2 = encode(tok, rec2, 32)
    first = next(i for i, x in enumerate(lab2) if x != IGNORE)
    assert len(ids2) == 32 and labels2[0] == IGNORE and labels2[1] != IGNORE and cp2 == first - 1
    assert ca2 == sum(x != IGNORE for x in lab2) - sum(x != IGNORE for x in labels2) > 0


def test_instruction_client_batches_and_truncation_report(tok, tmp_path, caplog):
    pairs = [{"prompt": f"Question {i}? " + "filler " * (60 if i == 0 else 0), "completion": f"Answer {i}."} for i in range(6)]
    write(tmp_path / "alice", "train.jsonl", pairs)
    c = build_folder_client(folder_cfg(tmp_path, seq_len=48), STORE, tok, "alice")
    assert c.train_samples is not None and c.heldout_samples is not None
    assert (len(c.train_samples), len(c.heldout_samples)) == (5, 1)  # tail split by heldout_fraction 0.2
    assert c.cut["samples_truncated"] == 1 and c.cut["prompt_tokens_cut"] > 0 and c.cut["completion_tokens_cut"] == 0
    assert "1 of 6 samples longer than data.seq_len=48" in caplog.text and c.num_samples(48) == 5
    b = c.train_samples.draw(4, torch.Generator().manual_seed(0))
    assert isinstance(b, Batch) and b.attention_mask is not None and b.input_ids.shape == b.labels.shape == b.attention_mask.shape
    assert bool((b.labels[b.attention_mask == 0] == IGNORE).all())  # padding never counts
    want = sum(int((c.train_samples.labels[i][1:] != IGNORE).sum()) for i in range(5))
    assert c.train_samples.target_tokens() == want and 0 < want < sum(len(x) for x in c.train_samples.ids)


# ---------------------------------------------------------------- unsafe input


@pytest.mark.parametrize("name", [".hidden", "a..b", "bad name", "caf\u00e9", "x" * 129, "semi;colon"])
def test_bad_client_folder_names_are_rejected(tmp_path, name):
    (tmp_path / name).mkdir()
    with pytest.raises(DataError, match="client folder .* rename the folder"):
        LocalSource(str(tmp_path)).list_client_ids()


def test_good_client_ids_and_count_check(tmp_path):
    for n in ("a", "b.c", "hamlet--horatio", "X_1"):
        assert check_client_id(n, "x") == n
        (tmp_path / n).mkdir()
    (tmp_path / "README.md").write_text("a file at the root is not a client")
    cfg = config_from_dict({"data": {"source": "folder", "path": str(tmp_path), "num_clients": 3}, "federation": {"clients_per_round": 2}})
    with pytest.raises(DataError, match="has 4 client folder.*set data.num_clients: 4"):
        client_ids(cfg)


def test_size_caps_and_symlinks(tok, tmp_path):
    write(tmp_path / "alice", "train.jsonl", [{"text": "x" * 3000}])
    with pytest.raises(DataError, match="alice/train.jsonl: 30\\d\\d bytes, more than data.max_file_bytes=2048"):
        build_folder_client(folder_cfg(tmp_path, max_file_bytes=2048, max_line_bytes=1024), STORE, tok, "alice")
    with pytest.raises(DataError, match="alice/train.jsonl:1: line of 30\\d\\d bytes"):
        build_folder_client(folder_cfg(tmp_path, max_line_bytes=2048), STORE, tok, "alice")
    write(tmp_path / "bob", "secret.txt", "bob's data")
    (tmp_path / "mallory").mkdir()
    os.symlink(tmp_path / "bob" / "secret.txt", tmp_path / "mallory" / "train.txt")
    with pytest.raises(DataError, match="not a regular file"):
        build_folder_client(folder_cfg(tmp_path), STORE, tok, "mallory")
    os.symlink(tmp_path / "bob", tmp_path / "eve")
    with pytest.raises(DataError, match="symlinks are refused"):
        build_folder_client(folder_cfg(tmp_path), STORE, tok, "eve")
    (tmp_path / "trudy").mkdir()
    os.mkfifo(tmp_path / "trudy" / "train.jsonl")  # nobody writes to it: reading it would block forever
    with pytest.raises(DataError, match="trudy/train.jsonl: not a regular file"):
        build_folder_client(folder_cfg(tmp_path), STORE, tok, "trudy")


def test_config_rules():
    with pytest.raises(ConfigError, match="data.path: is required"):
        DataConfig(source="folder")
    with pytest.raises(ConfigError, match="data.path: is only read with data.source: folder"):
        DataConfig(path="/data")
    with pytest.raises(ConfigError, match="model.vocab"):
        config_from_dict({"data": {"source": "folder", "path": "/d"}, "model": {"vocab": "corpus"}})
    with pytest.raises(ConfigError, match="store.endpoint"):
        config_from_dict({"data": {"source": "folder", "path": "s3://bucket/prefix"}})
    with pytest.raises(ConfigError, match="data.format"):
        config_from_dict({"data": {"format": "csv"}})


# ---------------------------------------------------------------- CLI


def test_cli_export_and_a_bad_folder_is_one_error_line(tmp_path):
    from click.testing import CliRunner
    from hetlora_kfp.pipelines.cli import main

    out = CliRunner().invoke(main, ["data", "export-shakespeare", "--out", str(tmp_path / "pc"), "--format", "prompt_completion",
                                    "--set", "data.num_clients=3", "--set", "data.min_chars=2000", "--set", "data.max_chars=2000"])
    assert out.exit_code == 0, out.output
    assert "3 client folders (prompt_completion) written" in out.output and len(list((tmp_path / "pc").iterdir())) == 3
    (tmp_path / "pc" / ".git").mkdir()
    bad = CliRunner().invoke(main, ["simulate", "--out", str(tmp_path / "run"), "--set", "data.source=folder",
                                    "--set", f"data.path={tmp_path / 'pc'}", "--set", "data.num_clients=3",
                                    "--set", "federation.clients_per_round=2", "--set", "model.name=tiny"])
    assert bad.exit_code == 1 and "error: client folder '.git'" in bad.output and "Traceback" not in bad.output
