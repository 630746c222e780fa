"""APFL: Deng, Kamani, Mahdavi. "Adaptive Personalized Federated Learning", arXiv:2003.13461, 2020.

Each client keeps a personal model v and a mixing weight α (initially ``apfl_alpha``); the global
model w is trained as in FedAvg and travels whole (parameters and BatchNorm buffers). Per batch, as
in the paper's Algorithm 1: a step of w on its own loss; a step of v on the loss of the mixed model
v̄ = α·v + (1 − α)·w (parameters mixed, as PFLlib does; w held fixed), i.e. with gradient α·∇f(v̄);
and a gradient step on α, ∂f(v̄)/∂α = ⟨v − w, ∇f(v̄)⟩, with the local learning rate, clipped to
[0, 1]. v̄ is what is evaluated; it runs with v's BatchNorm buffers, which track v̄'s activations.
v, α and both optimizer states stay on the client.

New clients: zero-shot and global evaluation are the global model w; the adaptation trains v
through the mixture v̄ (α kept at its initial value, w frozen), and v̄ is scored.
"""

from __future__ import annotations

import torch
from torch.func import functional_call

from fedrir.algorithms.base import Payload, State
from fedrir.algorithms.baseline import GlobalAndPersonal
from fedrir.data.types import ClientData


class APFL(GlobalAndPersonal):
    """FedAvg for the global model, a learned per-client mixture with a personal model."""

    name = "apfl"
    settings = frozenset({"apfl_alpha"})

    def init_client(self, seed: int, initial: Payload) -> State:
        alpha = torch.tensor(self.config.baselines.apfl_alpha)
        return super().init_client(seed, initial) | {"alpha": alpha}

    def _load(self, payload: Payload, state: State) -> None:
        super()._load(payload, state)
        self.alpha = state["alpha"].to(self.runtime.device)

    def _save(self) -> State:
        return super()._save() | {"alpha": self.alpha.detach().clone()}

    def _mixed(self, alpha: torch.Tensor) -> dict[str, torch.Tensor]:
        """α·v + (1 − α)·w per parameter, w detached (only v and α learn from the mixture)."""
        w = dict(self.modules.get_submodule("global").named_parameters())
        return {
            name: alpha * v + (1 - alpha) * w[name].detach()
            for name, v in self.modules.get_submodule("personal").named_parameters()
        }

    def _mixture(self, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        return functional_call(self.modules.get_submodule("personal"), self._mixed(alpha), (x,))

    def _local_train(self, data: ClientData, rng: torch.Generator) -> dict[str, float]:
        alpha = self.alpha.clone().requires_grad_()
        lr = self.config.train.lr
        step_global = self._step(["global"], self.modules.get_submodule("global"))
        step_mixture = self._step(["personal"], lambda x: self._mixture(x, alpha))

        def step(x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
            step_global(x, y)
            alpha.grad = None
            out = step_mixture(x, y)
            assert alpha.grad is not None
            with torch.no_grad():
                alpha.sub_(lr * alpha.grad).clamp_(0, 1)
            return out

        metrics = self._fit(data, rng, self.config.train.local_epochs, step)
        self.alpha = alpha.detach()
        return metrics | {"alpha": float(self.alpha)}

    def _predict(self, x: torch.Tensor) -> torch.Tensor:
        return self._mixture(x, self.alpha)
