"""What several steps share: parsing a task's config, and the global state clients receive."""

from __future__ import annotations

import json

from .. import store as st
from ..config import HetLoRAConfig, config_from_dict
from ..methods import Spec, method_for
from ..methods.base import State


def config_of(config_json: str) -> HetLoRAConfig:
    """A task's config, validated again inside the task (it arrives as a pipeline parameter)."""
    return config_from_dict(json.loads(config_json))


def load_global(cfg: HetLoRAConfig, store: st.Store, rnd: int, spec: Spec | None) -> State:
    """The global state clients receive in round ``rnd``: the method's seeded initial state at
    round 0 (it needs ``spec``), else the global committed by round ``rnd - 1``."""
    method = method_for(cfg)
    if rnd == 0:
        if spec is None:
            raise ValueError("the round 0 global is built from the model's spec; pass it")
        return method.initial_global(spec)
    # Verified against the server signature where this process holds the key (aggregate, evaluate):
    # a replayed or forged global never becomes the base of a new round. Clients: see store/signing.py.
    data, _ = st.signing.get_global(store, cfg.store, cfg.experiment, rnd - 1)
    return method.decode(data, spec, where=f"{st.global_prefix(cfg.experiment, rnd - 1)} (global of round {rnd - 1})")
