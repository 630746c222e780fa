"""FedRIR's pieces: masking, losses, what travels, which stage updates what, optimizer state."""

from __future__ import annotations

import pytest
import torch

from fedrir.algorithms.base import Runtime, Task, weighted_mean
from fedrir.algorithms.fedrir import FedRIR, club_bound, gaussian_nll, mask_patches
from fedrir.algorithms.workspace import fit
from fedrir.config import Config, ConfigError, FedRIRConfig, with_overrides
from fedrir.data.types import ClientData

TASK = Task(input_shape=(1, 28, 28), num_classes=10)
CPU = Runtime(device=torch.device("cpu"))


def make_algo(**overrides: object) -> FedRIR:
    config = with_overrides(Config(), {"batch_size": 20, "embed_dim": 32, **overrides})
    return FedRIR(config, TASK, CPU)


@pytest.fixture(scope="module")
def client() -> ClientData:
    """A small client cut from real MNIST (two classes, as under strong label skew)."""
    from fedrir.data.datasets import load_dataset

    ds = load_dataset(Config().data, seed=0)
    idx = torch.nonzero((ds.labels == 3) | (ds.labels == 7)).flatten()[:120]
    x = ds.images[idx].float() / 127.5 - 1
    y = ds.labels[idx]
    return ClientData(x[:80], y[:80], x[80:], y[80:])


def test_mask_zeroes_exactly_floor_ratio_patches_and_keeps_the_rest() -> None:
    x = torch.rand(16, 3, 28, 28) + 0.5  # strictly positive, so zeros can only come from the mask
    rng = torch.Generator().manual_seed(0)
    out = mask_patches(x, 0.6, 4, rng)
    patches_in = x.unfold(2, 4, 4).unfold(3, 4, 4)  # [B, C, 7, 7, 4, 4]
    patches_out = out.unfold(2, 4, 4).unfold(3, 4, 4)
    zeroed = (patches_out == 0).all(dim=(1, 4, 5))  # whole patch, all channels
    assert zeroed.sum(dim=(1, 2)).tolist() == [29] * 16  # floor(0.6 · 49)
    kept = ~zeroed
    assert torch.equal(
        patches_out.permute(0, 2, 3, 1, 4, 5)[kept], patches_in.permute(0, 2, 3, 1, 4, 5)[kept]
    )
    # a new mask per sample
    assert len({tuple(z.flatten().tolist()) for z in zeroed}) > 1


def test_mask_is_deterministic_given_the_generator() -> None:
    x = torch.ones(4, 1, 28, 28)
    a = mask_patches(x, 0.6, 4, torch.Generator().manual_seed(5))
    b = mask_patches(x, 0.6, 4, torch.Generator().manual_seed(5))
    c = mask_patches(x, 0.6, 4, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_gaussian_nll_and_club_bound_match_their_definitions() -> None:
    g = torch.Generator().manual_seed(1)
    mu, logvar, y = (torch.randn(6, 5, generator=g) for _ in range(3))
    nll = ((mu - y) ** 2 / logvar.exp() + logvar).sum(1).mean()
    assert torch.allclose(gaussian_nll(mu, logvar, y), nll)
    # brute force over all pairs: log q(y_j | x_i) up to constants = -(mu_i - y_j)² / (2 var_i)
    logq = -((mu[:, None, :] - y[None, :, :]) ** 2 / (2 * logvar.exp()[:, None, :])).sum(-1)
    expected = logq.diagonal().mean() - logq.mean()
    assert torch.allclose(club_bound(mu, logvar, y), expected, atol=1e-5)


def test_only_gfe_parameters_are_uploaded(client: ClientData) -> None:
    algo = make_algo()
    server = algo.init_server(0)
    update = algo.local_update(
        server, algo.init_client(1, algo.init_server(0)), client, torch.Generator().manual_seed(0)
    )
    gfe_params = {f"gfe.{k}" for k, _ in algo.modules["gfe"].named_parameters()}
    assert set(update.payload) == gfe_params == set(server)
    assert not any("running" in k or "num_batches" in k for k in update.payload)
    assert update.num_examples == client.num_train
    # the private state holds every module, optimizer moments, and the GFE's own BN statistics
    assert {"model/csfe.fc.weight", "model/gen.fc.weight", "model/idm.mu.0.weight"} <= set(
        update.state
    )
    assert "model/gfe.trunk.1.running_mean" in update.state


def test_aggregation_weights_are_sample_counts() -> None:
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(4)}
    b = {"w": torch.tensor([4.0, 8.0]), "n": torch.tensor(8)}
    out = weighted_mean([(a, 1.0), (b, 3.0)])
    assert torch.equal(out["w"], torch.tensor([3.25, 6.5]))  # (1·1 + 3·4)/4, (1·2 + 3·8)/4
    assert out["n"].item() == 7 and out["n"].dtype == torch.int64
    algo = make_algo()
    server = {"w": torch.zeros(2)}
    assert algo.aggregate(server, []) is server  # nobody uploaded: the server keeps its GFE
    assert torch.equal(algo.aggregate({}, [(a, 1), (b, 3)])["w"], out["w"])


