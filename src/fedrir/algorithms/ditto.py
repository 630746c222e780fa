"""Ditto: Li, Hu, Beirami, Smith. "Ditto: Fair and Robust Federated Learning Through
Personalization", ICML 2021.

The global model is trained as in FedAvg and travels whole (parameters and BatchNorm buffers).
Each client also trains a personal model v on CE + (λ/2)‖v − w‖², w the global model received this
round (λ = ``ditto_lambda``); v, its BatchNorm buffers and both optimizer states stay on the client,
and v is what is evaluated. As in the standard implementation (PFLlib), v is trained first.

New clients: zero-shot and global evaluation are the global model w; the adaptation trains the
personal model v (from its initial state) on CE with w frozen, and v is scored.
"""

from __future__ import annotations

import torch

from fedrir.algorithms.baseline import GlobalAndPersonal, cross_entropy, proximal_term
from fedrir.data.types import ClientData


class Ditto(GlobalAndPersonal):
    """FedAvg for the global model, a proximally regularised personal model."""

    name = "ditto"
    settings = frozenset({"ditto_lambda"})

    def _local_train(self, data: ClientData, rng: torch.Generator) -> dict[str, float]:
        w, v = self.modules.get_submodule("global"), self.modules.get_submodule("personal")
        anchors = [p.detach().clone() for p in w.parameters()]
        personal = list(v.parameters())
        lam, epochs = self.config.baselines.ditto_lambda, self.config.train.local_epochs
        penalty = cross_entropy(lambda: proximal_term(personal, anchors, lam))
        metrics = self._fit(data, rng, epochs, self._step(["personal"], v, penalty))
        global_ = self._fit(data, rng, epochs, self._step(["global"], w))
        return metrics | {f"global_{k}": value for k, value in global_.items()}

    def _predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.modules.get_submodule("personal")(x)
