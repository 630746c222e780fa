"""The algorithm contract: what every federated algorithm says, and only says.

An algorithm declares
- what the server holds and broadcasts: a ``Payload`` (``dict[str, Tensor]``, so bytes can be
  counted and shipped by any transport),
- what each client keeps privately: a ``State`` (``dict[str, Tensor]``: personal modules, optimizer
  states, BatchNorm buffers), explicit so that it can be checkpointed or kept in Flower's
  ``context.state``,
- the local update ``(payload, state, data, rng) → Update``,
- the aggregation ``(server payload, [(update payload, weight)]) → server payload``,
- personalized evaluation ``(payload, state, data, rng) → Evaluation``.

The in-process engine and the Flower adapter call exactly these methods; neither reaches into an
algorithm's modules. Algorithms compute in a reusable *workspace* of modules, loading a client's
state in and reading it back out, so no per-client module objects are kept alive.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, TypeVar

import numpy as np
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


def evaluate_predictions(
    runtime: Runtime, data: ClientData, predict: Callable[[torch.Tensor], torch.Tensor]
) -> Evaluation:
    """Correct predictions and summed cross-entropy of ``predict`` (images → logits) on the
    client's test set, in batches, without gradients; the caller sets the modules' mode."""
    correct = torch.zeros((), device=runtime.device, dtype=torch.long)
    loss_sum = torch.zeros((), device=runtime.device)
    with torch.no_grad(), runtime.autocast():
        for start in range(0, data.num_test, EVAL_BATCH):
            x = runtime.input(data.test_x[start : start + EVAL_BATCH])
            y = data.test_y[start : start + EVAL_BATCH]
            logits = predict(x).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum")
            correct += (logits.argmax(dim=1) == y).sum()
    return Evaluation(int(correct.item()), data.num_test, float(loss_sum.item()))


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from a tuple of integers (seed, round, client, purpose, …), order-sensitive."""
    return int(np.random.SeedSequence(list(keys)).generate_state(2, dtype=np.uint64)[0] >> 1)


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


def module_state(module: nn.Module, prefix: str = "", keys: Collection[str] | None = None) -> State:
    """A detached copy of ``module``'s parameters and buffers (those named in ``keys``, if
    given), keys prefixed."""
    return {
        f"{prefix}{k}": v.detach().clone(memory_format=torch.contiguous_format)
        for k, v in module.state_dict().items()
        if keys is None or k in keys
    }


def load_module_state(module: nn.Module, state: Mapping[str, torch.Tensor], prefix: str) -> None:
    """Copy the ``prefix``-keyed entries of ``state`` into ``module`` (all must be there)."""
    n = len(prefix)
    module.load_state_dict(
        {k[n:]: v for k, v in state.items() if k.startswith(prefix)}, strict=True
    )


def optimizer_state(
    opt: torch.optim.Optimizer, names: Mapping[nn.Parameter, str], prefix: str
) -> State:
    """An optimizer's per-parameter state (e.g. Adam's step and moments), keyed by name."""
    out: State = {}
    for param, entries in opt.state.items():
        for key, value in entries.items():
            out[f"{prefix}{names[param]}/{key}"] = (  # type: ignore[index]
                value.detach().clone() if torch.is_tensor(value) else torch.tensor(value)
            )
    return out


def load_optimizer_state(
    opt: torch.optim.Optimizer,
    params: Mapping[str, nn.Parameter],
    state: Mapping[str, torch.Tensor],
    prefix: str,
) -> None:
    """Restore what :func:`optimizer_state` saved; parameters with no saved state start fresh."""
    opt.state.clear()
    n = len(prefix)
    for key, value in state.items():
        if key.startswith(prefix):
            name, entry = key[n:].rsplit("/", 1)
            param = params[name]
            # moments take the parameter's memory format (e.g. channels-last), scalars stay as is
            like = torch.empty_like(param) if value.shape == param.shape else value
            opt.state[param][entry] = like.copy_(value) if like is not value else value.clone()


def make_optimizer(
    config: Config, params: Iterator[nn.Parameter] | list[nn.Parameter]
) -> torch.optim.Optimizer:
    """The local optimizer every algorithm uses, as configured (Adam or plain SGD)."""
    params = list(params)
    if config.train.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.train.lr)
    return torch.optim.SGD(params, lr=config.train.lr)


def batches(n: int, batch_size: int, rng: torch.Generator, drop_last: bool) -> list[torch.Tensor]:
    """Shuffled index batches for one epoch (one permutation, sliced; no per-sample Python)."""
    perm = torch.randperm(n, generator=rng, device=rng.device)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    return list(perm[:stop].split(batch_size))


def seeded_init(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """Build modules whose random initialisation depends only on ``seed`` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


class Algorithm(ABC):
    """Base of every algorithm. Subclasses set ``name`` and implement the abstract methods."""

    name: ClassVar[str]

    def __init__(self, config: Config, task: Task, runtime: Runtime) -> None:
        self.config = config
        self.task = task
        self.runtime = runtime

    @abstractmethod
    def init_server(self, seed: int) -> Payload:
        """The server's initial payload (may be empty: nothing to broadcast yet)."""

    @abstractmethod
    def init_client(self, client_id: int, seed: int) -> State:
        """A client's initial private state."""

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

    def broadcast(self, server: Payload) -> Payload:
        """What the server sends to clients; by default everything it holds."""
        return server

    def aggregate(self, server: Payload, updates: Sequence[tuple[Payload, int]]) -> Payload:
        """Sample-weighted mean of the uploads (FedAvg); unchanged when nobody uploaded."""
        if not updates:
            return server
        return weighted_mean([(p, float(n)) for p, n in updates])

    @abstractmethod
    def parameter_counts(self) -> dict[str, int]:
        """Numbers of shared (travelling) and private parameters, for side-by-side reporting."""
