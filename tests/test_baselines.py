"""The baselines: what each one sends and keeps, exact equivalences, and short learning runs.

Data: scikit-learn's handwritten digits (real, bundled, no download), upsampled to 1×16×16 (the
encoder's two 5×5 convolutions need at least 16×16) and normalised to [-1, 1], over 5 clients with
label skew (3 classes each), so chance is 1/3 for a personal model and 1/10 for a global one.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from fedrir.algorithms import ALGORITHMS
from fedrir.algorithms.base import Algorithm, Runtime, State, Task, payload_bytes
from fedrir.algorithms.baseline import Baseline, Classifier
from fedrir.algorithms.fedrod import balanced_softmax_loss
from fedrir.config import Config, with_overrides
from fedrir.data.types import ClientData, FederatedData
from fedrir.engine import rounds
from fedrir.engine.simulator import SimState, open_state, simulate

SHAPE = (1, 16, 16)
TASK = Task(input_shape=SHAPE, num_classes=10)
CPU = Runtime(device=torch.device("cpu"))
# FedRIR and the modern baselines (state and uploads beyond workspace prefixes) are tested apart
TESTED_ELSEWHERE = {"fedrir"} | {"fedala", "feddbe", "fedproto"} | {"fedcp", "gpfl", "fedas"}
"""test_fedrir.py, test_modern_baselines_a.py, test_modern_baselines_b.py"""
BASELINES = [name for name in ALGORITHMS if name not in TESTED_ELSEWHERE]
ROUNDS = 4


def digits(num_clients: int = 5) -> FederatedData:
    """Client c holds classes 2c, 2c+1 and 2c+2 (mod 10); a shared class is split evenly."""
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 8 - 1  # pixels 0…16 → [-1, 1]
    x = F.interpolate(x, size=SHAPE[1:], mode="bilinear", align_corners=False)
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    parts: list[list[torch.Tensor]] = [[] for _ in range(num_clients)]
    for k in range(10):
        owners = [c for c in range(num_clients) if k in {2 * c, 2 * c + 1, (2 * c + 2) % 10}]
        idx = torch.nonzero(y == k).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        for owner, chunk in zip(owners, idx.tensor_split(len(owners)), strict=True):
            parts[owner].append(chunk)
    clients = []
    for part in parts:
        idx = torch.cat(part)
        idx = idx[torch.randperm(len(idx), generator=g)]
        n = int(0.75 * len(idx))
        clients.append(ClientData(x[idx[:n]], y[idx[:n]], x[idx[n:]], y[idx[n:]]))
    return FederatedData(tuple(clients), num_classes=10, input_shape=SHAPE)


@pytest.fixture(scope="module")
def data() -> FederatedData:
    return digits()


def few(data: FederatedData, n: int = 3) -> FederatedData:
    """The first ``n`` clients, for the exact checks that run several times."""
    return FederatedData(data.clients[:n], data.num_classes, data.input_shape)


def make_config(name: str, **overrides: Any) -> Config:
    base = {
        "algorithm": name,
        "rounds": ROUNDS,
        "eval_every": ROUNDS,
        "batch_size": 50,
        "embed_dim": 32,
        "lr": 2e-3,
        "head_epochs": 3,
        "checkpoint_every": 0,
    }
    return with_overrides(Config(), base | overrides)


def make(name: str, **overrides: Any) -> Baseline:
    algo = ALGORITHMS[name](make_config(name, **overrides), TASK, CPU)
    assert isinstance(algo, Baseline)
    return algo


def start(algo: Algorithm) -> SimState:
    """Round 0, the clients' store in a folder of its own with room for every state."""
    return open_state(algo, Path(tempfile.mkdtemp(prefix="fedrir-test-")), 2**40)


def run(algo: Algorithm, data: FederatedData) -> SimState:
    return simulate(algo, algo.config, data, start(algo))


def rng(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# the workspace keys of one classifier, by part
ALL = frozenset(Classifier(SHAPE, 32, 10).state_dict())
BODY = frozenset(k for k in ALL if k.startswith("body."))
HEAD = ALL - BODY
BN = frozenset(k for k in BODY if k.startswith(("body.trunk.1.", "body.trunk.5.")))  # 2 × 5 keys


def prefixed(prefix: str, keys: frozenset[str]) -> frozenset[str]:
    return frozenset(prefix + k for k in keys)


PERSONAL_HEAD = frozenset({"personal_head.weight", "personal_head.bias"})
# algorithm: (what it uploads, the model keys its client state keeps)
SHARING: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "local": (frozenset(), ALL),
    "fedavg": (ALL, frozenset()),
    "fedavg-ft": (ALL, frozenset()),
    "fedprox": (ALL, frozenset()),
    "fedper": (BODY, HEAD),
    "fedrep": (BODY, HEAD),
    "fedbabu": (BODY, frozenset()),  # the fixed head comes down from the server, never goes up
    "lgfedavg": (HEAD, BODY),
    "fedbn": (ALL - BN, BN),
    "ditto": (prefixed("global.", ALL), prefixed("personal.", ALL)),
    "apfl": (prefixed("global.", ALL), prefixed("personal.", ALL)),
    "fedrod": (prefixed("global.", ALL), PERSONAL_HEAD),
}
# final accuracy after ROUNDS rounds as measured (0.81 fedbn … 0.99 lgfedavg), minus a margin
THRESHOLD = {name: 0.9 for name in BASELINES} | {
    "fedavg": 0.7,
    "fedprox": 0.7,
    "fedbn": 0.7,
    "fedper": 0.75,
    "fedrod": 0.8,
}


