"""FedRIR: Rethinking Information Representation in Federated Learning.

Huang, Shao, Yang, Lu, Zhang. WWW 2025, pp. 807–816; arXiv 2502.00859.

Each client represents an input by a *global* feature f_g (from the GFE, the only module that
travels) and a *client-specific* feature f_cs (from the CSFE, a VAE encoder that never leaves the
client). A round, per selected client:

1. **MCSL** (masked client-specific learning): zero ``mask_ratio`` of the ``patch_size`` patches of
   every image, encode with the CSFE, sample z, decode with the generator; loss = MSE to the
   unmasked image + ``kl_weight`` · KL(q(z|x) ‖ N(0, I)). Only CSFE and generator are updated.
2. **Classification + IDM**: f_cs = CSFE mean of the unmasked image (frozen, but in train mode as
   in the reference), f_g = GFE(x), logits = head([f_g, f_cs]); loss = CE + λ · L_id, where the
   IDM is a variational q(f_cs | f_g) as in CLUB (Cheng et al., ICML 2020). ``idm = "nll"`` is
   the reference code's loss (the NLL of q, back-propagated into the GFE too); ``idm = "club"`` is
   the paper's text (fit q on detached features, give the GFE the CLUB upper bound on
   I(f_g; f_cs)). GFE, IDM and head share one optimizer.

Only GFE *parameters* travel (BatchNorm statistics stay local, FedBN-like); the server takes the
sample-weighted mean. Optimizer states persist on each client across rounds, as in the reference.

New clients: there is no zero-shot evaluation (the head needs the client's own f_cs, so the GFE
cannot predict alone). The adaptation is the local update with the GFE's parameters frozen:
``new_client_epochs`` epochs of stage 1 (CSFE and generator), then as many of stage 2 (IDM and
head), each with a fresh optimizer; with ``full`` the GFE trains in stage 2 too. The GFE's
BatchNorm statistics, which are the client's own, follow the client's data in training mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fedrir.algorithms.base import (
    Algorithm,
    Evaluation,
    Payload,
    Runtime,
    State,
    Task,
    Update,
    evaluate_predictions,
)
from fedrir.algorithms.workspace import (
    Step,
    Workspace,
    fit,
    frozen,
    make_optimizer,
    module_state,
    seeded_init,
)
from fedrir.config import KEYS, Config
from fedrir.data.types import ClientData
from fedrir.errors import ConfigError
from fedrir.models.cnn import Encoder, GaussianMLP, Generator

SHARED = "gfe"  # the one module whose parameters travel


def mask_patches(
    x: torch.Tensor, mask_ratio: float, patch_size: int, rng: torch.Generator
) -> torch.Tensor:
    """Zero ``floor(mask_ratio · patches)`` random ``patch_size``² patches of every image.

    A new mask per sample, drawn for the whole batch at once; all channels of a patch are zeroed.
    """
    b, _, h, w = x.shape
    gh, gw = h // patch_size, w // patch_size
    num_masked = int(mask_ratio * gh * gw)
    noise = torch.rand(b, gh * gw, generator=rng, device=rng.device)
    rank = noise.argsort(dim=1).argsort(dim=1)
    keep = (rank >= num_masked).to(x.dtype).reshape(b, 1, gh, gw)
    keep = keep.repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)
    return x * keep.to(x.device)


def gaussian_nll(mu: torch.Tensor, logvar: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean over the batch of Σ_d [(mu − target)² / exp(logvar) + logvar] (CLUB's fitting loss)."""
    return ((mu - target) ** 2 / logvar.exp() + logvar).sum(dim=1).mean()


