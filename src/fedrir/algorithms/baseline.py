"""What the baselines share: the model, the workspace, and the training and test loops.

Every baseline trains FedRIR's GFE architecture (:class:`~fedrir.models.cnn.Encoder`) followed by a
linear head, so that the comparison with FedRIR is about the algorithm, not the network. The
baselines differ only in

- which workspace keys travel: ``shared`` (key prefixes uploaded and averaged; BatchNorm buffers
  included, so a shared body carries its running statistics), refined by ``_upload_keys`` and
  ``_server_keys`` where a prefix is not enough (FedBN, FedBABU);
- which optimizers step which parameters (``_param_groups``; each optimizer's state persists per
  client across rounds, as in FedRIR);
- the local training (``_local_train``) and the prediction (``_predict``);
- for new clients and the global model: ``global_model``, the submodule the server's payload
  fills completely (zero-shot evaluation; none by default), and the adaptation step
  (``_adapt_step``: by default CE of ``_predict``, stepping the private parameters only).

Client state (see :mod:`~fedrir.algorithms.workspace`): every workspace entry the server does not
hold, and the optimizers' states.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fedrir.algorithms.base import (
    Algorithm,
    Evaluation,
    Payload,
    Runtime,
    State,
    Task,
    Update,
    evaluate_predictions,
    weighted_mean,
)
from fedrir.algorithms.workspace import (
    Step,
    Workspace,
    fit,
    frozen,
    load_module_state,
    make_optimizer,
    module_state,
    seeded_init,
)
from fedrir.config import Config
from fedrir.data.types import ClientData
from fedrir.models.cnn import Encoder, InputShape

Objective = Callable[[Any, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""(output of the forward pass, labels) → (reported loss, loss to minimise, float logits)."""


class Classifier(nn.Module):
    """``body`` (the GFE architecture, ``[B, C, H, W] → [B, d]``), then a linear ``head``."""

    def __init__(self, input_shape: InputShape, embed_dim: int, num_classes: int) -> None:
        super().__init__()
        self.body = Encoder(input_shape, embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def proximal_term(
    params: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor], weight: float
) -> torch.Tensor:
    """(weight / 2) · Σ ‖p − a‖²: FedProx's pull towards the global model, and Ditto's."""
    squares = [((p - a) ** 2).sum() for p, a in zip(params, anchors, strict=True)]
    return weight / 2 * torch.stack(squares).sum()


