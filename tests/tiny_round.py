"""The smallest real federated round, for tests that run one end to end (kfp.local, the warm task
server): the tiny random model, three Shakespeare clients on two tiers (ranks 2 and 4), one round.
One definition, so those tests keep describing the same round and stay seconds-fast together."""

from __future__ import annotations

from typing import Any


def tiny_round(experiment: str, *, local_steps: int = 2, **federation: Any) -> dict[str, Any]:
    """The config dict (for ``config_from_dict``); ``federation`` adds or overrides federation keys."""
    return {
        "experiment": experiment,
        "model": {"name": "tiny", "tiny_hidden": 32, "tiny_layers": 1},
        "data": {"num_clients": 3, "max_chars": 6000, "seq_len": 32, "eval_max_tokens": 128},
        "ranks": {"r_min": 2, "r_max": 4, "tiers": [{"name": "small", "rank": 2}, {"name": "large", "rank": 4}]},
        "training": {"local_steps": local_steps, "batch_size": 2, "bf16": False, "threads": 1},
        "federation": {"rounds": 1, "clients_per_round": 3, **federation},
    }
