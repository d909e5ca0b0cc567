"""The task a ``hetlora bench paper`` run learns: config overrides, no per-task code path.

* ``lm``: each client's role text (``data.source: shakespeare``), scored by held-out perplexity.
* ``next-speech``: the paper-like task. The paper fine-tunes on Reddit replies and reports ROUGE-L;
  here each client is a Shakespeare role whose examples are next-speech pairs: prompt = the previous
  speaker's speech (``"OTHER:\\n<speech>"``), completion = the role's answer. They are written once
  as an ordinary per-client folder by ``export_data`` (what ``hetlora data export-shakespeare
  --format prompt_completion`` writes) and read back through ``data.source: folder``, so the bench
  uses the same instruction-data path, masked answer-token perplexity and federated ROUGE-L
  (``rouge.py``: greedy answers to each client's first eval prompts) that users' own data gets.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import HetLoRAConfig

TASKS = ("lm", "next-speech")
_PREFIX = "next-speech-"
# ROUGE-L decodes one token per forward pass: 4 prompts x 24 tokens per client and round keeps an
# evaluation within a few seconds per client on a GPU (8 x 32, the data default, is 2.7x that).
ROUGE = {"data.rouge_max_prompts": 4, "data.rouge_max_new_tokens": 24}


def portable_data_path(path: str) -> str:
    """``data.path`` as the bench's run hash sees it: a folder this module exported is named by its
    data settings, so only that name counts, not where the bench's output folder happens to be."""
    name = Path(path).name
    return name if name.startswith(_PREFIX) else path


def task_overrides(task: str, base: HetLoRAConfig, out: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Dotted overrides that make ``base`` learn ``task``; exports the task's data under ``out``."""
    if task == "lm":
        return {}
    if task != "next-speech":
        raise ValueError(f"unknown bench task {task!r}; choose from {TASKS}")
    d = base.data
    if d.source != "shakespeare":
        raise ValueError(f"task next-speech builds its clients from the Shakespeare roles; data.source is {d.source!r}")
    # The folder is named by the data settings that choose and cut the roles: a changed setting
    # exports anew instead of reusing pairs cut another way.
    key = json.dumps([d.num_clients, d.min_chars, d.max_chars, d.heldout_fraction, d.seed])
    folder = (out / "data" / f"{_PREFIX}{hashlib.sha256(key.encode()).hexdigest()[:10]}").resolve()
    done = folder / ".complete"
    if not done.is_file():
        from .export_data import export_shakespeare
        from .store.base import atomic_write

        if folder.exists():  # an export cut short: start it again
            import shutil

            shutil.rmtree(folder)
        ids = export_shakespeare(d, folder, "prompt_completion")
        atomic_write(done, json.dumps(ids).encode())
        log(f"next-speech pairs of {len(ids)} roles written to {folder}")
    return {"data.source": "folder", "data.path": str(folder), "data.format": "prompt_completion", **ROUGE}
