"""One folder client (``data.source: folder``) read and tokenised: only that client's files.

Text records give the same kind of client as the Shakespeare source (1-D token streams, random
windows for training, contiguous windows for evaluation); instruction records give masked samples
(``instruct``). Without an eval file the held-out part is a contiguous tail: of the joined text at
a blank-line boundary (``corpus._split``, the Shakespeare rule) or of the records.

Nothing is cached across clients: each call reads one folder, and the per-process cache in
``runtime`` is keyed by the client id, so no file or object ever holds two clients' data.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .config import DataConfig, StoreConfig
from .corpus import DataError, _split
from .data import ClientData, _tokenize
from .datasource import open_source
from .instruct import build_samples, prompt_text
from .records import join_text, parse_files, split_records

log = logging.getLogger("hetlora")


def build_folder_client(data: DataConfig, store: StoreConfig, tokenizer: Any, client_id: str) -> ClientData:
    """Read ``<data.path>/<client_id>/`` (nothing else) and tokenise it."""
    files = open_source(data, store).read_client(client_id, data)
    train = parse_files(files.train, data.format, data.max_line_bytes)
    held = parse_files(files.eval, data.format, data.max_line_bytes) if files.eval else None
    if held is not None and (held[0].kind == "text") != (train[0].kind == "text"):
        raise DataError(f"client {client_id}: train is {train[0].kind} but eval is {held[0].kind}; use one kind for both")
    if train[0].kind == "text":
        text = join_text(train)
        train_text, held_text = (text, join_text(held)) if held is not None else _split(text, data.heldout_fraction)
        c = ClientData(client_id, "", client_id, _tokenize(tokenizer, train_text), _tokenize(tokenizer, held_text),
                       len(train_text) + len(held_text))
        if len(c.train_ids) < data.seq_len + 1 or len(c.heldout_ids) < data.seq_len:
            raise DataError(f"client {client_id} has {len(c.train_ids)} train / {len(c.heldout_ids)} held-out tokens, "
                            f"fewer than data.seq_len={data.seq_len} (+1 for training); add text or lower data.seq_len")
        return c
    if held is None:
        try:
            train, held = split_records(train, data.heldout_fraction)
        except DataError as e:
            raise DataError(f"client {client_id}: {e}") from None
    where = f"client {client_id}"
    tr, cut_tr = build_samples(tokenizer, train, data.seq_len, f"{where} (train)")
    ev, cut_ev = build_samples(tokenizer, held, data.seq_len, f"{where} (eval)")
    cut = {k: cut_tr[k] + cut_ev[k] for k in cut_tr}
    if cut["samples_truncated"]:
        log.warning("client %s: %d of %d samples longer than data.seq_len=%d: %d prompt token(s) and %d completion "
                    "token(s) cut", client_id, cut["samples_truncated"], len(tr) + len(ev), data.seq_len,
                    cut["prompt_tokens_cut"], cut["completion_tokens_cut"])
    chars = sum(len(c) for r in train + held for _, c in r.messages)
    empty = torch.zeros(0, dtype=torch.long)
    # Prompts keep their last seq_len tokens (the prompt side is what truncation cuts, as in training).
    prompts = tuple((_tokenize(tokenizer, prompt_text(tokenizer, r))[-data.seq_len:], r.reference)
                    for r in held[: data.rouge_max_prompts])
    return ClientData(client_id, "", client_id, empty, empty, chars, tr, ev, cut, prompts)
