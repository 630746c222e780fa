"""FedProto: Tan, Long, Liu, Zhou, Lu, Jiang, Zhang. "FedProto: Federated Prototype Learning
across Heterogeneous Clients", AAAI 2022.

No model parameters travel: every client keeps its whole model, and class *prototypes* (mean
representations) travel instead. A client trains on CE + λ · MSE(f(x), C̄_y), where C̄_y is the
global prototype of the sample's class (samples whose class has none contribute zero), and uploads
its local prototypes, the per-class means of the representations it computed while training, with
the number of representations behind each (λ = ``proto_lambda``). The server's prototype of
class j is the sample-weighted mean Σᵢ nᵢⱼ Cᵢⱼ / Σᵢ nᵢⱼ over the uploads (the paper's aggregation
weights by samples). A client predicts the class of the nearest global prototype (mean squared
distance of representations); the test loss is the CE of the negated distances.

Payloads: ``protos`` (classes × feature width) and ``counts`` (per class), both ways, so the bytes
counted are those of the prototypes and their weights. Client state: the whole model (``model/``)
and its optimizer state. Defaults and details follow PFLlib (``clientproto.py``,
``serverproto.py``; ``main.py``: ``--lamda 1.0``); every client starts from the same initial
model, as PFLlib's deep copies of one model do: the server's initial payload carries it, so it is
broadcast once, in round 1 (counted in that round's bytes down), and never again. Where this
module differs, and why:

- PFLlib averages the uploaded prototypes of a class without weights; here they are weighted by
  their sample counts, as the paper's aggregation is (and so the global prototype is the mean of
  every representation behind it).
- A class nobody uploads in a round keeps its previous global prototype (PFLlib drops it until a
  client holding it is selected again): with partial participation, a prototype should not vanish
  because its holders sat a round out.
- New clients: no zero-shot evaluation (nothing of a model is shared); a new client trains its
  model (from its initial state) as a local update does, towards the global prototypes, and is
  scored by the nearest global prototype.
- Before any prototype exists every class scores alike (PFLlib reports no accuracy then). A class
  without a prototype cannot be predicted; its samples get an infinite test loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fedrir.algorithms.base import Payload, State, Update
from fedrir.algorithms.baseline import Baseline, Classifier, scored
from fedrir.algorithms.workspace import Step, module_state, seeded_init
from fedrir.data.types import ClientData

PROTOS, COUNTS = "protos", "counts"


def aggregate_prototypes(server: Payload, uploads: Sequence[Payload]) -> Payload:
    """Per class, the count-weighted mean of the uploaded prototypes (in float64); a class with no
    uploaded sample keeps the server's prototype and count."""
    counts = torch.stack([u[COUNTS] for u in uploads]).to(torch.float64)  # [uploads, classes]
    sums = torch.einsum("uk,ukd->kd", counts, torch.stack([u[PROTOS] for u in uploads]).double())
    total = counts.sum(0)
    seen = total > 0
    protos = torch.where(seen[:, None], sums / total.clamp(min=1)[:, None], server[PROTOS].double())
    return {
        PROTOS: protos.to(server[PROTOS].dtype),
        COUNTS: torch.where(seen, total.round().to(server[COUNTS].dtype), server[COUNTS]),
    }


class FedProto(Baseline):
    """Personal models that share class prototypes instead of weights."""

    name = "fedproto"
    settings = frozenset({"proto_lambda"})
    shared = ()

    def init_server(self, seed: int) -> Payload:
        """No prototype yet (zeros, each with a count of 0), and the initial model of every
        client; aggregation keeps only the prototypes, so the model is broadcast once."""
        k, d = self.task.num_classes, self.config.train.embed_dim
        model = module_state(seeded_init(seed, self._build))
        return {PROTOS: torch.zeros(k, d), COUNTS: torch.zeros(k, dtype=torch.int64)} | model

    def init_client(self, seed: int, initial: Payload) -> State:
        """The initial model of the server's payload (PFLlib deep-copies one model into every
        client: their representations start in one space, where prototypes can be compared)."""
        return {f"model/{k}": v for k, v in initial.items() if k not in (PROTOS, COUNTS)}

    def _load(self, payload: Payload, state: State) -> None:
        self.protos = payload[PROTOS].to(self.runtime.device)
        self.known = payload[COUNTS].to(self.runtime.device) > 0
        super()._load({}, state)

    def _model(self) -> Classifier:
        assert isinstance(self.modules, Classifier)
        return self.modules

    def _proto_step(self, optimizer: torch.optim.Optimizer) -> Step:
        """CE + λ · MSE to the global prototypes, ``optimizer`` stepping; the batch's
        representations are summed per class into ``self.sums`` and ``self.counts``."""
        model, lam = self._model(), self.config.baselines.proto_lambda
        k, d = self.task.num_classes, self.config.train.embed_dim
        dev = self.runtime.device
        self.sums = sums = torch.zeros(k, d, device=dev)
        self.counts = counts = torch.zeros(k, dtype=torch.int64, device=dev)

        def step(x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
            with self.runtime.autocast():
                features = model.body(x)
                logits = model.head(features).float()
            features = features.float()
            loss = F.cross_entropy(logits, y)
            # PFLlib: the target is the feature itself where the class has no global prototype
            target = torch.where(self.known[y, None], self.protos[y], features.detach())
            total = loss + lam * F.mse_loss(features, target)
            self.modules.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            sums.index_add_(0, y, features.detach())
            counts.add_(torch.bincount(y, minlength=k))
            return scored(loss, logits, y)

        return step

    def _local_train(self, data: ClientData, rng: torch.Generator) -> dict[str, float]:
        step = self._proto_step(self.optimizers["local"])
        metrics = self._fit(data, rng, self.config.train.local_epochs, step)
        self.upload = {PROTOS: self.sums / self.counts.clamp(min=1)[:, None], COUNTS: self.counts}
        return metrics

    def _adapt_step(self, optimizer: torch.optim.Optimizer, rng: torch.Generator) -> Step:
        """A new client trains its model as a local update does, towards the global prototypes."""
        return self._proto_step(optimizer)

    def local_update(
        self, payload: Payload, state: State, data: ClientData, rng: torch.Generator
    ) -> Update:
        update = super().local_update(payload, state, data, rng)
        update.payload = self.upload
        return update

    def aggregate(self, server: Payload, updates: Sequence[tuple[Payload, int]]) -> Payload:
        """The prototypes' own per-class counts weigh them, not the clients' sample counts."""
        return aggregate_prototypes(server, [p for p, _ in updates]) if updates else server

    def _predict(self, x: torch.Tensor) -> torch.Tensor:
        """Negated mean squared distances to the global prototypes; −∞ for a class without one."""
        features = self._model().body(x).float()
        if not self.known.any():
            return torch.zeros(len(x), self.task.num_classes, device=x.device)
        dist = torch.cdist(features, self.protos).square() / features.shape[1]
        return torch.where(self.known, -dist, -torch.inf)
