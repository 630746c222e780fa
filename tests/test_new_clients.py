"""New clients and the global model: clients held out of training, adapted from the broadcast and
scored; the global model on every client's test set; the same numbers on both engines.

Data: scikit-learn's digits (bundled), 5 or 4 clients, a 32-wide feature, two rounds.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from test_flower import LoopbackGrid, _task_identity

import fedrir
from fedrir import tables
from fedrir.algorithms.base import Payload
from fedrir.algorithms.baseline import Classifier
from fedrir.config import Config, run_identity, with_overrides
from fedrir.data.types import ClientData
from fedrir.engine import rounds
from fedrir.engine.checkpoint import load_snapshot
from fedrir.errors import ConfigError
from fedrir.flower.app import make_client_app, serve
from fedrir.results import GENERALIZATION
from fedrir.runs import prepare


def small(cache: Path, **overrides: Any) -> Config:
    """Digits over 5 clients (Dirichlet α = 0.5), 2 of them new; seconds per run."""
    base = {
        "dataset": "digits",
        "clients": 5,
        "alpha": 0.5,
        "new_clients": 2,
        "rounds": 2,
        "batch_size": 20,
        "embed_dim": 32,
        "cache_dir": str(cache),
        "device": "cpu",
        "threads": 1,
        "precision": "fp32",
        "new_client_epochs": 2,
    }
    return with_overrides(Config(), base | overrides)


def final_server(out: Path, config: Config) -> Payload:
    snapshot = load_snapshot(out / "checkpoint", run_identity(config))
    assert snapshot is not None
    return snapshot.server


def client_files(out: Path, config: Config) -> dict[int, dict[str, torch.Tensor]]:
    snapshot = load_snapshot(out / "checkpoint", run_identity(config))
    assert snapshot is not None
    return {c: load_file(str(out / "checkpoint" / f)) for c, f in snapshot.clients.items()}


def strict_json(path: Path) -> dict[str, Any]:
    def refuse(name: str) -> None:
        raise ValueError(f"{path} holds {name}")

    result: dict[str, Any] = json.loads(path.read_text(), parse_constant=refuse)
    return result


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- settings


def test_settings_are_checked_in_one_line() -> None:
    with pytest.raises(ConfigError, match=r"new_clients.*leave at least one"):
        with_overrides(Config(), {"clients": 4, "new_clients": 4})
    with pytest.raises(ConfigError, match="new_clients"):
        with_overrides(Config(), {"new_clients": -1})
    with pytest.raises(ConfigError, match="new_client_every"):
        with_overrides(Config(), {"new_client_every": -2})
    with pytest.raises(ConfigError, match="new_client_epochs"):
        with_overrides(Config(), {"new_client_epochs": -1})


def test_new_clients_are_never_planned_nor_evaluated_as_trained() -> None:
    cfg = with_overrides(
        Config(), {"clients": 12, "new_clients": 3, "join_ratio": 0.3, "random_join": True}
    )
    held = rounds.new_clients(cfg, 12)
    assert len(held) == 3 and held == rounds.new_clients(cfg, 12)  # seeded
    assert held != rounds.new_clients(with_overrides(cfg, {"seed": 1}), 12)
    seen: set[int] = set()
    for r in range(1, 60):
        seen |= set(rounds.plan_round(cfg, r, 12).selected)
        assert not set(rounds.evaluated_clients(cfg, r, 12)) & set(held)
    assert seen == set(range(12)) - set(held)  # every training client, no new one
    # no new clients: the plans of today, client for client
    plain = with_overrides(cfg, {"new_clients": 0})
    assert rounds.new_clients(plain, 12) == ()
    assert rounds.training_clients(plain, 12) == tuple(range(12))


# ----------------------------------------------------------------------------- in-process


def test_new_clients_never_change_the_server_nor_the_training_clients(tmp_path: Path) -> None:
    """Scoring new clients every round leaves the run exactly as scoring them once at the end:
    the server, every training client's state and every personalized number."""
    often = small(tmp_path, algorithm="fedrir", idm="club", new_client_every=1)
    once = with_overrides(often, {"new_client_every": 0})
    a = fedrir.run(often, out=tmp_path / "often")
    b = fedrir.run(once, out=tmp_path / "once")
    held = set(rounds.new_clients(often, 5))
    assert [r.participants for r in a.history] == [3, 3]  # 5 clients, 2 held out
    for record in a.history:
        assert {int(c) for c in record.client_accuracies} == set(range(5)) - held
        assert record.new_client_accuracy is not None
    assert b.history[0].new_client_accuracy is None  # round 1 is no generalization round
    assert same_tensors(
        final_server(tmp_path / "often", often), final_server(tmp_path / "once", once)
    )
    states_a = client_files(tmp_path / "often", often)
    states_b = client_files(tmp_path / "once", once)
    assert set(states_a) == set(range(5)) - held  # a new client's state is never stored
    assert all(same_tensors(states_a[c], states_b[c]) for c in states_a)
    for ra, rb in zip(a.history, b.history, strict=True):
        assert (ra.accuracy, ra.loss, ra.client_accuracies) == (
            rb.accuracy,
            rb.loss,
            rb.client_accuracies,
        )
    # the last round's new-client numbers do not depend on the earlier scoring
    for name in GENERALIZATION:
        assert a.summary[name] == b.summary[name]
    # and a rerun gives the same numbers
    again = fedrir.run(often, out=None)
    assert [r.to_json() | {"seconds": 0, "elapsed": 0} for r in again.history] == [
        r.to_json() | {"seconds": 0, "elapsed": 0} for r in a.history
    ]


