"""The workspace every algorithm computes in, and the training loop they share.

An algorithm keeps one set of modules and optimizers (a :class:`Workspace`) for all its clients:
a client's private state and the server's payload are loaded in, the client trains or is
evaluated, and its new state is read back out. No per-client module objects stay alive, and what a
state holds is explicit: ``model/<key>`` for every module entry the payload does not provide, and
``opt_<group>/<param>/<entry>`` for each optimizer's per-parameter state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping

import torch
from torch import nn

from fedrir.algorithms.base import Payload, Runtime, State
from fedrir.config import Config
from fedrir.data.types import ClientData

Step = Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]
"""One optimisation step on a batch ``(x, y)``. It returns detached per-batch numbers, averaged
over the steps by :func:`fit`, and optionally ``correct``, the batch's correct predictions, which
:func:`fit` turns into ``train_accuracy``."""


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


@contextlib.contextmanager
def frozen(params: Iterable[nn.Parameter]) -> Iterator[None]:
    """No gradient for ``params`` inside the block (their ``requires_grad`` restored after)."""
    saved = [(p, p.requires_grad) for p in params]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def batches(n: int, batch_size: int, rng: torch.Generator, drop_last: bool) -> list[torch.Tensor]:
    """Shuffled index batches for one epoch (one permutation, sliced; no per-sample Python)."""
    perm = torch.randperm(n, generator=rng, device=rng.device)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    return list(perm[:stop].split(batch_size))


def seeded_init(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """Build modules (on the CPU) whose random initialisation depends only on ``seed``; the global
    CPU generator is restored after, and no other device's generator is touched."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return build()


class Workspace:
    """Modules and named optimizers, reused for every client (see the module docstring)."""

    def __init__(
        self, config: Config, modules: nn.Module, groups: Mapping[str, Iterable[nn.Parameter]]
    ) -> None:
        self.modules = modules
        self.params = dict(modules.named_parameters())
        self.names = {p: n for n, p in self.params.items()}
        self.optimizers = {name: make_optimizer(config, list(ps)) for name, ps in groups.items()}

    def load(self, payload: Payload, state: State) -> None:
        """The client's state, with the payload's entries over it (together: every entry)."""
        load_module_state(
            self.modules, {**state, **{f"model/{k}": v for k, v in payload.items()}}, "model/"
        )
        for name, opt in self.optimizers.items():
            load_optimizer_state(opt, self.params, state, f"opt_{name}/")

    def save(self, shared: Collection[str]) -> State:
        """The client's state: every module entry but those in ``shared`` (what the next payload
        provides, so keeping them would be redundant), and every optimizer's state."""
        keys = frozenset(self.modules.state_dict()) - frozenset(shared)
        state = module_state(self.modules, "model/", keys)
        for name, opt in self.optimizers.items():
            state |= optimizer_state(opt, self.names, f"opt_{name}/")
        return state


def fit(
    runtime: Runtime,
    data: ClientData,
    rng: torch.Generator,
    epochs: int,
    batch_size: int,
    step: Step,
) -> dict[str, float]:
    """``epochs`` shuffled passes over the client's training set (drop_last, as the reference),
    all epochs' orders drawn first; returns each number of ``step`` averaged over the steps."""
    sums: dict[str, torch.Tensor] = {}
    correct = torch.zeros((), device=runtime.device, dtype=torch.long)
    order = [idx for _ in range(epochs) for idx in batches(data.num_train, batch_size, rng, True)]
    scored = False
    for idx in order:
        y = data.train_y[idx]
        numbers = step(runtime.input(data.train_x[idx]), y)
        if "correct" in numbers:
            correct += numbers.pop("correct")
            scored = True
        for key, value in numbers.items():
            sums[key] = sums[key] + value if key in sums else value.clone()
    out = {key: value.item() / len(order) for key, value in sums.items()}
    if scored:
        out["train_accuracy"] = correct.item() / sum(len(idx) for idx in order)
    return out
