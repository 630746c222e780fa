"""FedALA, FedDBE and FedProto: what each sends and keeps, each one's mechanism on exact numbers,
short learning runs through ``fedrir compare``, and resume after a crash.

Data: the registry's ``digits`` (scikit-learn's handwritten digits, real, bundled, 1×16×16) over
4 clients with 3 classes each (``pat``), so chance is 1/3 for a personal model; fp32, one thread.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import fedrir
from fedrir.algorithms import ALGORITHMS
from fedrir.algorithms.base import Algorithm, Payload, Runtime, Task, payload_bytes
from fedrir.algorithms.baseline import Classifier
from fedrir.algorithms.feddbe import mean_regularizer
from fedrir.compare import compare, run_dir
from fedrir.config import Config, with_overrides
from fedrir.data.types import ClientData, FederatedData
from fedrir.errors import ConfigError
from fedrir.results import RoundRecord, read_metrics
from fedrir.runs import prepare

NAMES = ["fedala", "feddbe", "fedproto"]
ROUNDS = 5
SETTINGS: dict[str, Any] = {
    "dataset": "digits",
    "clients": 4,
    "partition": "pat",
    "classes_per_client": 3,
    "rounds": ROUNDS,
    "batch_size": 50,
    "embed_dim": 32,
    "lr": 2e-3,
    "device": "cpu",
    "precision": "fp32",
    "threads": 1,
}
CPU = Runtime(device=torch.device("cpu"))
K, D = 10, 32  # classes, feature width
ADAM = ("step", "exp_avg", "exp_avg_sq")

# the workspace keys of one classifier
ALL = frozenset(Classifier((1, 16, 16), D, K).state_dict())
PARAMS = frozenset(n for n, _ in Classifier((1, 16, 16), D, K).named_parameters())
HEAD = frozenset({"head.weight", "head.bias"})


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def settings(cache: Path, name: str = "fedavg", **overrides: Any) -> Config:
    return with_overrides(
        Config(), SETTINGS | {"algorithm": name, "cache_dir": str(cache)} | overrides
    )


@pytest.fixture(scope="module")
def data(cache: Path) -> FederatedData:
    return prepare(settings(cache))[1]


@pytest.fixture(scope="module")
def client(data: FederatedData) -> ClientData:
    return data.clients[0]


def make(name: str, data: FederatedData, **overrides: Any) -> Algorithm:
    task = Task(input_shape=data.input_shape, num_classes=data.num_classes)
    return ALGORITHMS[name](settings(Path("unused"), name, **overrides), task, CPU)


def rng(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def model_keys(state: Payload) -> set[str]:
    return {k.removeprefix("model/") for k in state if k.startswith("model/")}


def opt_keys(group: str, params: frozenset[str]) -> set[str]:
    return {f"opt_{group}/{p}/{entry}" for p in params for entry in ADAM}


def train_features(model: Classifier, x: torch.Tensor) -> torch.Tensor:
    """The body's features of one training batch, as a local update's first step computes them."""
    model.train()
    with torch.no_grad():
        return model.body(x)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("ala_eta", -1.0),
        ("ala_rand_percent", 0),
        ("ala_rand_percent", 101),
        ("ala_layer_idx", -1),
        ("dbe_momentum", 0.0),
        ("dbe_momentum", 1.5),
        ("dbe_kappa", float("nan")),
        ("proto_lambda", -0.5),
    ],
)
def test_bad_settings_are_one_line_errors_naming_the_key(key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=f"^invalid value for '{key}': [^\\n]+$"):
        with_overrides(Config(), {key: value})


# ----------------------------------------------------------------------------- what travels


def test_fedala_uploads_the_model_and_keeps_the_adaptive_layers_and_their_weights(
    data: FederatedData, client: ClientData
) -> None:
    algo = make("fedala", data)
    server = algo.init_server(1)
    assert set(server) == ALL
    assert (
        algo.init_client(2, algo.init_server(0)) == {}
    )  # no local model before the first participation
    first = algo.local_update(server, {}, client, rng(0))
    assert set(first.payload) == ALL and first.num_examples == client.num_train
    assert set(first.state) == {f"model/{k}" for k in HEAD} | opt_keys("local", PARAMS)
    second = algo.local_update(server, first.state, client, rng(1))
    weights = {f"ala/{k}" for k in HEAD}
    assert set(second.state) == set(first.state) | weights
    assert algo.parameter_counts() == {
        "shared": sum(p.numel() for p in Classifier((1, 16, 16), D, K).parameters()),
        "private": 2 * (K * D + K),
    }
    # ala_layer_idx 0 aggregates every parameter tensor adaptively: all of them stay local
    every = make("fedala", data, ala_layer_idx=0)
    state = every.local_update(server, {}, client, rng(0)).state
    assert model_keys(state) == PARAMS
    with pytest.raises(ConfigError, match="ala_layer_idx"):
        make("fedala", data, ala_layer_idx=len(PARAMS) + 1)


def test_feddbe_uploads_the_model_and_its_running_mean_until_the_global_mean_is_set(
    data: FederatedData, client: ClientData
) -> None:
    algo = make("feddbe", data)
    server = algo.init_server(1)
    assert set(server) == ALL
    start = algo.init_client(2, algo.init_server(0))
    assert set(start) == {"model/prbm"} and torch.equal(start["model/prbm"], torch.zeros(D))
    first = algo.local_update(server, start, client, rng(0))
    assert set(first.payload) == ALL | {"running_mean"}
    # the initialization period trains without DBE: the PRBM neither moves nor gets a state
    assert set(first.state) == {"model/prbm"} | opt_keys("local", PARAMS)
    assert torch.equal(first.state["model/prbm"], start["model/prbm"])
    server = algo.aggregate(server, [(first.payload, first.num_examples)])
    assert set(server) == ALL | {"global_mean"}
    second = algo.local_update(server, first.state, client, rng(1))
    assert set(second.payload) == ALL
    assert set(second.state) == set(first.state) | opt_keys("prbm", frozenset({"prbm"}))
    assert not torch.equal(second.state["model/prbm"], start["model/prbm"])


def test_fedproto_sends_prototypes_and_keeps_the_whole_model(
    data: FederatedData, client: ClientData
) -> None:
    algo = make("fedproto", data)
    server = algo.init_server(1)
    # the initial model rides with the first broadcast only: every client starts from it
    assert set(server) == {"protos", "counts"} | ALL
    assert server["protos"].shape == (K, D) and not server["counts"].any()
    a, b = algo.init_client(2, server), algo.init_client(3, server)
    assert model_keys(a) == ALL and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(a["model/body.fc.weight"], server["body.fc.weight"])
    update = algo.local_update(server, a, client, rng(0))
    assert set(update.payload) == {"protos", "counts"}
    assert set(update.state) == {f"model/{k}" for k in ALL} | opt_keys("local", PARAMS)
    # one epoch of full batches: every representation computed is counted once
    counts = update.payload["counts"]
    assert counts.dtype == torch.int64 and int(counts.sum()) == client.num_train // 50 * 50
    assert set(torch.nonzero(counts).flatten().tolist()) == set(client.train_y.tolist())
    assert algo.parameter_counts()["shared"] == 0
    after = algo.aggregate(server, [(update.payload, update.num_examples)])
    assert set(after) == {"protos", "counts"}  # from round 2 on, prototypes alone travel
    assert payload_bytes(update.payload) == payload_bytes(after) == K * D * 4 + K * 8


# ----------------------------------------------------------------------------- mechanisms


def test_fedala_weights_follow_the_update_rule_exactly(
    data: FederatedData, client: ClientData
) -> None:
    """One batch (the whole training set: 100 %, batch larger than the client), learned weights
    present, so exactly one step: W = clip(1 − η · ∂L/∂θ̂ ⊙ (Θ − θ), 0, 1) at θ̂ = Θ."""
    eta = 100.0
    algo = make("fedala", data, ala_eta=eta, ala_rand_percent=100, batch_size=1000)
    server, other = algo.init_server(1), algo.init_server(7)
    state = {f"model/{k}": other[k] for k in HEAD} | {
        f"ala/{k}": torch.ones_like(other[k]) for k in HEAD
    }
    weights = algo.local_update(server, state, client, rng(0)).state
    model = Classifier(data.input_shape, D, K)
    model.load_state_dict(server)
    model.train()
    loss = F.cross_entropy(model(client.train_x), client.train_y)
    grads = torch.autograd.grad(loss, [model.head.weight, model.head.bias])
    for key, grad in zip(("head.weight", "head.bias"), grads, strict=True):
        expected = (1 - eta * grad * (server[key] - other[key])).clamp(0, 1)
        assert torch.allclose(weights[f"ala/{key}"], expected, atol=1e-6)
    w = weights["ala/head.weight"]  # the case exercises both bounds and the inside
    assert (w == 0).any() and (w == 1).any() and ((w > 0) & (w < 1)).any()


def test_fedala_weights_stay_in_bounds_and_lean_to_the_local_optimum(
    data: FederatedData, client: ClientData
) -> None:
    """A client with a good local head receives a global model whose head is its negation: the
    learned mixture recovers the local head, while the global model gets every sample wrong."""
    algo = make("fedala", data)
    trained = algo.local_update(algo.init_server(1), {}, client, rng(0))
    for r in range(3):
        trained = algo.local_update(trained.payload, trained.state, client, rng(10 + r))
    local = {k: v for k, v in trained.state.items() if not k.startswith("ala/")}  # start phase
    bad = trained.payload | {k: -trained.payload[k] for k in HEAD}
    as_global = algo.evaluate(bad, {}, client, rng(1))  # never trained: the global model as is
    adapted = algo.evaluate(bad, local, client, rng(1))
    assert as_global.accuracy < 0.1 and adapted.accuracy > 0.9  # measured: 0.0 and 1.0
    weights = algo.local_update(bad, local, client, rng(2)).state["ala/head.weight"]
    assert weights.min() == 0 and weights.max() <= 1 and weights.mean() < 0.9


def test_feddbe_mean_regularizer_matches_its_formula() -> None:
    running, global_mean = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 2.0, 5.0])
    # mean of ½(m − ḡ)² = (½ + 0 + 2) / 3
    assert mean_regularizer(running, global_mean).item() == pytest.approx(2.5 / 3, abs=1e-7)


def test_feddbe_running_mean_and_global_mean(data: FederatedData, client: ClientData) -> None:
    """With momentum 1 and one batch the running mean is the batch's mean feature; the server's
    global mean is the sample-weighted mean of the running means, set once and then kept."""
    algo = make("feddbe", data, batch_size=1000)
    server = algo.init_server(1)
    update = algo.local_update(server, algo.init_client(2, algo.init_server(0)), client, rng(0))
    model = Classifier(data.input_shape, D, K)
    model.load_state_dict(server)
    expected = train_features(model, client.train_x).mean(0)
    assert torch.allclose(update.payload["running_mean"], expected, atol=1e-6)

    model_part = {k: v for k, v in update.payload.items() if k != "running_mean"}
    ups = [
        (model_part | {"running_mean": torch.tensor([1.0, 1.0])}, 1),
        (model_part | {"running_mean": torch.tensor([3.0, 5.0])}, 3),
    ]
    merged = algo.aggregate(server, ups)
    assert torch.equal(merged["global_mean"], torch.tensor([2.5, 4.0]))  # (1 + 9) / 4, (1 + 15) / 4
    assert torch.allclose(merged["head.weight"], model_part["head.weight"])
    later = algo.aggregate(merged, [(model_part, 1)])
    assert torch.equal(later["global_mean"], merged["global_mean"])


def test_feddbe_regularizer_weight_changes_training(
    data: FederatedData, client: ClientData
) -> None:
    bodies = []
    for kappa in (0.0, 50.0):
        algo = make("feddbe", data, dbe_kappa=kappa)
        server = algo.init_server(1)
        first = algo.local_update(server, algo.init_client(2, algo.init_server(0)), client, rng(0))
        server = algo.aggregate(server, [(first.payload, first.num_examples)])
        bodies.append(algo.local_update(server, first.state, client, rng(1)).payload)
    assert not torch.equal(bodies[0]["body.fc.weight"], bodies[1]["body.fc.weight"])


def test_fedproto_server_prototypes_are_sample_weighted_class_means(data: FederatedData) -> None:
    algo = make("fedproto", data)
    server = {"protos": torch.full((4, 2), 9.0), "counts": torch.full((4,), 5, dtype=torch.int64)}
    a = {
        "protos": torch.tensor([[1.0, 1.0], [0.0, 0.0], [2.0, 2.0], [0.0, 0.0]]),
        "counts": torch.tensor([1, 0, 2, 0]),
    }
    b = {
        "protos": torch.tensor([[3.0, 3.0], [4.0, -4.0], [0.0, 0.0], [0.0, 0.0]]),
        "counts": torch.tensor([3, 1, 0, 0]),
    }
    # the clients' sample counts (100, 1) play no part: the per-class counts weigh
    merged = algo.aggregate(server, [(a, 100), (b, 1)])
    expected = torch.tensor([[2.5, 2.5], [4.0, -4.0], [2.0, 2.0], [9.0, 9.0]])  # class 3: kept
    assert torch.equal(merged["protos"], expected)
    assert merged["counts"].tolist() == [4, 1, 2, 5]
    assert algo.aggregate(server, []) is server


def test_fedproto_local_prototypes_are_the_class_means_of_training_features(
    data: FederatedData, client: ClientData
) -> None:
    algo = make("fedproto", data, batch_size=1000)  # one batch: features of the initial model
    start = algo.init_client(2, algo.init_server(0))
    update = algo.local_update(algo.init_server(1), start, client, rng(0))
    model = Classifier(data.input_shape, D, K)
    model.load_state_dict({k.removeprefix("model/"): v for k, v in start.items()})
    features = train_features(model, client.train_x)
    counts = torch.bincount(client.train_y, minlength=K)
    assert torch.equal(update.payload["counts"], counts)
    for c in range(K):
        if counts[c]:
            mean = features[client.train_y == c].mean(0)
            assert torch.allclose(update.payload["protos"][c], mean, atol=1e-5)
        else:
            assert not update.payload["protos"][c].any()


def test_fedproto_predicts_the_nearest_global_prototype(
    data: FederatedData, client: ClientData
) -> None:
    algo = make("fedproto", data)
    state = algo.init_client(2, algo.init_server(0))
    # before any prototype every class scores alike: loss log K, every prediction class 0
    none = algo.evaluate(algo.init_server(1), state, client, rng(0))
    assert none.loss_sum == pytest.approx(client.num_eval * math.log(K))
    assert none.correct == int((client.eval_y == 0).sum())
    # prototypes for two of the client's three classes (their mean test features) and for one
    # class it lacks (a random vector); none for its third class
    model = Classifier(data.input_shape, D, K)
    model.load_state_dict({k.removeprefix("model/"): v for k, v in state.items()})
    model.eval()
    with torch.no_grad():
        features = model.body(client.eval_x)
    mine = sorted(set(client.train_y.tolist()))
    known = [*mine[:2], next(c for c in range(K) if c not in mine)]
    protos = torch.zeros(K, D)
    protos[known[:2]] = torch.stack([features[client.eval_y == c].mean(0) for c in known[:2]])
    protos[known[2]] = torch.randn(D, generator=torch.Generator().manual_seed(3))
    counts = torch.zeros(K, dtype=torch.int64)
    counts[known] = 1
    result = algo.evaluate({"protos": protos, "counts": counts}, state, client, rng(0))
    dist = ((features[:, None, :] - protos[known][None]) ** 2).mean(-1)
    predicted = torch.tensor(known)[dist.argmin(1)]
    assert result.correct == int((predicted == client.eval_y).sum())
    assert result.correct > 0
    # a test sample of the class without a prototype cannot be predicted: its loss is infinite
    assert (client.eval_y == mine[2]).any() and math.isinf(result.loss_sum)


# ----------------------------------------------------------------------------- end to end

# final accuracy after ROUNDS rounds as measured, minus a margin; chance is 1/3
THRESHOLD = {"fedala": 0.7, "feddbe": 0.7, "fedproto": 0.9}  # measured: 0.86, 0.82, 0.998
SUMMARY_KEYS = (
    "final_accuracy",
    "best_accuracy",
    "client_accuracy_std",
    "final_loss",
    "bytes_uploaded",
    "bytes_downloaded",
    "rounds",
)


@pytest.fixture(scope="module")
def grid(cache: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Any]]:
    out = tmp_path_factory.mktemp("grid") / "grid"
    return out, compare(settings(cache), NAMES, [0], out)


def test_each_learns_well_above_chance_in_a_compare_grid(grid: tuple[Path, list[Any]]) -> None:
    _, rows = grid
    assert {r["algorithm"] for r in rows} == set(NAMES)
    for row in rows:
        assert row["final_accuracy_mean"] > 100 * THRESHOLD[row["algorithm"]], row


def test_bytes_are_those_of_what_travels(grid: tuple[Path, list[Any]]) -> None:
    out, _ = grid
    model = payload_bytes(Classifier((1, 16, 16), D, K).state_dict())
    rows = {name: read_metrics(run_dir(out, name, 0) / "metrics.jsonl") for name in NAMES}
    four = SETTINGS["clients"]
    assert all(r["bytes_up"] == r["bytes_down"] == four * model for r in rows["fedala"])
    # FedDBE: the running means go up in round 1 only; the global mean comes down from round 2
    dbe = rows["feddbe"]
    assert (dbe[0]["bytes_up"], dbe[0]["bytes_down"]) == (four * (model + 4 * D), four * model)
    assert all(r["bytes_up"] == four * model for r in dbe[1:])
    assert all(r["bytes_down"] == four * (model + 4 * D) for r in dbe[1:])
    # FedProto: prototypes and their counts, and the initial model once, down in round 1
    protos = four * (K * D * 4 + K * 8)
    proto = rows["fedproto"]
    assert all(r["bytes_up"] == protos for r in proto)
    assert proto[0]["bytes_down"] == protos + four * model
    assert all(r["bytes_down"] == protos for r in proto[1:])


class Crash(Exception):
    pass


def crash_after(round_: int) -> Any:
    def hook(record: RoundRecord | None, r: int) -> None:
        if r == round_:
            raise Crash

    return hook


@pytest.mark.parametrize("name", NAMES)
def test_resume_after_a_crash_equals_the_uninterrupted_run(
    name: str, cache: Path, grid: tuple[Path, list[Any]], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    with pytest.raises(Crash):
        fedrir.run(settings(cache, name), out=out, on_round=crash_after(2))
    assert not (out / "summary.json").exists()
    resumed = fedrir.resume(out).summary
    reference_dir = run_dir(grid[0], name, 0)
    reference = json.loads((reference_dir / "summary.json").read_text())
    for key in SUMMARY_KEYS:
        assert resumed[key] == reference[key], key
    rows, ref_rows = (read_metrics(d / "metrics.jsonl") for d in (out, reference_dir))
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
    for key in ("accuracy", "client_accuracies", "loss", "train"):
        assert [r[key] for r in rows] == [r[key] for r in ref_rows], key
