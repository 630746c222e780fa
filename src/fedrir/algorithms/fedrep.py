"""FedRep: Collins, Hassani, Mokhtari, Shakkottai. "Exploiting Shared Representations for
Personalized Federated Learning", ICML 2021.

The body (with its BatchNorm buffers) is shared and averaged; the head is personal. A local update
first trains the head for ``head_epochs`` epochs with the body frozen, then the body for
``local_epochs`` epochs with the head frozen, each with its own optimizer.

New clients: no zero-shot evaluation (the head is personal); the adaptation trains the head on
the frozen shared body.
"""

from __future__ import annotations

import torch
from torch import nn

from fedrir.algorithms.baseline import Baseline
from fedrir.data.types import ClientData


class FedRep(Baseline):
    """Shared body, personal head, trained alternately."""

    name = "fedrep"
    settings = frozenset({"head_epochs"})
    shared = ("body.",)

    def _param_groups(self) -> dict[str, list[nn.Parameter]]:
        return self._per_module("head", "body")

    def _local_train(self, data: ClientData, rng: torch.Generator) -> dict[str, float]:
        body, head = self.modules.get_submodule("body"), self.modules.get_submodule("head")

        def frozen_body(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():  # still in training mode: BatchNorm statistics move, as in FedRep
                features = body(x)
            return head(features)

        head_step = self._step(["head"], frozen_body)
        self._fit(data, rng, self.config.baselines.head_epochs, head_step)
        # the head gets gradients here, but only the body's optimizer steps: the head is frozen
        body_step = self._step(["body"])
        return self._fit(data, rng, self.config.train.local_epochs, body_step)