def test_every_baseline_is_registered_and_tested() -> None:
    assert set(BASELINES) == set(SHARING) == set(THRESHOLD)
    assert len(BN) == 10  # two BatchNorm layers: weight, bias, running mean and var, count


@pytest.mark.parametrize("name", BASELINES)
def test_uploads_exactly_the_shared_part_and_keeps_the_personal_part(
    name: str, data: FederatedData
) -> None:
    algo = make(name)
    uploads, private = SHARING[name]
    server = algo.init_server(1)
    state = algo.init_client(2, algo.init_server(1))
    update = algo.local_update(server, state, data.clients[0], rng())
    assert set(update.payload) == uploads
    assert set(server) == (uploads | HEAD if name == "fedbabu" else uploads)
    for s in (state, update.state):
        assert {k.removeprefix("model/") for k in s if k.startswith("model/")} == private
    assert all(k.startswith(("model/", "opt_")) or k == "alpha" for k in update.state)
    assert update.num_examples == data.clients[0].num_train
    # the whole workspace is covered: what the server holds plus what the client keeps
    assert set(server) | private == set(algo.modules.state_dict())
    assert ("alpha" in update.state) == (name == "apfl")


@pytest.mark.parametrize("name", BASELINES)
def test_evaluation_leaves_the_state_alone_and_is_repeatable(
    name: str, data: FederatedData
) -> None:
    algo = make(name)
    server = algo.init_server(1)
    state = algo.local_update(
        server, algo.init_client(2, algo.init_server(1)), data.clients[0], rng()
    ).state
    before = {k: v.clone() for k, v in state.items()}
    first = algo.evaluate(server, state, data.clients[0], rng(5))
    second = algo.evaluate(server, state, data.clients[0], rng(5))
    assert first == second
    assert before.keys() == state.keys()
    assert all(torch.equal(before[k], state[k]) for k in state)


@pytest.mark.parametrize("name", BASELINES)
def test_learns_well_above_chance_and_counts_its_bytes(name: str, data: FederatedData) -> None:
    algo = make(name)
    result = run(algo, data)
    final = result.ledger.history[-1]
    assert final.round == ROUNDS
    assert final.accuracy > THRESHOLD[name], final.accuracy
    # every client takes part every round: it downloads what the server holds, uploads its part
    tensors = algo.modules.state_dict()
    up = payload_bytes({k: tensors[k] for k in SHARING[name][0]})
    down = payload_bytes(algo.init_server(0))
    assert result.ledger.bytes_up == ROUNDS * data.num_clients * up
    assert result.ledger.bytes_down == ROUNDS * data.num_clients * down
    if name == "local":
        assert result.ledger.bytes_up == result.ledger.bytes_down == 0 and result.server == {}


def test_fedprox_with_mu_zero_is_fedavg_exactly(data: FederatedData) -> None:
    small = few(data)
    avg = run(make("fedavg", rounds=2, eval_every=1), small)
    mu0, mu1 = (
        run(make("fedprox", rounds=2, eval_every=1, prox_mu=mu), small) for mu in (0.0, 1.0)
    )
    assert [r.client_accuracies for r in mu0.ledger.history] == [
        r.client_accuracies for r in avg.ledger.history
    ]
    assert [r.loss for r in mu0.ledger.history] == [r.loss for r in avg.ledger.history]
    assert [r.train for r in mu0.ledger.history] == [r.train for r in avg.ledger.history]
    assert all(torch.equal(mu0.server[k], avg.server[k]) for k in avg.server)
    # and the proximal term does act when μ > 0
    assert not torch.equal(mu1.server["body.fc.weight"], avg.server["body.fc.weight"])


def test_fedbabu_never_trains_its_head(data: FederatedData) -> None:
    algo = make("fedbabu", rounds=2)
    begin = start(algo)
    head0 = {k: begin.server[k].clone() for k in HEAD}
    update = algo.local_update(begin.server, begin.clients.get(0), data.clients[0], rng())
    workspace = algo.modules.state_dict()
    assert all(torch.equal(workspace[k], head0[k]) for k in HEAD)  # trained body, same head
    assert not torch.equal(workspace["body.fc.weight"], begin.server["body.fc.weight"])
    assert not any(k.startswith("opt_local/head.") for k in update.state)  # never stepped
    end = simulate(algo, algo.config, data, begin)
    assert all(torch.equal(end.server[k], head0[k]) for k in HEAD)
    # aggregation averages the body and keeps the head the server holds
    merged = algo.aggregate(end.server, [(update.payload, 1)])
    assert all(torch.equal(merged[k], update.payload[k]) for k in BODY)
    assert all(torch.equal(merged[k], head0[k]) for k in HEAD)


