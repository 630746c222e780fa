"""Many clients in bounded memory: the client-state store behind the in-process engine.

States are loaded when a round touches a client and written back when they change; the store's
files in ``checkpoint/`` are the checkpoint. These tests run real (small) federations through the
public API and check what lands on disk, that the cache budget never changes a result, and that a
crash between a client's file and the manifest resumes to the uninterrupted run.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

import fedrir
from fedrir.config import Config, with_overrides
from fedrir.data.datasets import load_dataset
from fedrir.data.federated import make_partition
from fedrir.engine import checkpoint, rounds
from fedrir.errors import DataError
from fedrir.results import read_metrics

CLIENT_FILE = re.compile(r"client(\d+)\.s\d+\.safetensors")


def synthetic(cache: Path, **overrides: Any) -> Config:
    """The procedural dataset (3 000 images, 16×16) over many small clients, FedAvg, fp32."""
    base = {
        "algorithm": "fedavg",
        "dataset": "synthetic",
        "partition": "iid",
        "clients": 30,
        "join_ratio": 0.1,
        "rounds": 3,
        "batch_size": 10,
        "embed_dim": 16,
        "precision": "fp32",
        "threads": 1,
        "cache_dir": str(cache),
    }
    return with_overrides(Config(), base | overrides)


def client_files(out: Path) -> dict[int, str]:
    return {
        int(m.group(1)): p.name
        for p in (out / "checkpoint").iterdir()
        if (m := CLIENT_FILE.fullmatch(p.name))
    }


def trained(config: Config) -> set[int]:
    plans = [rounds.plan_round(config, r, config.data.clients) for r in range(1, config.rounds + 1)]
    return {c for plan in plans for c in plan.participants}


def numbers(result: fedrir.RunResult) -> list[tuple[Any, ...]]:
    return [(r.round, r.accuracy, r.loss, r.client_accuracies, r.train) for r in result.history]


def test_only_clients_that_trained_have_files_and_evaluation_samples(tmp_path: Path) -> None:
    config = synthetic(tmp_path, eval_clients=5)
    result = fedrir.run(config, out=tmp_path / "run")
    touched = trained(config)
    assert 0 < len(touched) < config.data.clients  # some clients never trained: no file
    assert set(client_files(tmp_path / "run")) == touched
    # intermediate rounds evaluate a seeded sample; the last every client
    assert [r.evaluated for r in result.history] == [5, 5, 30]
    assert [len(r.client_accuracies) for r in result.history] == [5, 5, 30]
    assert list(result.history[-1].client_accuracies) == [str(c) for c in range(30)]
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["evaluated"] for r in rows] == [5, 5, 30]


def test_a_tiny_cache_gives_the_same_run_as_a_large_one(tmp_path: Path) -> None:
    config = synthetic(tmp_path, algorithm="ditto", join_ratio=0.3)
    large = fedrir.run(config, out=tmp_path / "large")
    tiny = fedrir.run(with_overrides(config, {"state_cache_mb": 0}), out=tmp_path / "tiny")
    assert numbers(tiny) == numbers(large)
    assert set(client_files(tmp_path / "tiny")) == set(client_files(tmp_path / "large"))


def test_a_crash_between_client_files_and_the_manifest_resumes_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = synthetic(tmp_path, algorithm="fedrep", join_ratio=0.3)
    reference = fedrir.run(config, out=tmp_path / "reference")
    out = tmp_path / "crashed"
    real_write = checkpoint.atomic_write

    def crash_at_round_2(path: Path, text: str) -> None:
        if path.name == checkpoint.MANIFEST and '"round": 2' in text:
            raise KeyboardInterrupt  # the clients' round-2 files are written, the manifest not
        real_write(path, text)

    monkeypatch.setattr(checkpoint, "atomic_write", crash_at_round_2)
    with pytest.raises(KeyboardInterrupt):
        fedrir.run(config, out=out)
    monkeypatch.undo()
    round_1 = rounds.plan_round(config, 1, config.data.clients).participants
    round_2 = rounds.plan_round(config, 2, config.data.clients).participants
    assert set(round_2) - set(round_1)  # round 2 wrote files that no manifest names
    on_disk = client_files(out)
    assert set(round_2) <= set(on_disk)
    resumed = fedrir.resume(out)
    assert numbers(resumed) == numbers(reference)
    for key in ("final_accuracy", "best_accuracy", "bytes_uploaded", "rounds"):
        assert resumed.summary[key] == reference.summary[key], key
    assert set(client_files(out)) == set(client_files(tmp_path / "reference"))


def test_five_hundred_clients_with_no_cache_run_end_to_end(tmp_path: Path) -> None:
    config = synthetic(
        tmp_path,
        clients=500,
        join_ratio=0.02,
        rounds=2,
        batch_size=2,
        embed_dim=8,
        eval_clients=20,
        state_cache_mb=0,
    )
    result = fedrir.run(config, out=tmp_path / "run")
    assert [r.evaluated for r in result.history] == [20, 500]
    assert [r.participants for r in result.history] == [10, 10]
    assert set(client_files(tmp_path / "run")) == trained(config)
    assert 0.0 <= result.summary["final_accuracy"] <= 1.0


def test_a_thousand_client_mnist_partition_terminates_or_says_why(tmp_path: Path) -> None:
    mnist = {"dataset": "mnist", "partition": "dir", "clients": 1000, "cache_dir": str(tmp_path)}
    dataset = load_dataset(Config().data, 0)
    # the README's 1 000-client federation
    feasible = with_overrides(Config(), mnist | {"alpha": 1.0, "min_samples": 20})
    partition = make_partition(feasible.data, dataset, 0, feasible.train.batch_size)
    assert partition.num_clients == 1000
    sizes = [len(t) + len(e) for t, e in zip(partition.train_idx, partition.test_idx, strict=True)]
    assert min(sizes) >= 20
    # α = 0.1 with the default minimum cannot be met: one line that names the fix
    skewed = with_overrides(Config(), mnist | {"alpha": 0.1})
    with pytest.raises(DataError) as error:
        make_partition(skewed.data, dataset, 0, skewed.train.batch_size)
    assert "\n" not in str(error.value) and "--min-samples" in str(error.value)
