"""FedProx: Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith. "Federated Optimization in Heterogeneous
Networks", MLSys 2020.

FedAvg plus the proximal term (μ/2)‖w − w_global‖² in the local loss, over every parameter, with
w_global the model received this round (μ = ``prox_mu``). Communication is FedAvg's: the whole
model (parameters and BatchNorm buffers). With μ = 0 it is FedAvg, number for number. New
clients are scored as FedAvg's (the global model).
"""

from __future__ import annotations

import torch

from fedrir.algorithms.baseline import cross_entropy, proximal_term
from fedrir.algorithms.fedavg import FedAvg
from fedrir.data.types import ClientData


class FedProx(FedAvg):
    """FedAvg with a pull towards the round's global model."""

    name = "fedprox"
    settings = frozenset({"prox_mu"})

    def _local_train(self, data: ClientData, rng: torch.Generator) -> dict[str, float]:
        params = list(self.modules.parameters())
        anchors = [p.detach().clone() for p in params]  # the global model just loaded
        mu = self.config.baselines.prox_mu
        step = self._step(
            ["local"], objective=cross_entropy(lambda: proximal_term(params, anchors, mu))
        )
        return self._fit(data, rng, self.config.train.local_epochs, step)