def scored(loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """What a training step reports: its loss, and its batch's correct predictions."""
    return {"train_loss": loss.detach(), "correct": (logits.argmax(dim=1) == y).sum()}


def cross_entropy(penalty: Callable[[], torch.Tensor] | None = None) -> Objective:
    """The usual objective: CE of the logits (plus ``penalty()``, not reported as the loss)."""

    def objective(
        out: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = out.float()
        loss = F.cross_entropy(logits, y)
        return loss, loss if penalty is None else loss + penalty(), logits

    return objective


class Baseline(Algorithm):
    """A baseline on a :class:`Classifier` workspace (see the module docstring)."""

    shared: ClassVar[tuple[str, ...]]
    """Prefixes of the workspace keys that are uploaded and averaged."""
    global_model: ClassVar[str | None] = None
    """The submodule that is the global model ("": the whole workspace), all of it in the
    payload, scored alone as the zero-shot and global evaluation; None: the method has none."""
    fine_tune: ClassVar[bool] = False
    """Fine-tune the whole model for ``ft_epochs`` before testing (fresh optimizer, state kept)."""

    def __init__(self, config: Config, task: Task, runtime: Runtime) -> None:
        super().__init__(config, task, runtime)
        self.modules = runtime.prepare(self._build())
        self.workspace = Workspace(config, self.modules, self._param_groups())
        self.optimizers = self.workspace.optimizers
        self.opt_ft = make_optimizer(config, self.modules.parameters()) if self.fine_tune else None
        self.upload_keys = self._upload_keys()
        self.server_keys = self._server_keys()

    # --- what each baseline says --------------------------------------------------------------

    def _build(self) -> nn.Module:
        return self._classifier()

    def _classifier(self) -> Classifier:
        return Classifier(self.task.input_shape, self.config.train.embed_dim, self.task.num_classes)

    def _param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"local": list(self.modules.parameters())}

    def _per_module(self, *names: str) -> dict[str, list[nn.Parameter]]:
        """One parameter group (so one optimizer) per named submodule."""
        return {name: list(self.modules.get_submodule(name).parameters()) for name in names}

    def _upload_keys(self) -> frozenset[str]:
        return frozenset(k for k in self.modules.state_dict() if k.startswith(self.shared))

    def _server_keys(self) -> frozenset[str]:
        """What the server holds and broadcasts: by default exactly what is uploaded."""
        return self.upload_keys

    def _local_train(self, data: ClientData, rng: torch.Generator) -> dict[str, float]:
        return self._fit(data, rng, self.config.train.local_epochs, self._step(["local"]))

    def _predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.modules(x)

    def _adapt_step(self, optimizer: torch.optim.Optimizer, rng: torch.Generator) -> Step:
        """A new client's adaptation step: CE of the prediction, ``optimizer`` stepping."""
        return self._step([optimizer], self._predict)

    def _load(self, payload: Payload, state: State) -> None:
        self.workspace.load(payload, state)

    def _save(self) -> State:
        return self.workspace.save(self.server_keys)

    # --- the contract -------------------------------------------------------------------------

    def init_server(self, seed: int) -> Payload:
        return module_state(seeded_init(seed, self._build), keys=self.server_keys)

    def init_client(self, seed: int, initial: Payload) -> State:
        keys = frozenset(self.modules.state_dict()) - self.server_keys
        return module_state(seeded_init(seed, self._build), "model/", keys)

    def aggregate(self, server: Payload, updates: Sequence[tuple[Payload, int]]) -> Payload:
        """Sample-weighted mean of the uploads; what the server holds but nobody uploads stays."""
        if not updates:
            return server
        return server | weighted_mean([(p, float(n)) for p, n in updates])

    def parameter_counts(self) -> dict[str, int]:
        params = self.workspace.params
        shared = sum(p.numel() for n, p in params.items() if n in self.server_keys)
        return {"shared": shared, "private": sum(p.numel() for p in params.values()) - shared}

    def local_update(
        self, payload: Payload, state: State, data: ClientData, rng: torch.Generator
    ) -> Update:
        self._load(payload, state)
        self.modules.train()
        metrics = self._local_train(data, rng)
        upload = module_state(self.modules, keys=self.upload_keys)
        return Update(upload, data.num_train, self._save(), metrics)

    def evaluate(
        self, payload: Payload, state: State, data: ClientData, rng: torch.Generator
    ) -> Evaluation:
        self._load(payload, state)  # a copy: fine-tuning it leaves `state` alone
        epochs = self.config.baselines.ft_epochs
        if self.opt_ft is not None and epochs:
            self.opt_ft.state.clear()
            self.modules.train()
            self._fit(data, rng, epochs, self._step([self.opt_ft]))
        self.modules.eval()
        return evaluate_predictions(self.runtime, data, self._predict)

    def evaluate_global(self, payload: Payload, data: ClientData) -> Evaluation | None:
        if self.global_model is None:
            return None
        model = self.modules.get_submodule(self.global_model)
        load_module_state(model, payload, f"{self.global_model}." if self.global_model else "")
        model.eval()
        return evaluate_predictions(self.runtime, data, model)

    def adapt(
        self, payload: Payload, state: State, data: ClientData, rng: torch.Generator, full: bool
    ) -> tuple[Payload, State]:
        """The private parameters (all with ``full``) trained with a fresh optimizer on
        ``_adapt_step``; the rest frozen. No private parameter: the state as it was loaded."""
        self._load(payload, state)
        params = self.workspace.params
        shared = set() if full else {n for n in params if n in self.server_keys}
        trainable = [p for n, p in params.items() if n not in shared and p.requires_grad]
        epochs = self.config.new_client_epochs
        if trainable and epochs:
            optimizer = make_optimizer(self.config, trainable)
            self.modules.train()
            with frozen(params[n] for n in shared):
                self._fit(data, rng, epochs, self._adapt_step(optimizer, rng))
            self.modules.zero_grad(set_to_none=True)
        if full:
            payload = payload | module_state(self.modules, keys=self.server_keys)
        return payload, self._save()

    # --- training steps -----------------------------------------------------------------------

    def _step(
        self,
        optimizers: Sequence[str | torch.optim.Optimizer],
        forward: Callable[[torch.Tensor], Any] | None = None,
        objective: Objective | None = None,
    ) -> Step:
        """A step of ``optimizers`` (by group name, or given) on ``objective(forward(x), y)``;
        ``forward`` (default: the whole workspace) runs under autocast, ``objective`` (default:
        :func:`cross_entropy`) after it."""
        opts = [self.optimizers[o] if isinstance(o, str) else o for o in optimizers]
        forward = forward or self.modules
        objective = objective or cross_entropy()

        def step(x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
            with self.runtime.autocast():
                out = forward(x)
            loss, total, logits = objective(out, y)
            self.modules.zero_grad(set_to_none=True)
            total.backward()
            for opt in opts:
                opt.step()
            return scored(loss, logits, y)

        return step

    def _fit(
        self, data: ClientData, rng: torch.Generator, epochs: int, step: Step
    ) -> dict[str, float]:
        return fit(self.runtime, data, rng, epochs, self.config.train.batch_size, step)


class GlobalAndPersonal(Baseline):
    """Two whole classifiers per client: ``global`` (travels, BatchNorm buffers included) and
    ``personal`` (stays); each has its own optimizer. The base of Ditto and APFL. The global
    classifier is the zero-shot and global model."""

    shared = ("global.",)
    global_model = "global"

    def _build(self) -> nn.Module:
        return nn.ModuleDict({"global": self._classifier(), "personal": self._classifier()})

    def init_client(self, seed: int, initial: Payload) -> State:
        """The personal model starts as a copy of the initial global model, as PFLlib's deep copy
        has it (two unrelated random models would make APFL's parameter mixture meaningless)."""
        return {f"model/personal.{k.removeprefix('global.')}": v for k, v in initial.items()}

    def _param_groups(self) -> dict[str, list[nn.Parameter]]:
        return self._per_module("global", "personal")
