"""Full fine-tuning (FedAvg of every weight): the quality ceiling, small models only.

Its state is a delta over every parameter of the base model (``dict[str, np.ndarray]``, float32),
zeros before round 0. Uploads pass the same validation as LoRA's (safetensors framing, format tag,
tensor names and shapes against the global's, float32, finite), so a bad full-FT upload drops the
client instead of failing the round.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as np_load

from ..adapter import encode_canonical, read_safetensors_metadata
from ..reduce import Scratch, add_scaled
from ..robust import tensor_norms
from .base import Aggregated, ClientUpdate, Method, Spec, Stream, UploadError

if TYPE_CHECKING:
    from ..evaluation import EvalResult

FORMAT = "hetlora-full-delta/1"
Delta = dict[str, np.ndarray]


class _FullStream(Stream):
    """FedAvg by sample counts, one client per group (a delta is the size of the model)."""

    def __init__(self, summaries: list[tuple[str, int]]) -> None:
        self.summaries = summaries
        self.sums = TensorSums([n for _, n in summaries])
        self.groups = [[i] for i in range(len(summaries))]

    def add(self, indices: list[int], states: list[Delta]) -> None:
        for i, d in zip(indices, states, strict=True):
            self.sums.add(i, d)

    def result(self) -> Aggregated:
        total = sum(n for _, n in self.summaries)
        return Aggregated(self.sums.result(), {c: n / total for c, n in self.summaries})


class FullFineTuning(Method):
    trains_lora = False
    streams = True  # the weights are the sample counts

    # ------------------------------------------------------------ model-free
    def initial_global(self, spec: Spec) -> Delta:
        return {n: np.zeros(shape, dtype=np.float32) for n, shape in spec.items()}

    def decode(self, data: bytes, spec: Spec | None, where: str, max_rank: int | None = None) -> Delta:
        # Security: framing checks by hand first (pickle, truncation, header size), then safetensors only.
        meta = read_safetensors_metadata(data, where)
        if meta.get("format") != FORMAT:
            raise UploadError(f"{where}: not a full-weight delta (metadata format {meta.get('format')!r}, expected {FORMAT!r})")
        try:
            tensors = np_load(data)
        except (SafetensorError, ValueError) as e:
            raise UploadError(f"{where}: unreadable safetensors payload: {e}") from None
        if spec is not None and {k: tuple(v.shape) for k, v in tensors.items()} != {k: tuple(s) for k, s in spec.items()}:
            extra, missing = sorted(set(tensors) - set(spec)), sorted(set(spec) - set(tensors))
            raise UploadError(f"{where}: tensor names or shapes differ from the base model's (extra {extra[:3]}, missing {missing[:3]})")
        for k, v in tensors.items():
            if v.dtype != np.float32:
                raise UploadError(f"{where}: {k}: dtype {v.dtype}, expected float32")
            if not np.isfinite(v).all():
                raise UploadError(f"{where}: {k}: contains NaN or Inf; the client update diverged (lower training.lr)")
        return tensors

    def encode(self, state: Delta) -> bytes:
        return encode_canonical(dict(state), {"format": FORMAT})

    def spec_of(self, state: Delta) -> Spec:
        return {k: tuple(int(d) for d in v.shape) for k, v in state.items()}

    def aggregate(self, prev: Delta, updates: list[ClientUpdate]) -> Aggregated:
        n = sum(u.num_samples for u in updates)
        new = average_tensors([u.state for u in updates], [u.num_samples for u in updates])
        return Aggregated(new, {u.client_id: u.num_samples / n for u in updates})

    def summarise(self, update: ClientUpdate, prev: Delta | None = None) -> tuple[str, int]:
        return update.client_id, update.num_samples

    def update_norms(self, state: Delta) -> dict[str, float]:
        return tensor_norms(state)

    def aggregate_stream(self, prev: Delta, summaries: list[tuple[str, int]]) -> Stream:
        return _FullStream(summaries)

    # ------------------------------------------------------------ model-side
    def model_spec(self, model: Any) -> Spec:
        return {n: tuple(int(d) for d in p.shape) for n, p in model.named_parameters()}

    def receive(self, glob: Delta, ranks: int | dict[str, int]) -> Delta:
        return glob

    def train(self, model: Any, received: Delta, client: Any, rnd: int) -> tuple[Delta, Any]:
        from ..client import train_full

        res = train_full(model, received, client, self.cfg, rnd)
        assert res.full_delta is not None
        return res.full_delta, res

    def evaluate(self, model: Any, glob: Delta, clients: list[Any],
                 client_ranks: dict[str, int | dict[str, int]]) -> tuple[EvalResult, EvalResult]:
        from ..evaluation import evaluate_full

        r = evaluate_full(model, glob, clients, self.cfg)
        return r, r


class TensorSums:
    """Full fine-tuning FedAvg fed one client at a time: ``sum_k n_k/n * delta_k`` per tensor,
    accumulated in float64 through one reused scratch buffer (a full delta is the whole model: the
    aggregate step holds one at a time). Clients are added in index order."""

    def __init__(self, num_samples: Sequence[int]) -> None:
        n = np.array(num_samples, dtype=np.float64)
        self.w = n / n.sum()
        self.acc: dict[str, np.ndarray] = {}
        self._scratch = Scratch()
        self._next = 0

    def add(self, index: int, delta: Mapping[str, np.ndarray]) -> None:
        if index != self._next:
            raise ValueError(f"full-weight deltas are added in client order: expected client {self._next}, got {index}")
        for k, x in delta.items():
            acc = self.acc.setdefault(k, np.zeros(x.shape))
            add_scaled(acc, x, self.w[index], self._scratch.get("tmp", x.size))
        self._next += 1

    def result(self) -> dict[str, np.ndarray]:
        if self._next != len(self.w):
            raise ValueError(f"aggregation incomplete: {self._next} of {len(self.w)} full-weight deltas added")
        return {k: acc.astype(np.float32) for k, acc in self.acc.items()}


def average_tensors(deltas: Sequence[dict[str, np.ndarray]], num_samples: Sequence[int]) -> dict[str, np.ndarray]:
    """Full fine-tuning FedAvg: the sample-weighted mean of full weight deltas (``TensorSums``)."""
    sums = TensorSums(num_samples)
    for i, d in enumerate(deltas):
        sums.add(i, d)
    return sums.result()
