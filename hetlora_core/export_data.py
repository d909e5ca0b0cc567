"""``hetlora data export-shakespeare``: the embedded corpus written as per-client folders.

So the folder source is exercised with real text, and so users see the layout by example:
``<out>/<client_id>/train.jsonl`` and ``<out>/<client_id>/eval.jsonl`` for the roles that
``data.source: shakespeare`` chooses with the same ``data.*`` settings.

* ``text``: one ``{"text": speech}`` record per speech of the role's train / held-out text (the
  exact ``corpus.choose_roles`` split). The folder reader joins text records with a blank line,
  the separator the built-in source joins speeches with, so training on the export gives the same
  token streams as the built-in source (tests/test_folder_data.py checks it).
* ``prompt_completion``: next-speech pairs: for each speech of the role that answers another
  speaker in the same scene, ``prompt`` = ``"<OTHER SPEAKER>:\\n<their speech>"`` and
  ``completion`` = the role's speech. Pairs are taken in play order until ``data.max_chars``
  completion characters; the last ``data.heldout_fraction`` of them (at least one) are ``eval.jsonl``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from .config import DataConfig
from .corpus import SPEECH_SEP, DataError, choose_roles, play_speeches, plays_dir
from .records import Record, split_records
from .store.base import atomic_write


def _jsonl(objs: list[dict[str, str]]) -> bytes:
    return "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objs).encode("utf-8")


def _pairs(stem: str, role: str) -> list[tuple[str, str]]:
    """(prompt, completion) next-speech pairs of ``role`` in play ``stem``, in play order."""
    path = next(p for p in sorted(plays_dir().rglob("*.md")) if p.stem == stem)
    _title, seq = play_speeches(path)
    out, prev = [], None
    for item in seq:
        if item is not None and item[0].upper() == role.upper() and prev is not None and prev[0].upper() != role.upper():
            out.append((f"{prev[0]}:\n{prev[1]}", item[1]))
        prev = item
    return out


def export_shakespeare(cfg: DataConfig, out: Path, fmt: Literal["text", "prompt_completion"] = "text") -> list[str]:
    """Write the chosen roles under ``out`` (one folder each); returns the client ids written."""
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out} exists and is not empty; export into a new folder")
    ids = []
    for role in choose_roles(cfg):
        folder = out / role.client_id
        if fmt == "text":
            train = [{"text": t} for t in role.train_text.split(SPEECH_SEP)]
            held = [{"text": t} for t in role.heldout_text.split(SPEECH_SEP)]
        else:
            stem = role.client_id.split("--", 1)[0]
            pairs, chars = [], 0
            for p, c in _pairs(stem, role.role):
                if chars >= cfg.max_chars:
                    break
                pairs.append(Record("prompt_completion", messages=(("user", p), ("assistant", c))))
                chars += len(c)
            tr, ev = split_records(pairs, cfg.heldout_fraction)
            train = [{"prompt": r.messages[0][1], "completion": r.messages[1][1]} for r in tr]
            held = [{"prompt": r.messages[0][1], "completion": r.messages[1][1]} for r in ev]
        atomic_write(folder / "train.jsonl", _jsonl(train))
        atomic_write(folder / "eval.jsonl", _jsonl(held))
        ids.append(role.client_id)
    return ids
