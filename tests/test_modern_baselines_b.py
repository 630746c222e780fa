"""FedCP, GPFL and FedAS: what each sends and keeps, each one's mechanism on hand-built numbers,
a short learning run each, and resuming after a crash.

Data: scikit-learn's handwritten digits through the real pipeline (``dataset = "digits"``, 1×16×16),
4 clients with 3 classes each (``pat``), so chance is 1/3 for a personal model.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import fedrir
from fedrir.algorithms import ALGORITHMS
from fedrir.algorithms.base import payload_bytes
from fedrir.algorithms.baseline import Baseline
from fedrir.algorithms.fedas import FedAS, alignment_loss, class_means, fisher_trace
from fedrir.algorithms.fedcp import ConditionalPolicy, mmd
from fedrir.algorithms.gpfl import ConditionalValve, angle_loss, magnitude_loss
from fedrir.config import Config, with_overrides
from fedrir.data.types import FederatedData
from fedrir.errors import ConfigError
from fedrir.models.cnn import Encoder
from fedrir.results import RoundRecord, read_metrics
from fedrir.runs import prepare

NAMES = ["fedcp", "gpfl", "fedas"]
SHAPE = (1, 16, 16)
DIM = 32


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def make_config(cache: Path, name: str, **overrides: Any) -> Config:
    base = {
        "algorithm": name,
        "dataset": "digits",
        "partition": "pat",
        "clients": 4,
        "classes_per_client": 3,
        "rounds": 3,
        "batch_size": 20,
        "embed_dim": DIM,
        "lr": 2e-3,
        "precision": "fp32",
        "threads": 1,
        "device": "cpu",
        "checkpoint_every": 0,
        "cache_dir": str(cache),
    }
    return with_overrides(Config(), base | overrides)


def make(cache: Path, name: str, **overrides: Any) -> tuple[Baseline, FederatedData]:
    algo, data = prepare(make_config(cache, name, **overrides))
    assert isinstance(algo, Baseline)
    return algo, data


def rng(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def prefixed(prefix: str, keys: set[str]) -> set[str]:
    return {prefix + k for k in keys}


BODY = prefixed("body.", set(Encoder(SHAPE, DIM).state_dict()))
HEAD = {"head.weight", "head.bias"}
# algorithm: (what it uploads, the model keys its client state keeps, its other state keys)
SHARING: dict[str, tuple[set[str], set[str], set[str]]] = {
    "fedcp": (
        BODY
        | {"global_head.weight", "global_head.bias"}
        | prefixed("cpn.fc.", {"0.weight", "0.bias", "1.weight", "1.bias"}),
        HEAD,
        set(),
    ),
    "gpfl": (
        BODY
        | {"gce.weight"}
        | {
            f"cov.{b}.{i}.{p}"
            for b in ("gamma", "beta")
            for i in (0, 2)
            for p in ("weight", "bias")
        },
        HEAD,
        {"generic_input", "personal_input"},
    ),
    "fedas": (BODY | {"sync_weight"}, BODY | HEAD, set()),
}


def test_registered_and_settings_validated(cache: Path) -> None:
    assert set(NAMES) <= set(ALGORITHMS)
    for key, bad in [
        ("cp_lambda", -1.0),
        ("gpfl_lambda", float("nan")),
        ("gpfl_mu", -0.1),
        ("as_align_lr", 0.0),
        ("as_align_epochs", -1),
        ("as_align_batch_size", 0),
    ]:
        with pytest.raises(ConfigError, match=f"invalid value for '{key}'"):
            with_overrides(Config(), {key: bad})


@pytest.mark.parametrize("name", NAMES)
def test_uploads_exactly_the_shared_part_and_keeps_the_personal_part(
    cache: Path, name: str
) -> None:
    algo, data = make(cache, name)
    uploads, private, extra = SHARING[name]
    server = algo.init_server(1)
    state = algo.init_client(2, algo.init_server(0))
    update = algo.local_update(server, state, data.clients[0], rng())
    assert set(update.payload) == uploads
    assert set(server) == uploads - {"sync_weight"}
    for s in (state, update.state):
        assert {k.removeprefix("model/") for k in s if k.startswith("model/")} == private
        assert {k for k in s if not k.startswith(("model/", "opt_"))} == extra
    assert any(k.startswith("opt_") for k in update.state)
    assert update.num_examples == data.clients[0].num_train
    # the whole workspace is covered: what the server holds plus what the client keeps
    assert set(server) | private == set(algo.modules.state_dict())
    merged = algo.aggregate(server, [(update.payload, update.num_examples)])
    assert set(merged) == set(server)


@pytest.mark.parametrize("name", NAMES)
def test_evaluation_leaves_the_state_alone_and_is_repeatable(cache: Path, name: str) -> None:
    algo, data = make(cache, name)
    server = algo.init_server(1)
    state = algo.local_update(
        server, algo.init_client(2, algo.init_server(0)), data.clients[0], rng()
    ).state
    before = {k: v.clone() for k, v in state.items()}
    first = algo.evaluate(server, state, data.clients[0], rng(5))
    assert first == algo.evaluate(server, state, data.clients[0], rng(5))
    assert before.keys() == state.keys()
    assert all(torch.equal(before[k], state[k]) for k in state)


def _run_until(cfg: Config, out: Path, stop: int) -> None:
    """Run ``cfg`` into ``out`` and crash right after round ``stop`` (its checkpoint written)."""

    class Crash(Exception):
        pass

    def hook(_: RoundRecord | None, round_: int) -> None:
        if round_ == stop:
            raise Crash

    with pytest.raises(Crash):
        fedrir.run(cfg, out=out, on_round=hook)


# final accuracy after 3 rounds as measured in fp32 (fedcp 0.90, gpfl 0.88, fedas 1.00), less a
# margin; chance is 1/3
THRESHOLD = {"fedcp": 0.75, "gpfl": 0.75, "fedas": 0.9}


@pytest.mark.parametrize("name", NAMES)
def test_learns_counts_its_bytes_and_resumes_exactly(
    cache: Path, tmp_path: Path, name: str
) -> None:
    cfg = make_config(cache, name, checkpoint_every=1)
    reference = fedrir.run(cfg, out=tmp_path / "reference").summary
    assert reference["final_accuracy"] > THRESHOLD[name], reference["final_accuracy"]
    algo, data = prepare(cfg)
    up = algo.local_update(
        algo.init_server(0), algo.init_client(0, algo.init_server(0)), data.clients[0], rng()
    )
    assert reference["bytes_uploaded"] == 3 * 4 * payload_bytes(up.payload)
    assert reference["bytes_downloaded"] == 3 * 4 * payload_bytes(algo.init_server(0))

    out = tmp_path / "crashed"
    _run_until(cfg, out, stop=2)
    assert not (out / "summary.json").exists()
    resumed = fedrir.resume(out).summary
    for key in ("final_accuracy", "best_accuracy", "client_accuracy_std", "final_loss"):
        assert resumed[key] == reference[key], key
    for key in ("bytes_uploaded", "bytes_downloaded", "rounds"):
        assert resumed[key] == reference[key], key
    # every evaluated round's numbers, the training metrics included; only the times differ
    rows, want = (
        [{k: v for k, v in r.items() if k not in ("seconds", "elapsed")} for r in read_metrics(p)]
        for p in (out / "metrics.jsonl", tmp_path / "reference" / "metrics.jsonl")
    )
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert rows == want


# ----------------------------------------------------------------------------- FedCP


def _kernel(d2: float) -> float:
    return sum(math.exp(-d2 / (2 * h)) for h in (10, 15, 20, 50))


def test_mmd_is_the_rbf_formula_on_hand_built_points() -> None:
    x = torch.tensor([[0.0], [2.0]], dtype=torch.float64)  # the result is a small difference
    y = torch.tensor([[1.0], [1.0]], dtype=torch.float64)
    # pairs: xx distances² 0, 4, 4, 0; yy all 0; xy all 1
    want = (2 * _kernel(0) + 2 * _kernel(4) + 4 * _kernel(0) - 8 * _kernel(1)) / 4
    assert mmd(x, y).item() == pytest.approx(want, rel=1e-12)
    assert mmd(x, x).item() == pytest.approx(0.0, abs=1e-12)


def test_policy_shares_sum_to_one_and_follow_the_generator() -> None:
    cpn = ConditionalPolicy(4)
    x = torch.randn(3, 4, generator=rng(1))
    personal, generic = cpn(x, rng(0))
    assert personal.shape == generic.shape == (3, 4)
    assert torch.allclose(personal + generic, torch.ones(3, 4))
    assert ((personal > 0) & (personal < 1)).all()
    again, _ = cpn(x, rng(0))
    other, _ = cpn(x, rng(1))
    assert torch.equal(personal, again) and not torch.equal(personal, other)


def test_fedcp_uploads_the_mean_of_its_heads_and_never_trains_the_global_head(
    cache: Path,
) -> None:
    algo, data = make(cache, "fedcp")
    server, state = algo.init_server(1), algo.init_client(2, algo.init_server(0))
    update = algo.local_update(server, state, data.clients[0], rng())
    for p in ("weight", "bias"):
        personal = update.state[f"model/head.{p}"]
        assert not torch.equal(personal, state[f"model/head.{p}"])  # the personal head trained
        # ½(trained personal head + the global head as received): it did not move locally
        assert torch.equal(
            update.payload[f"global_head.{p}"], 0.5 * (personal + server[f"global_head.{p}"])
        )
    assert not any(k.startswith("opt_local/global_head.") for k in update.state)
    # the MMD pull towards the received extractor acts
    plain, _ = make(cache, "fedcp", cp_lambda=0.0)
    other = plain.local_update(server, state, data.clients[0], rng())
    assert not torch.equal(other.payload["body.fc.weight"], update.payload["body.fc.weight"])


# ----------------------------------------------------------------------------- GPFL


def test_gpfl_losses_on_hand_built_numbers() -> None:
    features = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    labels = torch.tensor([0, 1])
    embeddings = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    # cosines: row 0 → (0.6, 1.4/√2), row 1 → (0, 1/√2)
    c = 1 / math.sqrt(2)
    nll0 = -(0.6 - math.log(math.exp(0.6) + math.exp(1.4 * c)))
    nll1 = -(c - math.log(1 + math.exp(c)))
    assert angle_loss(features, labels, embeddings).item() == pytest.approx((nll0 + nll1) / 2)
    # F − E[y] = [[2, 4], [−1, 1]]
    assert magnitude_loss(features, labels, embeddings).item() == pytest.approx(math.sqrt(22))


def test_conditional_valve_on_hand_built_numbers() -> None:
    cov = ConditionalValve(3)
    with torch.no_grad():
        for net, bias in ((cov.gamma, [1.0, -1.0, 3.0]), (cov.beta, [0.0, 0.0, 0.0])):
            linear = net[0]
            assert isinstance(linear, nn.Linear)
            linear.weight.zero_()
            linear.bias.copy_(torch.tensor(bias))
    # γ = LayerNorm(ReLU(1, −1, 3)) = ((1, 0, 3) − 4/3) / √(14/9 + ε); β = LayerNorm(0) = 0
    std = math.sqrt(14 / 9 + 1e-5)
    gamma = [(v - 4 / 3) / std for v in (1.0, 0.0, 3.0)]
    feature = torch.tensor([[1.0, 1.0, 1.0], [2.0, -1.0, 0.5]])
    want = [
        [max(0.0, f * (1 + g)) for f, g in zip(row, gamma, strict=True)] for row in feature.tolist()
    ]
    assert torch.allclose(
        cov(feature, torch.randn(3, generator=rng())), torch.tensor(want), atol=1e-6
    )


def test_gpfl_conditional_inputs_come_from_the_gce_it_trained(cache: Path) -> None:
    algo, data = make(cache, "gpfl")
    state = algo.init_client(2, algo.init_server(0))
    assert all(torch.equal(state[k], torch.zeros(DIM)) for k in ("generic_input", "personal_input"))
    update = algo.local_update(algo.init_server(1), state, data.clients[0], rng())
    trained = update.payload["gce.weight"]
    counts = torch.bincount(data.clients[0].train_y, minlength=10).float()
    assert torch.allclose(update.state["generic_input"], trained.mean(0))
    assert torch.allclose(update.state["personal_input"], (counts / counts.sum()) @ trained)
    # the personal input weighs only the client's 3 classes
    assert int((counts > 0).sum()) == 3


# ----------------------------------------------------------------------------- FedAS


def test_class_means_and_alignment_loss_on_hand_built_numbers() -> None:
    features = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    means = class_means(features, torch.tensor([0, 0, 2]), 3)
    assert torch.equal(means, torch.tensor([[2.0, 3.0], [0.0, 0.0], [5.0, 6.0]]))
    # class 0: MSE((1,1),(2,2)) and ((3,3),(2,2)) → 1; class 1: MSE((0,0),(1,0)) → 0.5
    loss = alignment_loss(
        torch.tensor([[1.0, 1.0], [3.0, 3.0], [0.0, 0.0]]),
        torch.tensor([0, 0, 1]),
        torch.tensor([[2.0, 2.0], [1.0, 0.0]]),
    )
    assert loss.item() == pytest.approx(1.5)


def test_fisher_trace_of_a_linear_model_on_hand_built_numbers() -> None:
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.zero_()  # uniform softmax: ∇W = mean over samples of (p − onehot) xᵀ
    x, y = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 1])
    # ∇W = [[−0.25, 0.5], [0.25, −0.5]], so ‖∇W‖² = 0.625 per batch
    assert fisher_trace(model, [(x, y)]).item() == pytest.approx(0.625)
    assert fisher_trace(model, [(x, y), (x, y)]).item() == pytest.approx(1.25)


def test_fedas_aggregates_by_fisher_traces_not_sample_counts(cache: Path) -> None:
    algo, data = make(cache, "fedas")
    server = algo.init_server(1)
    a, b = (
        algo.local_update(server, algo.init_client(c, algo.init_server(0)), data.clients[c], rng(c))
        for c in (0, 1)
    )
    wa, wb = a.payload["sync_weight"].item(), b.payload["sync_weight"].item()
    assert wa > 0 and wb > 0 and a.metrics["fisher_trace"] == pytest.approx(wa)
    merged = algo.aggregate(server, [(a.payload, 1), (b.payload, 1000)])
    key = "body.fc.weight"
    want = (wa * a.payload[key].double() + wb * b.payload[key].double()) / (wa + wb)
    assert torch.allclose(merged[key].double(), want, atol=1e-6)


def test_fedas_evaluates_its_own_model_whatever_the_broadcast(cache: Path) -> None:
    algo, data = make(cache, "fedas")
    state = algo.local_update(
        algo.init_server(1), algo.init_client(0, algo.init_server(0)), data.clients[0], rng()
    ).state
    one, other = algo.init_server(1), algo.init_server(7)
    assert not torch.equal(one["body.fc.weight"], other["body.fc.weight"])
    client = data.clients[0]
    assert algo.evaluate(one, state, client, rng()) == algo.evaluate(other, state, client, rng())


def test_fedas_alignment_fits_the_received_extractor_to_the_client_prototypes(
    cache: Path,
) -> None:
    algo, data = make(cache, "fedas")
    assert isinstance(algo, FedAS)
    client = data.clients[0]
    state = algo.local_update(
        algo.init_server(1), algo.init_client(0, algo.init_server(0)), client, rng()
    ).state
    received = algo.init_server(7)
    algo._load(received, state)
    prototypes = algo._prototypes(client)  # from the client's own trained extractor
    body = algo.modules.get_submodule("body")
    body.load_state_dict({k.removeprefix("body."): v for k, v in received.items()})

    def loss() -> float:
        with torch.no_grad():
            return alignment_loss(body.eval()(client.train_x), client.train_y, prototypes).item()

    before = loss()
    algo._align(prototypes, client, rng())
    assert loss() < 0.5 * before
    # BatchNorm statistics are left as received (evaluation mode)
    stats = "trunk.1.running_mean"
    assert torch.equal(body.state_dict()[stats], received[f"body.{stats}"])


def test_fedas_prototypes_and_alignment_ignore_the_runs_precision(cache: Path) -> None:
    """They run in fp32 under a bf16 run too (bf16 rounding once turned an alignment spike into
    divergence): the same client state gives the same prototypes and aligned extractor, bit for
    bit, while the bf16 run's training does differ."""
    results = []
    for precision in ("fp32", "bf16"):
        algo, data = make(cache, "fedas", precision=precision)
        assert isinstance(algo, FedAS)
        client = data.clients[0]
        algo._load(algo.init_server(7), algo.init_client(0, algo.init_server(0)))
        prototypes = algo._prototypes(client)
        algo._align(prototypes, client, rng())
        body = {k: v.clone() for k, v in algo.modules.get_submodule("body").state_dict().items()}
        trained = algo.local_update(
            algo.init_server(1), algo.init_client(0, algo.init_server(0)), client, rng()
        ).payload
        results.append((prototypes, body, trained))
    (p32, b32, t32), (p16, b16, t16) = results
    assert torch.equal(p32, p16)
    assert all(torch.equal(b32[k], b16[k]) for k in b32)
    assert not all(torch.equal(t32[k], t16[k]) for k in t32)
