"""The model and the data a process loads once: the base model and the tokenised clients.

Cached per process (keyed on the config sections they depend on), so an in-process simulation
pays for them once and a KFP task once per task. The steps that need them (train, evaluate) import
this module lazily; the model-free steps never do.

Folder data (``data.source: folder``) is built per client: ``client_data(cfg, id)`` reads only that
client's folder, so a client's train task never sees another client's data.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from . import store as st
from . import vocab
from .adapter import LoraAdapter
from .config import DataConfig, HetLoRAConfig, ModelConfig, StoreConfig, TrainingConfig
from .data import ClientData, build_clients
from .datasource import client_ids as source_client_ids
from .models import load_base_model, load_tokenizer
from .precision import place, resolve_model


@functools.lru_cache(maxsize=2)
def _model(mcfg: ModelConfig, dcfg: DataConfig | None) -> torch.nn.Module:
    """The shared base model; with ``model.vocab: corpus`` a private copy cut to the kept tokens
    (``dcfg`` is only part of the key then: the kept set includes the run's client tokens)."""
    if mcfg.vocab == "full" or dcfg is None:
        base = load_base_model(mcfg)[0]
    else:
        base = vocab.restrict_model(load_base_model(mcfg, fresh=True)[0], _keep(mcfg, dcfg))
    # Once per process, on the decided device (model.device). The training precision's legacy
    # training.bf16 does not matter for placement, hence a default TrainingConfig.
    return place(base, mcfg, resolve_model(mcfg, TrainingConfig()))


def forget_models() -> None:
    """Drop this process's loaded base models (the next ``model`` call loads afresh): for a process
    whose copy may have been left modified, e.g. by a failed warm-up (hetlora_core/warm_up.py)."""
    from .models import _load_cached

    _model.cache_clear()
    _load_cached.cache_clear()


def tokenizer(cfg: HetLoRAConfig) -> Any:
    """The tokenizer every data path uses, and that export writes beside the adapter."""
    return _tokenizer_for(cfg.model)


def _tokenizer_for(mcfg: ModelConfig) -> Any:
    """The one place that picks the tokenizer for a model config: the model's own (SmolLM2's for
    the built-ins)."""
    return load_tokenizer(mcfg)


@functools.lru_cache(maxsize=4)
def _raw_clients(mcfg: ModelConfig, dcfg: DataConfig) -> tuple[ClientData, ...]:
    return tuple(build_clients(dcfg, _tokenizer_for(mcfg)))


# Small: a process that walks every client (the evaluate step) holds only a few at a time.
@functools.lru_cache(maxsize=8)
def _folder_client(mcfg: ModelConfig, dcfg: DataConfig, scfg: StoreConfig, client_id: str) -> ClientData:
    from .folder_data import build_folder_client

    return build_folder_client(dcfg, scfg, _tokenizer_for(mcfg), client_id)


@functools.lru_cache(maxsize=4)
def _keep(mcfg: ModelConfig, dcfg: DataConfig) -> torch.Tensor:
    return vocab.keep_ids(_tokenizer_for(mcfg), _raw_clients(mcfg, dcfg))


@functools.lru_cache(maxsize=4)
def _clients(mcfg: ModelConfig, dcfg: DataConfig) -> tuple[ClientData, ...]:
    raw = _raw_clients(mcfg, dcfg)
    if mcfg.vocab == "full":
        return raw
    return tuple(vocab.remap_clients(raw, _keep(mcfg, dcfg), len(_tokenizer_for(mcfg))))


def model(cfg: HetLoRAConfig) -> torch.nn.Module:
    return _model(cfg.model, cfg.data if cfg.model.vocab == "corpus" else None)


def clients(cfg: HetLoRAConfig) -> dict[str, ClientData]:
    """Every client's data at once: only for Shakespeare or tools (folder data: see ``client_data``)."""
    return {c.client_id: c for c in all_client_data(cfg)}


def all_client_data(cfg: HetLoRAConfig) -> list[ClientData]:
    if cfg.data.source == "folder":
        return [client_data(cfg, c) for c in client_ids(cfg)]
    return list(_clients(cfg.model, cfg.data))


def client_data(cfg: HetLoRAConfig, client_id: str) -> ClientData:
    """One client's data. Folder data: reads that client's folder only (isolation, see module doc)."""
    if cfg.data.source == "folder":
        return _folder_client(cfg.model, cfg.data, cfg.store, client_id)
    data = clients(cfg)
    if client_id not in data:
        raise KeyError(f"client {client_id!r} is not in this run's data (data.num_clients={cfg.data.num_clients})")
    return data[client_id]


def client_ids(cfg: HetLoRAConfig) -> list[str]:
    """The run's client ids (corpus roles or folder names: no tokenizer, no model, no client file read)."""
    return source_client_ids(cfg)


def global_adapter(cfg: HetLoRAConfig, store: st.Store, rnd: int) -> LoraAdapter:
    """The committed global adapter after round ``rnd`` (for export and inspection)."""
    from .methods import method_for
    from .steps.common import load_global

    glob: LoraAdapter = load_global(cfg, store, rnd + 1, method_for(cfg).model_spec(model(cfg)))
    return glob
