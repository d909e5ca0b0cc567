"""Thin KFP components over hetlora_core, one folder each (``component.py`` holds the plain
function; ``build(image)`` turns them into lightweight components for a given image).

Lightweight components with ``install_kfp_package=False``: the project image already contains kfp
and hetlora_core, so the same function bodies run under kfp.local and in the cluster."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kfp import dsl

from .aggregate_round.component import MAX_TIERS, aggregate_round
from .evaluate_client.component import evaluate_client
from .evaluate_round.component import evaluate_round
from .prune_client.component import prune_client
from .train_client.component import train_client

__all__ = ["Components", "build", "MAX_TIERS", "train_client", "prune_client", "aggregate_round", "evaluate_round",
           "evaluate_client"]


@dataclass(frozen=True)
class Components:
    train: Any
    prune: Any
    aggregate: Any
    evaluate: Any
    evaluate_client: Any


def build(image: str) -> Components:
    """The five components for ``image`` (the project image built from images/)."""
    deco = dsl.component(base_image=image, install_kfp_package=False)
    return Components(deco(train_client), deco(prune_client), deco(aggregate_round), deco(evaluate_round),
                      deco(evaluate_client))
