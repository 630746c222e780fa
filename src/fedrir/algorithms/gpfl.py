"""GPFL: Zhang, Hua, Wang, Song, Xue, Ma, Cao, Guan. "GPFL: Simultaneously Learning Global and
Personalized Feature Information for Personalized Federated Learning", ICCV 2023.

On top of the shared extractor (the GFE architecture) sit the Conditional Valve (CoV: from a
conditional input c, γ(c) and β(c), each Linear → ReLU → LayerNorm; a feature f becomes
ReLU(f ⊙ (1 + γ) + β)) and the Global Category Embedding layer (GCE: one d-vector eᵧ per class).
Each client routes f twice through the CoV: with its *personalized* input p (the GCE rows weighted
by its class frequencies) into its personal head (CE), and with the *global* input g (the mean GCE
row) into the GCE, where f_G is trained by the angle-level loss (CE over cosine similarities to
every eᵧ) and the magnitude-level regularizer λ·‖f_G − ēᵧ‖ (ē: the GCE as received, frozen; the norm
over the whole batch, as the reference), with an L2 penalty μ on the GCE and CoV parameters
(λ = ``gpfl_lambda``, μ = ``gpfl_mu``). Extractor (BatchNorm buffers included), GCE and CoV are
uploaded and averaged by sample count; the personal head, g, p and the optimizer state stay. The
prediction is head(CoV(f, p)).

Follows PFLlib (``clientgpfl.py``, ``servergpfl.py``; read, not copied), including its order: g and
p are computed after local training from the GCE as this client trained it, and used in the next
round's training and in evaluation (zero before the first round). Where it differs, and why:

- λ = 0.01 and μ = 0.1 by default, the authors' values for the 4-layer CNN (TsingZ0/GPFL
  ``run_me.sh``); PFLlib's ``-lam 1 -mu 0`` are flag defaults shared by many methods, and μ = 0
  would drop one of GPFL's regularizers.
- μ enters as the loss term (μ/2)·Σ‖θ‖², which adds μ·θ to the gradient as PFLlib's SGD
  ``weight_decay`` does, but works with whichever optimizer is configured (Adam by default, its
  state kept per client; one optimizer for all modules, as Adam is per-parameter anyway).
- BatchNorm buffers travel with the extractor, as for every baseline here (PFLlib moves parameters
  only). Class frequencies count every training sample (PFLlib's loader drops the last partial
  batch).
- A client's personal head starts from its own seed (PFLlib copies one model into every client);
  the head is never averaged, so only its starting point differs.
- A client that does not train in a round keeps its g and p; PFLlib recomputes them on every client
  from its previous GCE (identical under full participation).

New clients: no zero-shot evaluation (the prediction is the personal head's); a new client takes
g and p from the broadcast GCE and its class counts, then trains its head on CE, the shared
extractor, GCE and CoV frozen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedrir.algorithms.base import Payload, State
from fedrir.algorithms.baseline import Baseline, scored
from fedrir.data.types import ClientData
from fedrir.models.cnn import Encoder

INPUTS = ("generic_input", "personal_input")
"""Client-state keys of the conditional inputs g and p."""


class ConditionalValve(nn.Module):
    """CoV: ``([B, d], [d]) → [B, d]``, the feature modulated by its conditional input."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.LayerNorm(dim))
        self.beta = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.LayerNorm(dim))

    def forward(self, feature: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        return F.relu(feature * (1 + self.gamma(condition)) + self.beta(condition))


def angle_loss(
    features: torch.Tensor, labels: torch.Tensor, embeddings: torch.Tensor
) -> torch.Tensor:
    """CE over the cosine similarities of each feature to every class embedding (no scale)."""
    return F.cross_entropy(F.normalize(features) @ F.normalize(embeddings).T, labels)


def magnitude_loss(
    features: torch.Tensor, labels: torch.Tensor, embeddings: torch.Tensor
) -> torch.Tensor:
    """‖F − E[y]‖ over the whole batch (not squared, not averaged, as the reference)."""
    return torch.linalg.vector_norm(features - embeddings[labels])


class GPFL(Baseline):
    """Shared extractor, CoV and GCE; a personal head on the personally conditioned feature."""

    name = "gpfl"
    settings = frozenset({"gpfl_lambda", "gpfl_mu"})
    shared = ("body.", "gce.", "cov.")

    def _build(self) -> nn.Module:
        dim, classes = self.config.train.embed_dim, self.task.num_classes
        return nn.ModuleDict(
            {
                "body": Encoder(self.task.input_shape, dim),
                "head": nn.Linear(dim, classes),
                "gce": nn.Embedding(classes, dim),
                "cov": ConditionalValve(dim),
            }
        )

    def init_client(self, seed: int, initial: Payload) -> State:
        zero = torch.zeros(self.config.train.embed_dim)
        return super().init_client(seed, initial) | {k: zero.clone() for k in INPUTS}

    def _load(self, payload: Payload, state: State) -> None:
        super()._load(payload, state)
        self.generic, self.personal = (state[k].to(self.runtime.device) for k in INPUTS)

    def _save(self) -> State:
        return super()._save() | dict(zip(INPUTS, (self.generic, self.personal), strict=True))

    def _inputs(self, data: ClientData) -> None:
        """g and p from the workspace's GCE: its mean row, and its rows weighted by the client's
        class frequencies."""
        gce = self.modules.get_submodule("gce")
        assert isinstance(gce, nn.Embedding)
        embeddings = gce.weight.detach()
        counts = torch.bincount(data.train_y, minlength=self.task.num_classes).float()
        self.generic = embeddings.mean(0)
        self.personal = (counts / counts.sum()) @ embeddings

    def adapt(
        self, payload: Payload, state: State, data: ClientData, rng: torch.Generator, full: bool
    ) -> tuple[Payload, State]:
        self._load(payload, state)
        self._inputs(data)
        return super().adapt(payload, self._save(), data, rng, full)

    def _local_train(self, data: ClientData, rng: torch.Generator) -> dict[str, float]:
        body, head, gce, cov = map(self.modules.get_submodule, ("body", "head", "gce", "cov"))
        assert isinstance(gce, nn.Embedding)
        table = gce.weight
        received = table.detach().clone()  # the global GCE: the magnitude regularizer's target
        decayed = [*gce.parameters(), *cov.parameters()]
        cfg, opt = self.config.baselines, self.optimizers["local"]

        def step(x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
            with self.runtime.autocast():
                feature = body(x)
                logits = head(cov(feature, self.personal)).float()
                global_feature = cov(feature, self.generic).float()
            loss = F.cross_entropy(logits, y)
            total = (
                loss
                + angle_loss(global_feature, y, table)
                + cfg.gpfl_lambda * magnitude_loss(global_feature, y, received)
                + cfg.gpfl_mu / 2 * torch.stack([p.square().sum() for p in decayed]).sum()
            )
            self.modules.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            return scored(loss, logits, y)

        metrics = self._fit(data, rng, self.config.train.local_epochs, step)
        self._inputs(data)  # the next round's, from the GCE as trained here (PFLlib's order)
        return metrics

    def _predict(self, x: torch.Tensor) -> torch.Tensor:
        feature = self.modules.get_submodule("body")(x)
        return self.modules.get_submodule("head")(
            self.modules.get_submodule("cov")(feature, self.personal)
        )