def _snapshot(algo: FedRIR, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {
        f"{m}.{k}": v.detach().clone() for m in names for k, v in algo.modules[m].named_parameters()
    }


def _changed(before: dict[str, torch.Tensor], algo: FedRIR) -> set[str]:
    now = _snapshot(algo, tuple({k.split(".")[0] for k in before}))
    return {k.split(".")[0] for k in before if not torch.equal(before[k], now[k])}


def test_stage_one_updates_only_csfe_and_generator(client: ClientData) -> None:
    algo = make_algo()
    server = algo.init_server(0)
    algo.workspace.load(server, algo.init_client(1, server))
    algo.modules.train()
    before = _snapshot(algo, ("gfe", "csfe", "gen", "idm", "head"))
    rng = torch.Generator().manual_seed(0)
    fit(algo.runtime, client, rng, 1, 20, algo.mcsl_step(rng))
    assert _changed(before, algo) == {"csfe", "gen"}


@pytest.mark.parametrize("idm", ["nll", "club"])
def test_stage_two_updates_only_gfe_idm_and_head(client: ClientData, idm: str) -> None:
    algo = make_algo(idm=idm)
    server = algo.init_server(0)
    algo.workspace.load(server, algo.init_client(1, server))
    algo.modules.train()
    before = _snapshot(algo, ("gfe", "csfe", "gen", "idm", "head"))
    csfe_stats = algo.modules["csfe"].trunk[1].running_mean.clone()
    rng = torch.Generator().manual_seed(0)
    metrics = fit(algo.runtime, client, rng, 1, 20, algo.classifier_step())
    assert _changed(before, algo) == {"gfe", "idm", "head"}
    # the frozen CSFE still runs in training mode: its BatchNorm statistics move
    assert not torch.equal(csfe_stats, algo.modules["csfe"].trunk[1].running_mean)
    assert set(metrics) == {"train_loss", "idm_loss", "train_accuracy"} | (
        {"idm_fit"} if idm == "club" else set()
    )


def _grads(algo: FedRIR, module: str) -> list[torch.Tensor]:
    return [p.grad.clone() for p in algo.modules[module].parameters()]


@pytest.mark.parametrize("idm", ["nll", "club"])
def test_idm_gradients_reach_the_right_modules(client: ClientData, idm: str) -> None:
    """nll: λ·NLL into IDM and GFE alike. club: the NLL into the IDM only, λ·bound into the GFE."""
    weight = 0.5
    algo = make_algo(idm=idm, idm_weight=weight)
    server = algo.init_server(0)
    algo.workspace.load(server, algo.init_client(1, server))
    x = client.train_x[:20]
    f_cs = algo._features(x)
    gfe, q = algo.modules["gfe"], algo.modules["idm"]
    algo.modules.zero_grad()
    fit, term = algo._idm_loss(gfe(x), f_cs)
    (fit + term).backward()
    got_gfe, got_idm = _grads(algo, "gfe"), _grads(algo, "idm")

    algo.modules.zero_grad()  # what the IDM should get
    f_g = gfe(x)
    mu, logvar = q(f_g if idm == "nll" else f_g.detach())
    fit = gaussian_nll(mu, logvar, f_cs)
    (weight * fit if idm == "nll" else fit).backward()
    for got, want in zip(got_idm, _grads(algo, "idm"), strict=True):
        assert torch.allclose(got, want, atol=1e-6)

    algo.modules.zero_grad()  # what the GFE should get
    mu, logvar = q(gfe(x))
    want_term = weight * (gaussian_nll if idm == "nll" else club_bound)(mu, logvar, f_cs)
    want_term.backward()
    want_gfe = _grads(algo, "gfe")
    assert any(g.abs().sum() > 0 for g in want_gfe)
    for got, want in zip(got_gfe, want_gfe, strict=True):
        assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(term, want_term.detach())


def test_optimizer_state_persists_across_rounds(client: ClientData) -> None:
    algo = make_algo()
    server = algo.init_server(0)
    state = algo.init_client(1, algo.init_server(0))
    assert not any(k.startswith("opt_") for k in state)
    steps_per_round = client.num_train // 20
    for r in (1, 2):
        state = algo.local_update(server, state, client, torch.Generator().manual_seed(r)).state
        assert state["opt_cls/gfe.fc.weight/step"].item() == r * steps_per_round
        assert state["opt_mcsl/csfe.fc.weight/step"].item() == r * steps_per_round


def test_independent_inits_when_common_init_is_off(client: ClientData) -> None:
    algo = make_algo(common_init=False)
    assert algo.init_server(0) == {}
    a, b = algo.init_client(1, algo.init_server(0)), algo.init_client(2, algo.init_server(0))
    assert not torch.equal(a["model/gfe.fc.weight"], b["model/gfe.fc.weight"])
    update = algo.local_update({}, a, client, torch.Generator().manual_seed(0))
    assert set(update.payload) == {f"gfe.{k}" for k, _ in algo.modules["gfe"].named_parameters()}


def test_ablations_build_the_right_modules(client: ClientData) -> None:
    no_mcsl = make_algo(mcsl=False, idm="none")
    assert set(no_mcsl.modules) == {"gfe", "head"}
    update = no_mcsl.local_update(
        no_mcsl.init_server(0),
        no_mcsl.init_client(1, no_mcsl.init_server(0)),
        client,
        torch.Generator().manual_seed(0),
    )
    assert "recon_loss" not in update.metrics
    no_idm = make_algo(idm="none")
    assert set(no_idm.modules) == {"gfe", "csfe", "gen", "head"}
    with pytest.raises(ConfigError, match="--idm none"):
        FedRIRConfig(mcsl=False)


def test_sizes_follow_the_input_shape() -> None:
    for shape in [(1, 28, 28), (3, 32, 32), (3, 64, 64)]:
        algo = FedRIR(with_overrides(Config(), {"embed_dim": 16}), Task(shape, 10), CPU)
        x = torch.zeros(2, *shape)
        assert algo.modules["gfe"](x).shape == (2, 16)
        assert algo.modules["gen"](torch.zeros(2, 16)).shape == (2, *shape)
    with pytest.raises(ConfigError, match="patch_size"):
        make_algo(patch_size=5)
