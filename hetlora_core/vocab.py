"""Optional vocabulary restriction (``model.vocab: corpus``): a cheaper output layer for CPU runs.

SmolLM2's output layer is a 576 x 49,152 matmul per token -- about a fifth of the model's forward
FLOPs -- and a softmax over 49,152 classes, while all of Shakespeare uses only a small part of that
vocabulary. With ``model.vocab: corpus`` the (tied) embedding / output matrix keeps only the rows
of tokens that occur anywhere in the corpus (every role of every play, plus this run's client
texts, plus the special tokens), and client token ids are renumbered to match.

Why it is sound for HetLoRA: LoRA adapts ``q_proj``/``v_proj`` only, whose shapes do not depend on
the vocabulary, so an adapter trained on the restricted model loads unchanged onto the full model
(``hetlora export`` always uses the full model). What changes is the evaluation: perplexity is
normalised over the kept tokens, so it is lower than the full-vocabulary figure and only comparable
between runs with the same setting (the bench report says which one it used). The set is built
from the whole corpus rather than from the evaluated text, so it does not depend on which roles
are held out; it is cached on disk as safetensors (never pickle), keyed by the tokenizer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import replace as dc_replace
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from .data import DATA_FORMAT_VERSION, SPEECH_SEP, ClientData, _all_roles, _tokenizer_fingerprint
from .models import cache_dir
from .store.base import atomic_write

if TYPE_CHECKING:  # transformers is slow to import: the loaders in models.py import it lazily
    from transformers import PreTrainedModel


class VocabError(ValueError):
    """A token id falls outside the restricted vocabulary; the message says how to recover."""


def corpus_token_ids(tokenizer: object) -> Tensor:
    """Sorted ids of every token in the tokenised text of every role (cached on disk)."""
    key = hashlib.sha256(f"{DATA_FORMAT_VERSION}|{_tokenizer_fingerprint(tokenizer)}".encode()).hexdigest()[:20]
    path = cache_dir() / "vocab" / f"{key}.safetensors"
    if path.is_file():
        try:
            return load_file(str(path))["ids"]
        except Exception:  # noqa: BLE001 - unreadable cache: rebuild it (written atomically below)
            pass
    seen: set[int] = set()
    for _stem, _title, _role, speeches in _all_roles():
        seen.update(tokenizer(SPEECH_SEP.join(speeches), add_special_tokens=False)["input_ids"])  # type: ignore[operator]
    ids = torch.tensor(sorted(seen), dtype=torch.long)
    atomic_write(path, lambda tmp: save_file({"ids": ids}, tmp))  # a concurrent reader sees no partial cache
    return ids


def keep_ids(tokenizer: object, clients: Sequence[ClientData]) -> Tensor:
    """The kept vocabulary: corpus tokens, this run's client tokens and the special tokens, sorted.
    Client tokens are added because a role's text cut into train/held-out parts can tokenise
    differently at the cut than the whole role does."""
    parts = [corpus_token_ids(tokenizer)] + [t for c in clients for t in (c.train_ids, c.heldout_ids)]
    special = [i for i in (getattr(tokenizer, n, None) for n in ("bos_token_id", "eos_token_id", "pad_token_id"))
               if isinstance(i, int)]
    parts.append(torch.tensor(special, dtype=torch.long))
    return torch.unique(torch.cat(parts))  # sorted


def remap_clients(clients: Sequence[ClientData], keep: Tensor, vocab_size: int) -> list[ClientData]:
    """Client token ids renumbered into the kept vocabulary (position in ``keep``)."""
    lut = torch.full((vocab_size,), -1, dtype=torch.long)
    lut[keep] = torch.arange(len(keep))
    out = []
    for c in clients:
        train, held = lut[c.train_ids], lut[c.heldout_ids]
        if (train < 0).any() or (held < 0).any():
            raise VocabError(f"client {c.client_id} has tokens outside the restricted vocabulary; "
                             "delete the cache folder 'vocab' (HETLORA_CACHE) or set model.vocab: full")
        out.append(dc_replace(c, train_ids=train, heldout_ids=held))
    return out


def restrict_model(model: PreTrainedModel, keep: Tensor) -> PreTrainedModel:
    """Cut the input embedding and the output layer to the rows in ``keep`` (in place).

    The model must be a private copy (not the shared cached base). Tied weights stay tied: the
    output layer gets the same new parameter as the embedding."""
    emb = model.get_input_embeddings()
    emb_w = emb.weight
    if not isinstance(emb_w, Tensor):  # typed Tensor | Module (nn.Module.__getattr__)
        raise TypeError(f"the input embedding {type(emb).__name__} has no weight tensor")
    new = torch.nn.Embedding(len(keep), emb_w.shape[1], dtype=emb_w.dtype)
    new.weight = torch.nn.Parameter(emb_w.detach()[keep].clone(), requires_grad=emb_w.requires_grad)
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb_w
    model.set_input_embeddings(new)
    if head is not None:
        if tied:
            head.weight = new.weight
        else:
            head.weight = torch.nn.Parameter(head.weight.detach()[keep].clone(), requires_grad=head.weight.requires_grad)
        head.out_features = len(keep)
    model.config.vocab_size = len(keep)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):  # renumber, so generation configs stay valid
        old = getattr(model.config, name, None)
        if isinstance(old, int):
            pos = (keep == old).nonzero()
            setattr(model.config, name, int(pos[0, 0]) if len(pos) else None)
    return model
