"""Client data records: parsing JSONL / text files into text, prompt/completion or chat records.

Torch-free and tokenizer-free: this is the untrusted-input boundary, so it only decodes, checks
and normalises. Formats (``data.format``; ``auto`` detects them per file from the first record):

* ``{"text": "..."}``: plain text; a client's text records are joined with a blank line
  (``SPEECH_SEP``), exactly as the embedded Shakespeare source joins a role's speeches, so an
  exported corpus gives the same token stream as the built-in one. A ``*.txt`` file is one record.
* ``{"prompt": "...", "completion": "..."}``: an instruction pair (a user turn and an assistant turn).
* ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``: a chat;
  the loss counts only assistant turns.

Other keys in a record are ignored (ids, metadata). Every error names ``file:line``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from .corpus import SPEECH_SEP, DataError

Kind = Literal["text", "prompt_completion", "chat"]
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Record:
    """One training or evaluation example. Instruction kinds keep their turns as (role, content)."""

    kind: Kind
    text: str = ""
    messages: tuple[tuple[str, str], ...] = ()

    @property
    def prompt_messages(self) -> tuple[tuple[str, str], ...]:
        """The turns before the last assistant turn (what generation is prompted with, for ROUGE-L)."""
        last = max(i for i, (r, _) in enumerate(self.messages) if r == "assistant")
        return self.messages[:last]

    @property
    def reference(self) -> str:
        """The last assistant turn (the reference a generated answer is scored against)."""
        return [c for r, c in self.messages if r == "assistant"][-1]


def _kind_of(obj: dict[str, Any]) -> Kind | None:
    if "messages" in obj:
        return "chat"
    if "prompt" in obj or "completion" in obj:
        return "prompt_completion"
    if "text" in obj:
        return "text"
    return None


def _record(obj: Any, kind: Kind, where: str) -> Record:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if kind == "text":
        if not isinstance(obj.get("text"), str):
            raise DataError(f"{where}: a text record needs a string field \"text\" (keys: {sorted(obj)[:10]})")
        return Record("text", text=obj["text"])
    if kind == "prompt_completion":
        p, c = obj.get("prompt"), obj.get("completion")
        if not isinstance(p, str) or not isinstance(c, str) or not c:
            raise DataError(f"{where}: a prompt_completion record needs string fields \"prompt\" and a non-empty "
                            f"\"completion\" (keys: {sorted(obj)[:10]})")
        return Record("prompt_completion", messages=(("user", p), ("assistant", c)))
    msgs = obj.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: a chat record needs a non-empty list \"messages\"")
    turns = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: messages[{i}] must be {{\"role\": one of {list(ROLES)}, \"content\": string}}, got {str(m)[:100]}")
        turns.append((str(m["role"]), str(m["content"])))
    roles = [r for r, _ in turns]
    if "assistant" not in roles or roles.index("assistant") == 0:
        raise DataError(f"{where}: a chat record needs an assistant message after at least one system/user message")
    return Record("chat", messages=tuple(turns))


def parse_file(label: str, data: bytes, fmt: str, max_line_bytes: int) -> list[Record]:
    """Records of one file (``label`` names it in errors). ``*.txt`` is one text record; JSONL has
    one record per non-blank line, all of one kind (``fmt``, or the first record's with ``auto``)."""
    if label.endswith(".txt"):
        if fmt not in ("auto", "text"):
            raise DataError(f"{label}: a .txt file is text, but data.format is {fmt}; use .jsonl records")
        try:
            return [Record("text", text=data.decode("utf-8"))]
        except UnicodeDecodeError as e:
            raise DataError(f"{label}: not UTF-8 text ({e})") from None
    kind: Kind | None = None if fmt == "auto" else fmt  # type: ignore[assignment]
    out: list[Record] = []
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        where = f"{label}:{lineno}"
        if len(raw) > max_line_bytes:
            raise DataError(f"{where}: line of {len(raw)} bytes, more than data.max_line_bytes={max_line_bytes}")
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise DataError(f"{where}: malformed JSON line ({e})") from None
        got = _kind_of(obj) if isinstance(obj, dict) else None
        if kind is None:
            if got is None:
                raise DataError(f"{where}: cannot tell the format: expected a \"text\", \"prompt\"/\"completion\" "
                                "or \"messages\" field (or set data.format)")
            kind = got
        elif fmt == "auto" and got != kind:
            raise DataError(f"{where}: a {got} record in a file whose first record is {kind}; one format per file")
        out.append(_record(obj, kind, where))
    if not out:
        raise DataError(f"{label}: no records (empty file)")
    return out


def parse_files(files: tuple[tuple[str, bytes], ...], fmt: str, max_line_bytes: int) -> list[Record]:
    """Records of several files of one split, which must all be text or all instruction records."""
    recs = [r for label, data in files for r in parse_file(label, data, fmt, max_line_bytes)]
    kinds = {r.kind == "text" for r in recs}
    if len(kinds) > 1:
        raise DataError(f"{', '.join(lbl for lbl, _ in files)}: mixes text and instruction records; one client's "
                        "data must be all text or all prompt_completion/chat")
    return recs


def join_text(records: list[Record]) -> str:
    """A client's text records as one text (blank-line separated: see the module doc)."""
    return SPEECH_SEP.join(r.text for r in records)


def split_records(records: list[Record], heldout_fraction: float) -> tuple[list[Record], list[Record]]:
    """Instruction records without an eval file: a contiguous tail is held out (deterministic,
    order-preserving, like the text split), at least one record on each side."""
    if len(records) < 2:
        raise DataError(f"{len(records)} record(s): need >= 2 to hold some out, or provide eval.jsonl")
    n_eval = min(len(records) - 1, max(1, round(len(records) * heldout_fraction)))
    return records[:-n_eval], records[-n_eval:]
