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
    batches,
    evaluate_predictions,
    load_module_state,
    load_optimizer_state,
    make_optimizer,
    module_state,
    optimizer_state,
    seeded_init,
)
from fedrir.config import Config
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
        self.modules = runtime.prepare(self._build())
        self.names = {p: n for n, p in self.modules.named_parameters()}
        self.params = dict(self.modules.named_parameters())
        m = self.modules
        self.opt_mcsl = (
            make_optimizer(config, [*m["csfe"].parameters(), *m["gen"].parameters()])
            if opts.mcsl
            else None
        )
        stage2 = [*m["gfe"].parameters(), *m["head"].parameters()]
        if opts.idm != "none":
            stage2 += list(m["idm"].parameters())
        self.opt_cls = make_optimizer(config, stage2)

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

    # --- state in and out of the workspace -------------------------------------------------

    def _load(self, payload: Payload, state: State) -> None:
        load_module_state(self.modules, state, "model/")
        if payload:
            with torch.no_grad():
                for k, v in payload.items():
                    self.params[k].copy_(v)
        if self.opt_mcsl is not None:
            load_optimizer_state(self.opt_mcsl, self.params, state, "opt_mcsl/")
        load_optimizer_state(self.opt_cls, self.params, state, "opt_cls/")

    def _save(self) -> State:
        state = module_state(self.modules, "model/")
        if self.opt_mcsl is not None:
            state |= optimizer_state(self.opt_mcsl, self.names, "opt_mcsl/")
        return state | optimizer_state(self.opt_cls, self.names, "opt_cls/")

    def _shared(self) -> Payload:
        return {
            f"{SHARED}.{k}": v.detach().clone(memory_format=torch.contiguous_format)
            for k, v in self.modules[SHARED].named_parameters()
        }

    # --- the contract ----------------------------------------------------------------------

    def init_server(self, seed: int) -> Payload:
        if not self.config.fedrir.common_init:
            return {}  # the reference: every client starts from its own random GFE
        gfe = seeded_init(seed, lambda: Encoder(self.task.input_shape, self.dim))
        return {f"{SHARED}.{k}": v.detach().clone() for k, v in gfe.named_parameters()}

    def init_client(self, client_id: int, seed: int) -> State:
        return module_state(seeded_init(seed, self._build), "model/")

    def parameter_counts(self) -> dict[str, int]:
        total = sum(p.numel() for p in self.modules.parameters())
        shared = sum(p.numel() for p in self.modules[SHARED].parameters())
        return {"shared": shared, "private": total - shared}

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """f_cs: the CSFE's mean for the unmasked images (no gradient)."""
        with torch.no_grad():
            return self.modules["csfe"](x)[:, : self.dim].float()

    def _logits(self, f_g: torch.Tensor, f_cs: torch.Tensor | None) -> torch.Tensor:
        return self.modules["head"](f_g if f_cs is None else torch.cat([f_g, f_cs], dim=1))

    def local_update(
        self, payload: Payload, state: State, data: ClientData, rng: torch.Generator
    ) -> Update:
        self._load(payload, state)
        self.modules.train()
        metrics = self._train_mcsl(data, rng) if self.opt_mcsl is not None else {}
        metrics |= self._train_classifier(data, rng)
        return Update(self._shared(), data.num_train, self._save(), metrics)

    def _batches(self, data: ClientData, rng: torch.Generator) -> list[torch.Tensor]:
        cfg = self.config.train
        return [
            idx
            for _ in range(cfg.local_epochs)
            for idx in batches(data.num_train, cfg.batch_size, rng, drop_last=True)
        ]

    def _train_mcsl(self, data: ClientData, rng: torch.Generator) -> dict[str, float]:
        """Stage 1: masked reconstruction + KL; updates CSFE and generator only."""
        assert self.opt_mcsl is not None
        opts, m = self.config.fedrir, self.modules
        recon_sum = torch.zeros((), device=self.runtime.device)
        kl_sum = torch.zeros((), device=self.runtime.device)
        steps = 0
        for idx in self._batches(data, rng):
            x = self.runtime.input(data.train_x[idx])
            masked = mask_patches(x, opts.mask_ratio, opts.patch_size, rng)
            with self.runtime.autocast():
                mean, logvar = m["csfe"](masked).float().chunk(2, dim=1)
                eps = torch.randn(mean.shape, generator=rng, device=rng.device)
                z = mean + eps * (0.5 * logvar).exp()
                recon = F.mse_loss(m["gen"](z).float(), x)
            kl = (-0.5 * (1 + logvar - mean**2 - logvar.exp())).sum(dim=1).mean()
            loss = recon + opts.kl_weight * kl
            self.opt_mcsl.zero_grad(set_to_none=True)
            loss.backward()
            self.opt_mcsl.step()
            recon_sum += recon.detach()
            kl_sum += kl.detach()
            steps += 1
        return {"recon_loss": recon_sum.item() / steps, "kl": kl_sum.item() / steps}

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

    def _train_classifier(self, data: ClientData, rng: torch.Generator) -> dict[str, float]:
        """Stage 2: CE + λ·IDM with the CSFE frozen; updates GFE, IDM and head."""
        opts, m = self.config.fedrir, self.modules
        dev = self.runtime.device
        ce_sum, idm_sum, fit_sum = (torch.zeros((), device=dev) for _ in range(3))
        correct = torch.zeros((), device=dev, dtype=torch.long)
        seen = steps = 0
        for idx in self._batches(data, rng):
            x, y = self.runtime.input(data.train_x[idx]), data.train_y[idx]
            with self.runtime.autocast():
                f_cs = self._features(x) if opts.mcsl else None
                f_g = m[SHARED](x)
                logits = self._logits(f_g, f_cs).float()
                ce = F.cross_entropy(logits, y)
                loss, idm = ce, torch.zeros((), device=dev)
                if opts.idm != "none" and f_cs is not None:
                    fit, idm = self._idm_loss(f_g.float(), f_cs)
                    loss = ce + fit + idm
                    fit_sum += fit.detach()
            self.opt_cls.zero_grad(set_to_none=True)
            loss.backward()
            self.opt_cls.step()
            ce_sum += ce.detach()
            idm_sum += idm.detach()
            correct += (logits.argmax(dim=1) == y).sum()
            seen += len(y)
            steps += 1
        metrics = {
            "train_loss": ce_sum.item() / steps,
            "idm_loss": idm_sum.item() / steps,
            "train_accuracy": correct.item() / seen,
        }
        if opts.idm == "club":
            metrics["idm_fit"] = fit_sum.item() / steps  # q's NLL, which only the IDM minimises
        return metrics

    def evaluate(
        self, payload: Payload, state: State, data: ClientData, rng: torch.Generator
    ) -> Evaluation:
        self._load(payload, state)
        self.modules.eval()
        mcsl = self.config.fedrir.mcsl
        return evaluate_predictions(
            self.runtime,
            data,
            lambda x: self._logits(
                self.modules[SHARED](x).float(), self._features(x) if mcsl else None
            ),
        )
