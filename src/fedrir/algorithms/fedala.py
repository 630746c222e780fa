"""FedALA: Zhang, Hua, Wang, Song, Xue, Ma, Guan. "FedALA: Adaptive Local Aggregation for
Personalized Federated Learning", AAAI 2023.

The whole model travels and is averaged as in FedAvg (parameters and BatchNorm buffers). What
differs is how a client takes the global model Θ in: instead of overwriting its local model θ, it
keeps the lower layers of Θ and, for the last ``ala_layer_idx`` parameter tensors (0: all of them),
starts local training from θ + (Θ − θ) ⊙ W, with element-wise weights W ∈ [0, 1] learned on a
random contiguous ``ala_rand_percent`` % slice of its training data, in batches (the last partial
one dropped, as PFLlib's loader does, unless it is the only one): per batch,
W ← clip(W − η · ∂L/∂W, 0, 1), where ∂L/∂W = ∂L/∂θ̂ ⊙ (Θ − θ) (η = ``ala_eta``). W starts at ones
and persists on the client. The first time W is learned it is trained until the standard deviation
of the last 10 epoch losses falls below 0.1; afterwards, one epoch per round. A client's first
participation skips ALA (it has no local model yet) and starts from Θ.

Defaults and details follow the authors' implementation in PFLlib (``system/utils/ALA.py``,
``clientala.py``; ``main.py``: ``--eta 1.0 --rand_percent 80 --layer_idx 2``; the threshold 0.1
and the 10 losses are ``ALA``'s own defaults). Where this module differs, and why:

- ALA runs when a client is selected; PFLlib runs it on every client each round, unselected ones
  included, which costs a pass over their data and changes models that then do not train.
- The first weight learning stops after at most :data:`MAX_START_EPOCHS` epochs (PFLlib loops
  until the threshold is met, which need not happen).
- Evaluation adapts the local model to the latest global one exactly as a local update would
  (on a slice drawn from the evaluation generator), as PFLlib evaluates after ``send_models``;
  the weights it learns are not kept.
- The BatchNorm buffers travel with the model, as for every baseline here (PFLlib moves only
  parameters); the local optimizer is the configured one, its state kept per client.

New clients: zero-shot and global evaluation are the global model; nothing is private, so the
adapted score is the global model's too (a new client's local model is the global one).

Client state: ``model/<name>`` for the adaptively aggregated tensors of the local model (after
its last training), ``ala/<name>`` for their weights W, and the optimizer state.
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F
from torch.func import functional_call

from fedrir.algorithms.base import Evaluation, Payload, Runtime, State, Task, evaluate_predictions
from fedrir.algorithms.baseline import Baseline
from fedrir.algorithms.workspace import load_module_state, load_optimizer_state, module_state
from fedrir.config import Config
from fedrir.data.types import ClientData
from fedrir.errors import ConfigError

LOSS_WINDOW = 10
"""The first weight learning looks at the standard deviation of this many last epoch losses."""
LOSS_STD_THRESHOLD = 0.1
MAX_START_EPOCHS = 100


class FedALA(Baseline):
    """FedAvg whose clients mix the global model into theirs with learned element-wise weights."""

    name = "fedala"
    settings = frozenset({"ala_eta", "ala_rand_percent", "ala_layer_idx"})
    shared = ("body.", "head.")
    global_model = ""

    def __init__(self, config: Config, task: Task, runtime: Runtime) -> None:
        super().__init__(config, task, runtime)
        names = list(self.workspace.params)
        k = config.baselines.ala_layer_idx
        if k > len(names):
            raise ConfigError(
                f"invalid value for 'ala_layer_idx': {k} is more than the model's {len(names)} "
                "parameter tensors; pass at most that, or 0 for all of them"
            )
        self.adaptive = tuple(names[-k:] if k else names)
        """The parameter tensors aggregated with learned weights (the rest are taken from Θ)."""
        self.local: dict[str, torch.Tensor] | None = None
        self.weights: dict[str, torch.Tensor] | None = None

    # --- state in and out of the workspace ----------------------------------------------------

    def _load(self, payload: Payload, state: State) -> None:
        """The global model into the workspace; the local tensors and weights set aside."""
        load_module_state(self.modules, payload, "")
        for name, opt in self.optimizers.items():
            load_optimizer_state(opt, self.workspace.params, state, f"opt_{name}/")
        trained = f"model/{self.adaptive[0]}" in state
        self.local = {n: state[f"model/{n}"] for n in self.adaptive} if trained else None
        learned = f"ala/{self.adaptive[0]}" in state
        self.weights = {n: state[f"ala/{n}"] for n in self.adaptive} if learned else None

    def _save(self) -> State:
        state = super()._save() | module_state(self.modules, "model/", self.adaptive)
        if self.weights is not None:
            state |= {f"ala/{n}": w.clone() for n, w in self.weights.items()}
        return state

    def parameter_counts(self) -> dict[str, int]:
        """Shared: the whole model. Private: the adaptive tensors' local copy and their weights."""
        adaptive = sum(self.workspace.params[n].numel() for n in self.adaptive)
        return {
            "shared": sum(p.numel() for p in self.workspace.params.values()),
            "private": 2 * adaptive,
        }

    # --- adaptive local aggregation -----------------------------------------------------------

    def _adapt(self, data: ClientData, rng: torch.Generator) -> None:
        """Learn W on a random slice and set the workspace's adaptive tensors to θ + (Θ − θ) ⊙ W.

        The workspace holds Θ (and the global BatchNorm buffers, which the weight learning uses
        in training mode on copies, leaving the workspace's own untouched)."""
        if self.local is None:
            return
        local = self.local
        delta = {n: self.workspace.params[n].detach() - local[n] for n in self.adaptive}
        start_phase = self.weights is None
        before = self.weights or {n: torch.ones_like(local[n]) for n in self.adaptive}
        weights = {n: before[n].clone() for n in self.adaptive}
        for w in weights.values():
            w.requires_grad_()
        fixed = {n: p.detach() for n, p in self.workspace.params.items() if n not in delta}
        buffers = {k: b.clone() for k, b in self.modules.named_buffers()}
        size = max(1, data.num_train * self.config.baselines.ala_rand_percent // 100)
        start = torch.randint(data.num_train - size + 1, (1,), generator=rng, device=rng.device)
        rows = torch.arange(size, device=rng.device) + start
        slices = rows.split(self.config.train.batch_size)
        if len(slices) > 1 and len(slices[-1]) < self.config.train.batch_size:
            slices = slices[:-1]  # PFLlib's loader drops the last partial batch (drop_last)
        eta = self.config.baselines.ala_eta
        losses: list[float] = []
        for _ in range(MAX_START_EPOCHS if start_phase else 1):
            for idx in slices:
                mixed = {n: local[n] + delta[n] * weights[n] for n in self.adaptive}
                x = self.runtime.input(data.train_x[idx])
                with self.runtime.autocast():
                    logits = functional_call(self.modules, {**fixed, **mixed, **buffers}, (x,))
                loss = F.cross_entropy(logits.float(), data.train_y[idx])
                grads = torch.autograd.grad(loss, [weights[n] for n in self.adaptive])
                with torch.no_grad():
                    for n, g in zip(self.adaptive, grads, strict=True):
                        weights[n].sub_(eta * g).clamp_(0, 1)
            losses.append(loss.item())
            recent = losses[-LOSS_WINDOW:]
            if len(losses) > LOSS_WINDOW and statistics.pstdev(recent) < LOSS_STD_THRESHOLD:
                break
        self.weights = {n: w.detach() for n, w in weights.items()}
        with torch.no_grad():
            for n in self.adaptive:
                self.workspace.params[n].copy_(local[n] + delta[n] * self.weights[n])

    # --- the contract -------------------------------------------------------------------------

    def _local_train(self, data: ClientData, rng: torch.Generator) -> dict[str, float]:
        self._adapt(data, rng)
        return super()._local_train(data, rng)

    def evaluate(
        self, payload: Payload, state: State, data: ClientData, rng: torch.Generator
    ) -> Evaluation:
        """The model a local update would start from (ALA on a fresh slice), in eval mode."""
        self._load(payload, state)
        self.modules.train()
        self._adapt(data, rng)
        self.modules.eval()
        return evaluate_predictions(self.runtime, data, self._predict)
