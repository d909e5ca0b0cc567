"""The interface every federated method implements, split by where it runs.

Model-free (numpy; used by the plan, prune and aggregate steps, which never import torch):
``initial_global``, ``decode`` (the validation of every upload, the trust boundary), ``encode``,
``spec_of``, ``aggregate``, ``prune``, ``client_ranks``; and, for a method that ``streams``,
``summarise`` + ``aggregate_stream`` (the aggregate step then holds one group of uploads at a time).
Model-side (import torch lazily; used by the train and evaluate steps): ``model_spec``,
``receive``, ``train``, ``evaluate``.

A method's global state and each client's update are one opaque value (``State``): a
``LoraAdapter`` for the LoRA family, a dict of full-weight deltas for full fine-tuning.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config import HetLoRAConfig
from ..pruning import PruneDecision

if TYPE_CHECKING:
    from ..evaluation import EvalResult

State = Any  # LoraAdapter (LoRA methods) or dict[str, np.ndarray] (full fine-tuning)
Spec = dict[str, tuple[int, ...]]  # tensor name -> shape every upload must have
_HEADER_SLACK = 4096  # bytes of safetensors header per tensor (name, dtype, shape, offsets) and metadata, generously


class UploadError(ValueError):
    """A client's upload does not pass validation; the client is dropped with this message."""


@dataclass
class ClientUpdate:
    """What the server received from one client: its decoded (validated) state and sample count."""

    client_id: str
    state: State
    num_samples: int


@dataclass
class Aggregated:
    """The new global state and how it was made (for the global manifest and results.json)."""

    state: State
    weights: dict[str, float]
    fallback: str = ""
    clipped: list[str] | None = None


class Stream(abc.ABC):
    """One aggregation fed group by group (a method that ``streams``): its weights are fixed by the
    clients' summaries, so the caller holds one group's states at a time. Call ``add`` for every
    entry of ``groups`` (indices into the summaries), in that order, then ``result``."""

    groups: list[list[int]]

    @abc.abstractmethod
    def add(self, indices: list[int], states: list[State]) -> None: ...

    @abc.abstractmethod
    def result(self) -> Aggregated: ...


class Method(abc.ABC):
    """One federated method. ``trains_lora`` and ``prunes`` answer the questions other code asks."""

    name: str
    trains_lora: bool
    # Whether ``summarise`` and ``aggregate_stream`` exist: the aggregate step then keeps only each
    # upload's summary after validating it and reads the uploads again, group by group (or, within
    # ``strategy.keep_uploads_mb``, adds the tensors it kept).
    streams: bool = False

    def __init__(self, cfg: HetLoRAConfig) -> None:
        self.cfg = cfg
        self.name = cfg.strategy.name

    @property
    def prunes(self) -> bool:
        """Whether clients apply the tail regulariser and the self-pruning decision."""
        return False

    # ------------------------------------------------------------ model-free
    @abc.abstractmethod
    def initial_global(self, spec: Spec) -> State:
        """The global state before round 0 (seeded, reproducible)."""

    @abc.abstractmethod
    def decode(self, data: bytes, spec: Spec | None, where: str, max_rank: int | None = None) -> State:
        """Parse and validate bytes (safetensors only); ``UploadError``/``AdapterError`` naming ``where``."""

    @abc.abstractmethod
    def encode(self, state: State) -> bytes: ...

    @abc.abstractmethod
    def spec_of(self, state: State) -> Spec: ...

    @abc.abstractmethod
    def aggregate(self, prev: State, updates: list[ClientUpdate]) -> Aggregated: ...

    def summarise(self, update: ClientUpdate, prev: State | None = None) -> Any:
        """What the aggregation needs of one validated update besides its tensors (``streams`` only);
        ``prev`` is the global the round started from (None in round 0, before its spec is agreed)."""
        raise NotImplementedError(f"{type(self).__name__} does not stream its aggregation")

    def aggregate_stream(self, prev: State, summaries: list[Any]) -> Stream:
        """The aggregation of the clients ``summaries`` describe, to be fed their states group by
        group; the same bytes as ``aggregate`` over the same updates (``streams`` only)."""
        raise NotImplementedError(f"{type(self).__name__} does not stream its aggregation")

    def update_norms(self, state: State) -> dict[str, float]:
        """Norms the robust aggregation compares across clients and checks the new global by
        (``robust.norm_outliers``, ``robust.check_global``): at least ``"update"``; {} = no check."""
        return {}

    def arrays(self, state: State) -> list[Any]:
        """Every tensor of a state (the new global is checked finite before it is committed)."""
        return list(state.values())

    def prune(self, received: State, trained: State) -> tuple[State, PruneDecision | None]:
        """The client's self-pruning decision (model-free); the default keeps the update as is."""
        return trained, None

    def client_ranks(self, state: State) -> dict[str, int]:
        """Per-module ranks of an update ({} when the method has no ranks)."""
        return {}

    def nbytes(self, state: State) -> int:
        """Raw tensor bytes of a state (what a transfer of it costs, before framing)."""
        return int(sum(v.nbytes for v in state.values()))

    def max_upload_bytes(self, spec: Spec, max_rank: int) -> int:
        """The most bytes an honest upload of a client planned at ``max_rank`` can have: float32
        tensors of ``spec`` plus the safetensors header. Security: the aggregate step refuses a
        manifest claiming more before reading the object, so one client cannot make it read (and
        hold) gigabytes."""
        return 4 * sum(math.prod(shape) for shape in spec.values()) + _HEADER_SLACK * (1 + len(spec))

    # ------------------------------------------------------------ model-side (torch)
    @abc.abstractmethod
    def model_spec(self, model: Any) -> Spec:
        """The spec of the tensors this method trains on ``model``."""

    @abc.abstractmethod
    def receive(self, glob: State, ranks: int | dict[str, int]) -> State:
        """What the server sends a client of ``ranks`` (LoRA: truncation)."""

    @abc.abstractmethod
    def train(self, model: Any, received: State, client: Any, rnd: int) -> tuple[State, Any]:
        """Local training; returns (trained state, client.TrainResult)."""

    @abc.abstractmethod
    def evaluate(self, model: Any, glob: State, clients: list[Any],
                 client_ranks: dict[str, int | dict[str, int]]) -> tuple[EvalResult, EvalResult]:
        """(global at full rank, each client at its own rank) held-out results."""