def club_bound(mu: torch.Tensor, logvar: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CLUB estimate mean_i log q(yᵢ|xᵢ) − mean_{i,j} log q(yⱼ|xᵢ), over all pairs in closed form.

    mean_j (μᵢ − yⱼ)² = μᵢ² − 2μᵢȳ + mean(y²), so no B×B×d tensor is formed.
    """
    inv_var = (-logvar).exp()
    positive = -((mu - target) ** 2 * inv_var).sum(dim=1)
    y_mean, y2_mean = target.mean(dim=0), (target**2).mean(dim=0)
    negative = -((mu**2 - 2 * mu * y_mean + y2_mean) * inv_var).sum(dim=1)
    return (positive - negative).mean() / 2


class FedRIR(Algorithm):
    """FedRIR behind the common algorithm contract (see the module docstring)."""

    name = "fedrir"
    settings = frozenset(k for k, key in KEYS.items() if key.section == "fedrir")

    def __init__(self, config: Config, task: Task, runtime: Runtime) -> None:
        super().__init__(config, task, runtime)
        opts = config.fedrir
        _, h, w = task.input_shape
        if opts.mcsl and (h % opts.patch_size or w % opts.patch_size):
            raise ConfigError(
                f"invalid value for 'patch_size': {opts.patch_size} does not divide the "
                f"{h}×{w} images; pick a divisor such as 4"
            )
        self.dim = config.train.embed_dim
        self.modules = m = runtime.prepare(self._build())
        groups = {"cls": [*m["gfe"].parameters(), *m["head"].parameters()]}
        if opts.idm != "none":
            groups["cls"] += m["idm"].parameters()
        if opts.mcsl:
            groups = {"mcsl": [*m["csfe"].parameters(), *m["gen"].parameters()]} | groups
        self.workspace = Workspace(config, m, groups)
        self.shared_keys = frozenset(f"{SHARED}.{k}" for k, _ in m[SHARED].named_parameters())
        """Only the GFE's parameters travel: its BatchNorm statistics stay on the client."""

    def _build(self) -> nn.ModuleDict:
        shape, d, opts = self.task.input_shape, self.dim, self.config.fedrir
        modules: dict[str, nn.Module] = {SHARED: Encoder(shape, d)}
        if opts.mcsl:
            modules["csfe"] = Encoder(shape, 2 * d)
            modules["gen"] = Generator(shape, d)
        if opts.idm != "none":
            modules["idm"] = GaussianMLP(d)
        modules["head"] = nn.Linear(2 * d if opts.mcsl else d, self.task.num_classes)
        return nn.ModuleDict(modules)

    # --- the contract ----------------------------------------------------------------------

    def init_server(self, seed: int) -> Payload:
        if not self.config.fedrir.common_init:
            return {}  # the reference: every client starts from its own random GFE
        gfe = seeded_init(seed, lambda: Encoder(self.task.input_shape, self.dim))
        return module_state(gfe, f"{SHARED}.", {k for k, _ in gfe.named_parameters()})

    def init_client(self, seed: int, initial: Payload) -> State:
        """Every module from ``seed``, but what the broadcast overwrites (the common GFE)."""
        modules = seeded_init(seed, self._build)
        return module_state(modules, "model/", set(modules.state_dict()) - set(initial))

    def parameter_counts(self) -> dict[str, int]:
        total = sum(p.numel() for p in self.modules.parameters())
        shared = sum(p.numel() for p in self.modules[SHARED].parameters())
        return {"shared": shared, "private": total - shared}

    def local_update(
        self, payload: Payload, state: State, data: ClientData, rng: torch.Generator
    ) -> Update:
        self.workspace.load(payload, state)
        self.modules.train()
        epochs, batch = self.config.train.local_epochs, self.config.train.batch_size
        metrics = (
            fit(self.runtime, data, rng, epochs, batch, self.mcsl_step(rng))
            if self.config.fedrir.mcsl
            else {}
        )
        metrics |= fit(self.runtime, data, rng, epochs, batch, self.classifier_step())
        upload = module_state(self.modules, keys=self.shared_keys)
        return Update(upload, data.num_train, self.workspace.save(self.shared_keys), metrics)

    def evaluate(
        self, payload: Payload, state: State, data: ClientData, rng: torch.Generator
    ) -> Evaluation:
        self.workspace.load(payload, state)
        self.modules.eval()
        return evaluate_predictions(self.runtime, data, self.predict)

    def adapt(
        self, payload: Payload, state: State, data: ClientData, rng: torch.Generator, full: bool
    ) -> tuple[Payload, State]:
        self.workspace.load(payload, state)
        self.modules.train()
        m, epochs = self.modules, self.config.new_client_epochs
        batch, opts = self.config.train.batch_size, self.config.fedrir
        private = [*m["head"].parameters()]
        if opts.idm != "none":
            private += m["idm"].parameters()
        gfe = list(m[SHARED].parameters())
        if epochs:
            if opts.mcsl:
                mcsl = [*m["csfe"].parameters(), *m["gen"].parameters()]
                stage1 = make_optimizer(self.config, mcsl)
                fit(self.runtime, data, rng, epochs, batch, self.mcsl_step(rng, stage1))
            stage2 = make_optimizer(self.config, private + gfe if full else private)
            with frozen(() if full else gfe):
                fit(self.runtime, data, rng, epochs, batch, self.classifier_step(stage2))
            self.modules.zero_grad(set_to_none=True)
        if full:
            payload = payload | module_state(self.modules, keys=self.shared_keys)
        return payload, self.workspace.save(self.shared_keys)

    # --- the two stages, and prediction ----------------------------------------------------

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """f_cs: the CSFE's mean for the unmasked images (no gradient)."""
        with torch.no_grad():
            return self.modules["csfe"](x)[:, : self.dim].float()

    def _logits(self, f_g: torch.Tensor, f_cs: torch.Tensor | None) -> torch.Tensor:
        return self.modules["head"](f_g if f_cs is None else torch.cat([f_g, f_cs], dim=1))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the workspace's modules (in whatever mode they are)."""
        f_cs = self._features(x) if self.config.fedrir.mcsl else None
        return self._logits(self.modules[SHARED](x).float(), f_cs)

    def mcsl_step(self, rng: torch.Generator, opt: torch.optim.Optimizer | None = None) -> Step:
        """Stage 1: masked reconstruction + KL; updates CSFE and generator only (with ``opt``,
        by default the client's own optimizer of this stage)."""
        opts, m = self.config.fedrir, self.modules
        opt = opt or self.workspace.optimizers["mcsl"]

        def step(x: torch.Tensor, _: torch.Tensor) -> dict[str, torch.Tensor]:
            masked = mask_patches(x, opts.mask_ratio, opts.patch_size, rng)
            with self.runtime.autocast():
                mean, logvar = m["csfe"](masked).float().chunk(2, dim=1)
                eps = torch.randn(mean.shape, generator=rng, device=rng.device)
                z = mean + eps * (0.5 * logvar).exp()
                recon = F.mse_loss(m["gen"](z).float(), x)
            kl = (-0.5 * (1 + logvar - mean**2 - logvar.exp())).sum(dim=1).mean()
            loss = recon + opts.kl_weight * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return {"recon_loss": recon.detach(), "kl": kl.detach()}

        return step

    def _idm_loss(self, f_g: torch.Tensor, f_cs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(fit, term): q's own fitting loss (IDM only; zero for ``nll``) and the IDM term of the
        GFE's objective (reported as ``idm_loss``); stage 2 back-propagates CE + fit + term.

        ``nll``: λ·NLL of q(f_cs | f_g) into IDM and GFE alike. ``club``: the NLL fits q on detached
        features (IDM only) and the GFE gets λ·CLUB bound through a frozen copy of q.
        """
        idm, weight = self.modules["idm"], self.config.fedrir.idm_weight
        if self.config.fedrir.idm == "nll":
            mu, logvar = idm(f_g)
            return torch.zeros((), device=f_cs.device), weight * gaussian_nll(
                mu.float(), logvar.float(), f_cs
            )
        mu, logvar = idm(f_g.detach())
        fit = gaussian_nll(mu.float(), logvar.float(), f_cs)
        frozen = {k: v.detach() for k, v in idm.named_parameters()}
        mu, logvar = functional_call(idm, frozen, (f_g,))
        bound = weight * club_bound(mu.float(), logvar.float(), f_cs)
        return fit, bound

    def classifier_step(self, opt: torch.optim.Optimizer | None = None) -> Step:
        """Stage 2: CE + λ·IDM with the CSFE frozen; updates GFE, IDM and head (what ``opt``
        steps, by default the client's own optimizer of this stage)."""
        opts, m = self.config.fedrir, self.modules
        opt = opt or self.workspace.optimizers["cls"]
        zero = torch.zeros((), device=self.runtime.device)

        def step(x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
            with self.runtime.autocast():
                f_cs = self._features(x) if opts.mcsl else None
                f_g = m[SHARED](x)
                logits = self._logits(f_g, f_cs).float()
                ce = F.cross_entropy(logits, y)
                loss, idm, fit = ce, zero, zero
                if opts.idm != "none" and f_cs is not None:
                    fit, idm = self._idm_loss(f_g.float(), f_cs)
                    loss = ce + fit + idm
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            numbers = {
                "train_loss": ce.detach(),
                "idm_loss": idm.detach(),
                "correct": (logits.argmax(dim=1) == y).sum(),
            }
            if opts.idm == "club":
                numbers["idm_fit"] = fit.detach()  # q's NLL, which only the IDM minimises
            return numbers

        return step
