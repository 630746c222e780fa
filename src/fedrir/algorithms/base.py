"""The algorithm contract: what every federated algorithm says, and only says.

An algorithm declares
- what the server holds and broadcasts: a ``Payload`` (``dict[str, Tensor]``, so bytes can be
  counted and shipped by any transport),
- what each client keeps privately: a ``State`` (``dict[str, Tensor]``: personal modules, optimizer
  states, BatchNorm buffers), explicit so that it can be checkpointed or kept in Flower's
  ``context.state``,
- the local update ``(payload, state, data, rng) → Update``,
- the aggregation ``(server payload, [(update payload, weight)]) → server payload``,
- personalized evaluation ``(payload, state, data, rng) → Evaluation``,
- for clients that never trained (new clients) and for the global model: the zero-shot
  evaluation ``(payload, data) → Evaluation | None``, what the shared parts predict alone (None
  where they cannot), and the adaptation ``(payload, initial state, data, rng, full) → (payload,
  State)``, which trains the private parts with the shared ones frozen (everything with
  ``full``, so the payload it returns may differ from the broadcast); what it returns is then
  scored by the personalized evaluation.

The in-process engine and the Flower adapter call exactly these methods; neither reaches into an
algorithm's modules. Algorithms compute in a reusable *workspace* of modules, loading a client's
state in and reading it back out, so no per-client module objects are kept alive.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from fedrir.config import Config
from fedrir.data.types import ClientData

EVAL_BATCH = 1000
M = TypeVar("M", bound=nn.Module)
Payload = dict[str, torch.Tensor]
State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Task:
    """What a model needs to know about the problem."""

    input_shape: tuple[int, int, int]
    num_classes: int


@dataclass(frozen=True)
class Runtime:
    """Where and how tensors are computed: device, autocast dtype, memory format."""

    device: torch.device
    autocast_dtype: torch.dtype | None = None
    channels_last: bool = False

    def autocast(self) -> contextlib.AbstractContextManager[object]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def prepare(self, module: M) -> M:
        module.to(self.device)
        if self.channels_last:
            module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        return module

    def input(self, x: torch.Tensor) -> torch.Tensor:
        """A batch in the memory format the modules were prepared for."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)


@dataclass
class Update:
    """What one client's local update returns."""

    payload: Payload
    num_examples: int
    state: State
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Evaluation:
    """Counts from one client's local test set (sums, so that clients can be pooled exactly)."""

    correct: int
    total: int
    loss_sum: float

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


@dataclass(frozen=True)
class NewClientEvaluation:
    """A new client's scores: zero-shot (None where the method has no global model), after
    adapting its private parts, and after training everything (None unless asked for)."""

    zero_shot: Evaluation | None
    adapted: Evaluation
    full: Evaluation | None = None


def evaluate_predictions(
    runtime: Runtime, data: ClientData, predict: Callable[[torch.Tensor], torch.Tensor]
) -> Evaluation:
    """Correct predictions and summed cross-entropy of ``predict`` (images → logits) on the
    client's evaluation set, in batches, without gradients; the caller sets the modules' mode."""
    correct = torch.zeros((), device=runtime.device, dtype=torch.long)
    loss_sum = torch.zeros((), device=runtime.device)
    with torch.no_grad(), runtime.autocast():
        for start in range(0, data.num_eval, EVAL_BATCH):
            x = runtime.input(data.eval_x[start : start + EVAL_BATCH])
            y = data.eval_y[start : start + EVAL_BATCH]
            logits = predict(x).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum")
            correct += (logits.argmax(dim=1) == y).sum()
    return Evaluation(int(correct.item()), data.num_eval, float(loss_sum.item()))


def payload_bytes(payload: Mapping[str, torch.Tensor]) -> int:
    """Bytes of the tensor data in a payload (what a transport must carry at the least)."""
    return sum(t.numel() * t.element_size() for t in payload.values())


def weighted_mean(updates: Sequence[tuple[Payload, float]]) -> Payload:
    """Σ wᵢ·uᵢ / Σ wᵢ per key, accumulated in float64; integer tensors are rounded back."""
    if not updates:
        raise ValueError("weighted_mean needs at least one update")
    total = float(sum(w for _, w in updates))
    if total <= 0:
        raise ValueError("weighted_mean needs a positive total weight")
    keys = updates[0][0].keys()
    out: Payload = {}
    for key in keys:
        acc = torch.zeros_like(updates[0][0][key], dtype=torch.float64)
        for payload, weight in updates:
            acc.add_(payload[key].to(torch.float64), alpha=weight / total)
        dtype = updates[0][0][key].dtype
        out[key] = (acc if dtype.is_floating_point else acc.round()).to(dtype)
    return out


class Algorithm(ABC):
    """Base of every algorithm. Subclasses set ``name`` and implement the abstract methods."""

    name: ClassVar[str]
    settings: ClassVar[frozenset[str]] = frozenset()
    """The keys of :data:`fedrir.config.ALGORITHM_KEYS` this algorithm reads: the others cannot
    change its runs (so a run of it in a compare grid may differ from the grid in them)."""

    def __init__(self, config: Config, task: Task, runtime: Runtime) -> None:
        self.config = config
        self.task = task
        self.runtime = runtime

    @abstractmethod
    def init_server(self, seed: int) -> Payload:
        """The server's initial payload (may be empty: nothing to broadcast yet)."""

    @abstractmethod
    def init_client(self, seed: int, initial: Payload) -> State:
        """A client's initial private state, from ``seed``; ``initial`` is the server's initial
        payload, for private parts that start as a copy of it."""

    @abstractmethod
    def local_update(
        self, payload: Payload, state: State, data: ClientData, rng: torch.Generator
    ) -> Update:
        """Train locally from the broadcast payload; return the upload and the new private state."""

    @abstractmethod
    def evaluate(
        self, payload: Payload, state: State, data: ClientData, rng: torch.Generator
    ) -> Evaluation:
        """Personalized evaluation on the client's local test set; must not change ``state``."""

    def evaluate_global(self, payload: Payload, data: ClientData) -> Evaluation | None:
        """Zero-shot: the shared parts alone (the global model) on ``data``'s evaluation set;
        None where they cannot predict alone (the default)."""
        return None

    @abstractmethod
    def adapt(
        self, payload: Payload, state: State, data: ClientData, rng: torch.Generator, full: bool
    ) -> tuple[Payload, State]:
        """A new client's model, as the payload and state its personalized evaluation takes:
        ``state`` (its initial one) trained on ``data`` for ``new_client_epochs`` epochs from the
        broadcast ``payload``, the shared parts frozen (so the payload returned is the
        broadcast), or trained too with ``full``; must change neither ``payload`` nor ``state``."""

    def aggregate(self, server: Payload, updates: Sequence[tuple[Payload, int]]) -> Payload:
        """Sample-weighted mean of the uploads (FedAvg); unchanged when nobody uploaded."""
        if not updates:
            return server
        return weighted_mean([(p, float(n)) for p, n in updates])

    @abstractmethod
    def parameter_counts(self) -> dict[str, int]:
        """Numbers of shared (travelling) and private parameters, for side-by-side reporting."""
