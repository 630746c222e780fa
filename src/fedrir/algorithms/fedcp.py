"""FedCP: Zhang, Hua, Wang, Song, Xue, Ma, Guan. "FedCP: Separating Feature Information for
Personalized Federated Learning via Conditional Policy", KDD 2023.

A client's model is the shared extractor (the GFE architecture), a *personal* head, the *global*
head and the Conditional Policy Network (CPN: Linear(d, 2d) → LayerNorm → ReLU, read as a pair of
logits per feature dimension). Per sample, the CPN reads the feature f times the client's context
(its personal head's weights summed over classes, unit length) and gives a soft policy {s, 1 − s}
per dimension (a Gumbel softmax over the pair, τ = 1); the personal head sees f·s, the frozen global
head f·(1 − s), and their logits add. The loss is CE + λ·MMD(f, f⁰), λ = ``cp_lambda``, f⁰ the
features of the extractor as received this round (frozen), the MMD with a sum of RBF kernels
exp(−‖a − b‖² / 2h), h ∈ {10, 15, 20, 50}. The client uploads the extractor (BatchNorm buffers
included), the CPN and ½(personal head + global head) as its global head; the server takes the
sample-weighted mean of each. The personal head and the optimizer state stay on the client.

Follows PFLlib (``clientcp.py``, ``servercp.py``; read, not copied). Where it differs, and why:

- λ = 5 by default, the authors' value for the 4-layer CNN (TsingZ0/FedCP ``run_me.sh``); PFLlib's
  ``-lam 1`` is one flag default shared by many methods.
- The context always comes from the personal head. PFLlib gives each client a uniform random
  context until its first round ends and the personal head's sums from then on: the same thereafter.
- BatchNorm buffers travel with the extractor, as for every baseline here (PFLlib moves parameters
  only); the optimizer is the project's (Adam by default, its state kept per client), not SGD.
- Every client is evaluated with the latest global head and CPN; PFLlib refreshes them only on the
  clients that trained that round (identical under full participation).
- The Gumbel noise comes from the generator passed in, at evaluation too (PFLlib also samples it at
  evaluation, from the global RNG).

New clients: no zero-shot evaluation (the prediction needs a personal head); the adaptation trains
the personal head through the policy, extractor and CPN frozen, on CE of the summed logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedrir.algorithms.base import Evaluation, Payload, Runtime, State, Task, evaluate_predictions
from fedrir.algorithms.baseline import Baseline, scored
from fedrir.algorithms.workspace import Step
from fedrir.config import Config
from fedrir.data.types import ClientData
from fedrir.models.cnn import Encoder

TAU = 1.0
"""Gumbel-softmax temperature (PFLlib's fixed value)."""
BANDWIDTHS = (10.0, 15.0, 20.0, 50.0)
"""The MMD's RBF bandwidths on squared distances (PFLlib's)."""


def gumbel_softmax(logits: torch.Tensor, tau: float, rng: torch.Generator) -> torch.Tensor:
    """softmax((logits + g) / τ) over dim 1, g ~ Gumbel(0, 1) drawn from ``rng`` (torch's own
    ``F.gumbel_softmax`` draws from the global RNG, which would make runs irreproducible)."""
    exponential = torch.empty(logits.shape, device=logits.device).exponential_(generator=rng)
    return ((logits - exponential.log()) / tau).softmax(dim=1)


def _square_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """‖aᵢ − bⱼ‖² for every pair, expanded (smooth at 0, unlike ``cdist``)."""
    return a.square().sum(1, keepdim=True) + b.square().sum(1) - 2 * a @ b.T


def mmd(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Biased empirical MMD² of two equal-size samples under k(a, b) = Σₕ exp(−‖a − b‖² / 2h)."""

    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d = _square_distances(a, b)
        return torch.stack([torch.exp(-0.5 * d / h) for h in BANDWIDTHS]).sum(0)

    return (kernel(x, x) + kernel(y, y) - 2 * kernel(x, y)).mean()


class ConditionalPolicy(nn.Module):
    """The CPN: ``[B, d] → ([B, d], [B, d])``, the personal and global shares s and 1 − s."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(dim, 2 * dim), nn.LayerNorm(2 * dim), nn.ReLU())

    def forward(self, x: torch.Tensor, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        policy = gumbel_softmax(self.fc(x).reshape(len(x), 2, -1), TAU, rng)
        return policy[:, 0], policy[:, 1]


class FedCP(Baseline):
    """Features split per sample between a personal and a global head by a shared policy net."""

    name = "fedcp"
    settings = frozenset({"cp_lambda"})
    shared = ("body.", "global_head.", "cpn.")

    def __init__(self, config: Config, task: Task, runtime: Runtime) -> None:
        super().__init__(config, task, runtime)
        # the extractor as received this round: the MMD's reference, frozen and never saved
        received = Encoder(task.input_shape, config.train.embed_dim).requires_grad_(False)
        self.received = runtime.prepare(received)

    def _build(self) -> nn.Module:
        dim, classes = self.config.train.embed_dim, self.task.num_classes
        return nn.ModuleDict(
            {
                "body": Encoder(self.task.input_shape, dim),
                "head": nn.Linear(dim, classes),
                # only averaging moves the global head: it is frozen in local training
                "global_head": nn.Linear(dim, classes).requires_grad_(False),
                "cpn": ConditionalPolicy(dim),
            }
        )

    def init_client(self, seed: int, initial: Payload) -> State:
        """The personal head starts as a copy of the initial global head: in PFLlib every client
        starts from one model, whose global head is a copy of its head."""
        return {
            f"model/head.{k.removeprefix('global_head.')}": v
            for k, v in initial.items()
            if k.startswith("global_head.")
        }

    def _param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"local": [p for p in self.modules.parameters() if p.requires_grad]}

    def _context(self) -> torch.Tensor:
        """The client's context: its personal head's weights summed over classes, unit length."""
        head = self.modules.get_submodule("head")
        assert isinstance(head, nn.Linear)
        return F.normalize(head.weight.detach().sum(0), dim=0)

    def _forward(
        self, x: torch.Tensor, context: torch.Tensor, rng: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (personal head on f·s plus global head on f·(1 − s)) and the feature f."""
        feature = self.modules.get_submodule("body")(x)
        personal, generic = self.modules.get_submodule("cpn")(feature * context, rng)
        logits = self.modules.get_submodule("head")(feature * personal)
        logits = logits + self.modules.get_submodule("global_head")(feature * generic)
        return logits, feature

    def _local_train(self, data: ClientData, rng: torch.Generator) -> dict[str, float]:
        context = self._context()
        self.received.load_state_dict(self.modules.get_submodule("body").state_dict())
        self.received.train()  # as the reference: batch statistics, like the extractor it mirrors
        lam, opt = self.config.baselines.cp_lambda, self.optimizers["local"]

        def step(x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
            with self.runtime.autocast():
                logits, feature = self._forward(x, context, rng)
                with torch.no_grad():
                    reference = self.received(x) if lam else None
            loss = F.cross_entropy(logits.float(), y)
            total = loss
            if reference is not None:
                total = total + lam * mmd(feature.float(), reference.float())
            self.modules.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            return scored(loss, logits, y)

        metrics = self._fit(data, rng, self.config.train.local_epochs, step)
        head, global_head = (self.modules.get_submodule(n) for n in ("head", "global_head"))
        with torch.no_grad():  # the global head goes up as the mean of personal and global heads
            for p, g in zip(head.parameters(), global_head.parameters(), strict=True):
                g.mul_(0.5).add_(p, alpha=0.5)
        return metrics

    def _adapt_step(self, optimizer: torch.optim.Optimizer, rng: torch.Generator) -> Step:
        context = self._context()
        return self._step([optimizer], lambda x: self._forward(x, context, rng)[0])

    def evaluate(
        self, payload: Payload, state: State, data: ClientData, rng: torch.Generator
    ) -> Evaluation:
        self._load(payload, state)
        self.modules.eval()
        context = self._context()
        return evaluate_predictions(self.runtime, data, lambda x: self._forward(x, context, rng)[0])