def test_fedbn_aggregation_leaves_batchnorm_local(data: FederatedData) -> None:
    algo = make("fedbn")
    server = algo.init_server(1)
    a, b = (
        algo.local_update(
            server, algo.init_client(10 + c, algo.init_server(1)), data.clients[c], rng(c)
        )
        for c in (0, 1)
    )
    merged = algo.aggregate(server, [(a.payload, 1), (b.payload, 3)])
    assert set(merged) == ALL - BN
    w = "body.fc.weight"
    assert torch.allclose(merged[w], (a.payload[w] + 3 * b.payload[w]) / 4)
    stats = "model/body.trunk.1.running_mean"
    assert not torch.equal(a.state[stats], b.state[stats])  # each client keeps its own


def test_fedrep_trains_the_head_for_head_epochs_then_the_body(data: FederatedData) -> None:
    algo = make("fedrep", head_epochs=3, local_epochs=2)
    state = algo.local_update(
        algo.init_server(1), algo.init_client(2, algo.init_server(1)), data.clients[0], rng()
    ).state
    steps = data.clients[0].num_train // 50  # full batches per epoch
    assert state["opt_head/head.weight/step"].item() == 3 * steps
    assert state["opt_body/body.fc.weight/step"].item() == 2 * steps
    assert not any(k.startswith(("opt_head/body.", "opt_body/head.")) for k in state)


def test_apfl_learns_its_mixing_weight_within_bounds(data: FederatedData) -> None:
    algo = make("apfl", lr=0.05)  # a large step, so that α moves and meets the clipping
    state: State = algo.init_client(2, algo.init_server(1))
    server = algo.init_server(1)
    alphas = [state["alpha"].item()]
    for r in range(3):
        state = algo.local_update(server, state, data.clients[0], rng(r)).state
        alphas.append(state["alpha"].item())
    assert alphas[0] == 0.5 and len(set(alphas)) > 1
    assert all(0.0 <= a <= 1.0 for a in alphas)


@pytest.mark.parametrize("name", ["ditto", "apfl"])
def test_the_personal_model_starts_as_the_initial_global_model(name: str) -> None:
    algo = make(name)
    server = rounds.initial_server(algo)
    for client in (0, 1):
        state = rounds.initial_client(algo, client, server)
        personal = {k: v for k, v in state.items() if k.startswith("model/personal.")}
        assert {k.replace("model/personal.", "global.") for k in personal} == set(server)
        assert all(
            torch.equal(server[k.replace("model/personal.", "global.")], v)
            for k, v in personal.items()
        )


def test_balanced_softmax_shifts_logits_by_log_class_counts() -> None:
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], requires_grad=True)
    labels = torch.tensor([0, 1])
    counts = torch.tensor([4, 1, 0])
    loss = balanced_softmax_loss(logits, labels, counts)
    shifted = logits.detach()[:, :2] + torch.tensor([4.0, 1.0]).log()
    assert torch.allclose(loss, F.cross_entropy(shifted, labels))
    loss.backward()
    assert logits.grad is not None and torch.all(logits.grad[:, 2] == 0)  # an absent class


def test_same_seed_same_numbers_other_seed_other_numbers(data: FederatedData) -> None:
    a, b = (run(make("ditto", rounds=2), few(data)) for _ in range(2))
    c = run(make("ditto", rounds=2, seed=1), few(data))
    assert [r.client_accuracies for r in a.ledger.history] == [
        r.client_accuracies for r in b.ledger.history
    ]
    assert [r.loss for r in a.ledger.history] == [r.loss for r in b.ledger.history]
    assert all(torch.equal(a.server[k], b.server[k]) for k in a.server)
    assert all(
        torch.equal(sa[k], sb[k])
        for sa, sb in ((a.clients.get(c), b.clients.get(c)) for c in range(2))
        for k in sa
    )
    assert [r.loss for r in a.ledger.history] != [r.loss for r in c.ledger.history]


def test_parameter_counts_split_shared_and_private() -> None:
    params = {n: p.numel() for n, p in Classifier(SHAPE, 32, 10).named_parameters()}
    head = sum(v for k, v in params.items() if k.startswith("head."))
    total = sum(params.values())
    assert make("fedper").parameter_counts() == {"shared": total - head, "private": head}
    assert make("lgfedavg").parameter_counts() == {"shared": head, "private": total - head}
    assert make("local").parameter_counts() == {"shared": 0, "private": total}
    assert make("ditto").parameter_counts() == {"shared": total, "private": total}