def _global_model_accuracy(payload: Payload, prefix: str, clients: list[ClientData]) -> float:
    """The global classifier rebuilt from the payload alone, scored by hand."""
    first = clients[0]
    model = Classifier(tuple(first.eval_x.shape[1:]), 32, 10)  # type: ignore[arg-type]
    model.load_state_dict(
        {k.removeprefix(prefix): v for k, v in payload.items() if k.startswith(prefix)}
    )
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(c.eval_x).argmax(1) == c.eval_y).sum()) for c in clients)
    return correct / sum(c.num_eval for c in clients)


@pytest.mark.parametrize(("algorithm", "prefix"), [("fedavg", ""), ("fedrod", "global.")])
def test_zero_shot_is_the_global_model_on_the_new_clients(
    tmp_path: Path, algorithm: str, prefix: str
) -> None:
    cfg = small(tmp_path, algorithm=algorithm, new_client_full=True)
    result = fedrir.run(cfg, out=tmp_path / "run")
    server = final_server(tmp_path / "run", cfg)
    _, data = prepare(cfg)
    new = [data.clients[c] for c in rounds.new_clients(cfg, 5)]
    s = result.summary
    assert s["new_client_zero_shot_accuracy"] == pytest.approx(
        _global_model_accuracy(server, prefix, new), abs=1e-12
    )
    assert s["global_accuracy"] == pytest.approx(
        _global_model_accuracy(server, prefix, list(data.clients)), abs=1e-12
    )
    if algorithm == "fedavg":  # nothing private: adapting changes nothing, training all does
        assert s["new_client_accuracy"] == s["new_client_zero_shot_accuracy"]
        assert s["new_client_full_accuracy"] != s["new_client_accuracy"]
    else:  # the personal head learns on the new client's data
        assert s["new_client_accuracy"] != s["new_client_zero_shot_accuracy"]


def test_methods_without_a_global_model_write_null(tmp_path: Path) -> None:
    result = fedrir.run(small(tmp_path, algorithm="fedper"), out=tmp_path / "run")
    summary = strict_json(tmp_path / "run" / "summary.json")
    assert summary["global_accuracy"] is None
    assert summary["new_client_zero_shot_accuracy"] is None
    assert summary["new_client_full_accuracy"] is None  # not asked for
    assert 0 < summary["new_client_accuracy"] <= 1
    # the final accuracy covers every training client: the held-out ones do not make it partial
    assert summary["final_accuracy_clients"] == 3 and summary["final_accuracy_partial"] is False
    assert summary == json.loads(json.dumps(result.summary))
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["new_client_zero_shot_accuracy"] is None
    # no new clients: null new-client numbers, the global model still scored (FedAvg)
    plain = fedrir.run(small(tmp_path, algorithm="fedavg", new_clients=0), out=None).summary
    assert plain["new_client_accuracy"] is None and 0 < plain["global_accuracy"] <= 1
    # FedAvg's personalized evaluation is its global model: the same number on the same clients
    assert plain["global_accuracy"] == plain["final_accuracy"]


# ----------------------------------------------------------------------------- the contract


