"""FedRoD: Chen, Chao. "On Bridging Generic and Personalized Federated Learning for Image
Classification", ICLR 2022.

A shared body and a *generic* head, trained with the balanced-softmax loss (Ren et al., NeurIPS
2020: the logits shifted by the log of the client's class counts) and shared whole (parameters and
the body's BatchNorm buffers); a *personal* head on top of the detached features, trained with
plain CE on generic + personal logits, stays on the client. Prediction: generic + personal logits.
Two optimizers, as in the standard implementation (PFLlib).

New clients: zero-shot and global evaluation are the generic path (body and generic head); the
adaptation trains the personal head on CE of generic + personal logits, the generic model frozen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedrir.algorithms.baseline import Baseline, Classifier
from fedrir.data.types import ClientData


def balanced_softmax_loss(
    logits: torch.Tensor, labels: torch.Tensor, class_counts: torch.Tensor
) -> torch.Tensor:
    """CE of ``logits + log(class_counts)``: the softmax of the balanced label distribution.

    Classes the client lacks get −∞ and so neither gradient nor probability.
    """
    return F.cross_entropy(logits + class_counts.to(logits.dtype).log(), labels)


class FedRoD(Baseline):
    """Generic model (balanced softmax, shared) plus a personal head (CE, private)."""

    name = "fedrod"
    shared = ("global.",)
    global_model = "global"

    def _build(self) -> nn.Module:
        head = nn.Linear(self.config.train.embed_dim, self.task.num_classes)
        return nn.ModuleDict({"global": self._classifier(), "personal_head": head})

    def _param_groups(self) -> dict[str, list[nn.Parameter]]:
        return self._per_module("global", "personal_head")

    def _parts(self) -> tuple[Classifier, nn.Module]:
        model = self.modules.get_submodule("global")
        assert isinstance(model, Classifier)
        return model, self.modules.get_submodule("personal_head")

    def _local_train(self, data: ClientData, rng: torch.Generator) -> dict[str, float]:
        model, personal = self._parts()
        counts = torch.bincount(data.train_y, minlength=self.task.num_classes)

        def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            features = model.body(x)
            generic = model.head(features).float()
            return generic, generic.detach() + personal(features.detach()).float()

        def objective(
            out: tuple[torch.Tensor, torch.Tensor], y: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            generic, logits = out
            loss = F.cross_entropy(logits, y)
            # the two losses share no parameters: one backward gives each its own gradients
            return loss, balanced_softmax_loss(generic, y, counts) + loss, logits

        step = self._step(["global", "personal_head"], forward, objective)
        return self._fit(data, rng, self.config.train.local_epochs, step)

    def _predict(self, x: torch.Tensor) -> torch.Tensor:
        model, personal = self._parts()
        features = model.body(x)
        return model.head(features) + personal(features)
