"""FedDBE: Zhang, Hua, Cao, Wang, Song, Xue, Ma, Guan. "Eliminating Domain Bias for Federated
Learning in Representation Space", NeurIPS 2023 (FedAvg + DBE, the domain bias eliminator).

The model (body and head, with the BatchNorm buffers) travels and is averaged as in FedAvg. Each
client adds a personalized representation bias memory (PRBM), a learned vector r̄ of the feature
width that never leaves it: the head sees body(x) + r̄. Mean regularization (MR) pulls the running
mean m of the client's representations (m ← (1 − μ)·m + μ·mean of the batch, restarted from 0 at
every local update, gradient through the current batch only) towards a global mean ḡ:
loss = CE + κ · mean_d ½(m − ḡ)² (μ = ``dbe_momentum``, κ = ``dbe_kappa``).

ḡ is computed once, as the sample-weighted mean of the clients' final running means of an
"initialization period" trained without DBE, and then kept fixed. As the authors' code does
(TsingZ0/DBE and PFLlib ``clientdbe.py``, ``serverdbe.py``). Defaults: μ = 1, κ = 50, from the
authors' own command (TsingZ0/DBE ``system/run_me.sh``: ``-mo 1 -klw 50``); PFLlib's ``main.py``
defaults (0.1, 0.0) switch MR off.

Where this module differs, and why: PFLlib runs the initialization period as an extra pass of
every client before round 1 and then discards the models it trained; here it is the first round
a client upload arrives in (normally round 1): those clients train without DBE, upload their
running mean with the model, and the server sets ḡ from them; the round's training is kept.
This fits the contract (no extra round, nothing outside it) and costs one vector once. The server
then broadcasts ḡ with the model every round (a vector of the feature width), so that clients
that join later get it too. The optimizers (model and PRBM) are the configured one, each with its
state kept per client (PFLlib: plain SGD for both).

New clients: no zero-shot evaluation (the head sees the client's PRBM); the adaptation trains the
PRBM under the frozen shared model, on CE.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fedrir.algorithms.base import Payload, State, Update, weighted_mean
from fedrir.algorithms.baseline import Baseline, Classifier, scored
from fedrir.data.types import ClientData
from fedrir.models.cnn import InputShape

GLOBAL_MEAN = "global_mean"
"""Server payload key of ḡ, present once set."""
RUNNING_MEAN = "running_mean"
"""Upload key of a client's running mean, sent while the server has no ḡ."""


def mean_regularizer(running_mean: torch.Tensor, global_mean: torch.Tensor) -> torch.Tensor:
    """MR: mean over the feature dimensions of ½(m − ḡ)²."""
    return (0.5 * (running_mean - global_mean) ** 2).mean()


class BiasedClassifier(Classifier):
    """A :class:`Classifier` whose head sees the features plus the PRBM vector ``prbm``."""

    def __init__(self, input_shape: InputShape, embed_dim: int, num_classes: int) -> None:
        super().__init__(input_shape, embed_dim, num_classes)
        self.prbm = nn.Parameter(torch.zeros(embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x) + self.prbm)


class FedDBE(Baseline):
    """FedAvg with a personal representation bias and a pull towards the global feature mean."""

    name = "feddbe"
    settings = frozenset({"dbe_momentum", "dbe_kappa"})
    shared = ("body.", "head.")

    def _build(self) -> nn.Module:
        return BiasedClassifier(
            self.task.input_shape, self.config.train.embed_dim, self.task.num_classes
        )

    def _param_groups(self) -> dict[str, list[nn.Parameter]]:
        """One optimizer for the model (body and head), one for the PRBM, as in PFLlib."""
        model = self._model()
        return {"local": [*model.body.parameters(), *model.head.parameters()], "prbm": [model.prbm]}

    def _model(self) -> BiasedClassifier:
        assert isinstance(self.modules, BiasedClassifier)
        return self.modules

    def _load(self, payload: Payload, state: State) -> None:
        mean = payload.get(GLOBAL_MEAN)
        self.global_mean = None if mean is None else mean.to(self.runtime.device)
        super()._load({k: v for k, v in payload.items() if k != GLOBAL_MEAN}, state)

    def _local_train(self, data: ClientData, rng: torch.Generator) -> dict[str, float]:
        model, global_mean = self._model(), self.global_mean
        momentum, kappa = self.config.baselines.dbe_momentum, self.config.baselines.dbe_kappa
        running = torch.zeros(self.config.train.embed_dim, device=self.runtime.device)
        opts = (self.optimizers["local"], self.optimizers["prbm"])

        def step(x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
            nonlocal running
            with self.runtime.autocast():
                features = model.body(x)
                # the initialization period trains without DBE: no bias, no regularizer
                biased = features if global_mean is None else features + model.prbm
                logits = model.head(biased).float()
            running = (1 - momentum) * running.detach() + momentum * features.float().mean(0)
            loss = F.cross_entropy(logits, y)
            total = loss
            if global_mean is not None:
                total = loss + kappa * mean_regularizer(running, global_mean)
            self.modules.zero_grad(set_to_none=True)
            total.backward()
            for opt in opts:  # the PRBM has no gradient (so is not stepped) without DBE
                opt.step()
            return scored(loss, logits, y)

        metrics = self._fit(data, rng, self.config.train.local_epochs, step)
        self.running_mean = running.detach()
        return metrics

    def local_update(
        self, payload: Payload, state: State, data: ClientData, rng: torch.Generator
    ) -> Update:
        update = super().local_update(payload, state, data, rng)
        if GLOBAL_MEAN not in payload:
            update.payload[RUNNING_MEAN] = self.running_mean
        return update

    def aggregate(self, server: Payload, updates: Sequence[tuple[Payload, int]]) -> Payload:
        """FedAvg of the models; ḡ, once, as the sample-weighted mean of the running means."""
        if not updates:
            return server
        models = [({k: v for k, v in p.items() if k != RUNNING_MEAN}, n) for p, n in updates]
        out = super().aggregate(server, models)
        if GLOBAL_MEAN not in server:
            means = weighted_mean([({GLOBAL_MEAN: p[RUNNING_MEAN]}, float(n)) for p, n in updates])
            out |= means
        return out