@pytest.mark.parametrize(
    "algorithm", ["fedrir", "fedavg", "fedbabu", "ditto", "fedas", "fedcp", "fedproto", "gpfl"]
)
def test_adapt_changes_neither_payload_nor_state(tmp_path: Path, algorithm: str) -> None:
    cfg = small(tmp_path, algorithm=algorithm, idm="club")
    algo, data = prepare(cfg)
    payload = rounds.initial_server(algo)
    state = rounds.initial_client(algo, 0, payload)
    before = ({k: v.clone() for k, v in payload.items()}, {k: v.clone() for k, v in state.items()})
    gen = algo.runtime.generator(0)
    out_payload, adapted = algo.adapt(payload, state, data.clients[0], gen, False)
    assert same_tensors(payload, before[0]) and same_tensors(state, before[1])
    assert same_tensors(out_payload, payload)  # shared parts frozen
    private = algo.parameter_counts()["private"] and algorithm not in ("fedavg", "fedbabu")
    assert (not same_tensors(adapted, state)) == bool(private)
    full_payload, _ = algo.adapt(payload, state, data.clients[0], algo.runtime.generator(0), True)
    # everything trained; but Ditto predicts with its personal model alone, FedProto shares
    # no model (only prototypes, which a client does not change)
    assert same_tensors(full_payload, payload) == (algorithm in ("ditto", "fedproto"))
    assert same_tensors(payload, before[0]) and same_tensors(state, before[1])


# ----------------------------------------------------------------------------- both engines


@pytest.mark.parametrize("algorithm", ["fedrir", "fedavg"])
def test_flower_gives_the_same_numbers(tmp_path: Path, algorithm: str) -> None:
    cfg = small(
        tmp_path,
        algorithm=algorithm,
        clients=4,
        new_clients=1,
        new_client_every=1,
        new_client_full=True,
        checkpoint_every=0,
        engine="flower",
    )
    sim = fedrir.run(with_overrides(cfg, {"engine": "sim"}), out=None)
    grid = LoopbackGrid(make_client_app(lambda _: cfg), 4)
    with _task_identity():
        flower = serve(grid, cfg, tmp_path / "run", timeout=5.0)
    assert len(flower.history) == len(sim.history) == 2
    for f, s in zip(flower.history, sim.history, strict=True):
        assert f.client_accuracies == pytest.approx(s.client_accuracies, abs=1e-9)
        for name in GENERALIZATION:
            fv, sv = getattr(f, name), getattr(s, name)
            assert (fv is None) == (sv is None) and (
                fv is None or fv == pytest.approx(sv, abs=1e-9)
            )
    assert sim.history[-1].new_client_accuracy is not None
    assert (sim.history[-1].global_accuracy is None) == (algorithm == "fedrir")
    sim_eval = sim.summary["bytes_evaluation_downloaded"]
    assert sim_eval <= flower.summary["bytes_evaluation_downloaded"] <= sim_eval + 4096 * 2 * 4


def test_compare_tables_carry_the_numbers_and_na() -> None:
    def summary(final: float, new: float | None, zero: float | None) -> dict[str, Any]:
        return {
            "final_accuracy": final,
            "best_accuracy": final,
            "client_accuracy_std": 0.01,
            "bytes_uploaded_per_round": 1000.0,
            "bytes_uploaded": 2000,
            "bytes_downloaded": 2000,
            "rounds": 2,
            "seconds_per_round": 1.0,
            "parameters": {"shared": 10, "private": 5},
            "global_accuracy": zero,
            "new_client_accuracy": new,
            "new_client_zero_shot_accuracy": zero,
            "new_client_full_accuracy": None,
        }

    fedavg = tables.algorithm_row(
        "fedavg", "none", [summary(0.9, 0.5, 0.5), summary(0.8, 0.7, 0.6)]
    )
    assert fedavg["new_client_accuracy_mean"] == pytest.approx(60.0)
    assert fedavg["global_accuracy_std"] == pytest.approx(statistics.stdev([50.0, 60.0]))
    assert fedavg["new_client_full_accuracy_mean"] is None
    fedper = tables.algorithm_row("fedper", "none", [summary(0.9, 0.4, None)])
    old = tables.algorithm_row(
        "old",
        "none",
        [{k: v for k, v in summary(0.9, 0.4, 0.3).items() if k not in GENERALIZATION}],
    )
    assert old["new_client_accuracy_mean"] is None  # a run from before these numbers
    md = tables.to_markdown(
        [fedavg, fedper, old],
        with_overrides(Config(), {"new_clients": 2}),
        [0, 1],
        "test",
        "cmd",
        ("g", "r"),
    )
    assert "| fedavg | 85.00 ± 7.07 | 85.00 ± 7.07 | 1.00 | 55.00 ± 7.07 | 60.00 ± 14.14 |" in md
    assert "| fedper | 90.00 | 90.00 | 1.00 | n/a | 40.00 | n/a |" in md
    assert "| old | 90.00 | 90.00 | 1.00 | – | – | – |" in md and "–: the runs' records" in md
    assert "uplink" not in md and "ratio" not in md  # no codec in this grid: no codec columns
    plain = tables.to_markdown([fedavg], Config(), [0, 1], "test", "cmd", ("g", "r"))
    assert "new-client" not in plain.lower() and "| global acc (%) |" in plain  # none held out
    assert "n/a" not in tables.to_csv([fedavg])  # CSV: empty cells
