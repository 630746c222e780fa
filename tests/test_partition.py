"""Partitioners, the per-client split, the partition cache and the partition report.

Datasets here are small and hand-built (unbalanced classes, domains, a PFLlib-style test mask);
one check runs on real MNIST when it is available.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedrir.config import DataConfig
from fedrir.data import federated
from fedrir.data.datasets import load_dataset
from fedrir.data.federated import (
    Partition,
    build_federated,
    cache_key,
    cache_path,
    federate,
    make_partition,
)
from fedrir.data.partition import (
    PARTITIONERS,
    DirichletPartitioner,
    ExDirichletPartitioner,
    IidPartitioner,
    NaturalPartitioner,
    Partitioner,
    PathologicalPartitioner,
    make_partitioner,
)
from fedrir.data.report import format_partition_table, partition_summary, plot_partition_heatmap
from fedrir.data.types import Dataset
from fedrir.errors import ConfigError, DataError

K = 10


def make_dataset(
    n: int = 3000, num_classes: int = K, domains: int = 0, test_mask: bool = False, seed: int = 0
) -> Dataset:
    """Unbalanced classes (class k is about (k + 1) times as common as class 0), random pixels."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.arange(1, num_classes + 1, dtype=torch.float64)
    labels = torch.multinomial(weights, n, replacement=True, generator=g)
    labels[:num_classes] = torch.arange(num_classes)  # every class present
    images = torch.randint(0, 256, (n, 1, 6, 6), dtype=torch.uint8, generator=g)
    images[0] = 0
    images[1] = 255
    dom = mask = None
    if domains:
        dom = torch.randint(0, domains, (n,), generator=g)
        dom[:domains] = torch.arange(domains)
        if test_mask:
            mask = torch.rand(n, generator=g) < 0.2
    names = tuple(f"domain{i}" for i in range(domains))
    return Dataset("toy", images, labels, num_classes, dom, names, mask)


def cfg(tmp_path: Path, **kw: Any) -> DataConfig:
    return DataConfig(dataset="toy", cache_dir=str(tmp_path / "cache"), **kw)


def partitioner(name: str, seed: int, clients: int = 8) -> Partitioner:
    makers: dict[str, Callable[[], Partitioner]] = {
        "iid": lambda: IidPartitioner(clients, seed),
        "pat": lambda: PathologicalPartitioner(clients, K, 2, seed),
        "dir": lambda: DirichletPartitioner(clients, K, 0.1, seed, batch_size=20),
        "exdir": lambda: ExDirichletPartitioner(clients, K, 3, 0.1, seed),
        "natural": lambda: NaturalPartitioner(4, seed),
    }
    return makers[name]()


def class_counts(labels: np.ndarray, parts: list[np.ndarray]) -> np.ndarray:
    """``[clients, classes]`` sample counts."""
    return np.stack([np.bincount(labels[p], minlength=K) for p in parts])


# --- partitioners ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PARTITIONERS))
def test_partition_is_exact_and_deterministic(name: str) -> None:
    ds = make_dataset(domains=4)
    labels, domains = ds.labels.numpy(), ds.domains.numpy()  # type: ignore[union-attr]
    parts = partitioner(name, seed=3)(labels, domains)
    assert len(parts) == (4 if name == "natural" else 8)
    for p in parts:
        assert p.dtype == np.int64 and len(p) > 0 and np.all(np.diff(p) > 0)  # sorted, unique
    # every sample in exactly one client
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))

    again = partitioner(name, seed=3)(labels, domains)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    if name != "natural":  # one client per domain has nothing random to change
        other = partitioner(name, seed=4)(labels, domains)
        assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_iid_sizes_even_and_classes_mixed() -> None:
    labels = make_dataset().labels.numpy()
    parts = IidPartitioner(7, seed=0)(labels)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == len(labels)
    assert (class_counts(labels, parts) > 0).all()


@pytest.mark.parametrize(("clients", "c"), [(8, 2), (7, 3), (5, 2), (3, 10)])
def test_pat_gives_exactly_c_classes_and_uses_every_class(clients: int, c: int) -> None:
    labels = make_dataset().labels.numpy()
    parts = PathologicalPartitioner(clients, K, c, seed=1)(labels)
    present = class_counts(labels, parts) > 0
    assert (present.sum(axis=1) == c).all()
    assert present.any(axis=0).all()
    owners = present.sum(axis=0)
    assert owners.max() - owners.min() <= 1  # classes dealt round-robin


def test_pat_counts_are_unbalanced() -> None:
    labels = make_dataset(n=6000).labels.numpy()
    counts = class_counts(labels, PathologicalPartitioner(20, K, 2, seed=0)(labels))
    shared = counts[:, counts.argmax(axis=1)[0]]
    shared = shared[shared > 0]
    assert len(shared) == 4 and shared.max() > 1.5 * shared.min()


def test_dir_is_skewed_and_meets_min_size() -> None:
    labels = make_dataset(n=6000).labels.numpy()
    p = DirichletPartitioner(10, K, alpha=0.1, seed=0, batch_size=40, train_ratio=0.75)
    parts = p(labels)
    need = min(40 / 0.25, 6000 / 10 / 2)
    assert p.min_size(6000) == need == 160
    assert min(len(x) for x in parts) >= need

    def top_share(parts: list[np.ndarray]) -> float:
        counts = class_counts(labels, parts)
        return float((counts.max(axis=1) / counts.sum(axis=1)).mean())

    assert top_share(parts) > 0.6
    assert top_share(IidPartitioner(10, seed=0)(labels)) < 0.25  # ≈ the largest class's share
    # 20 clients and α = 0.1 rarely give the smallest client half the average (PFLlib's rule);
    # an explicit, smaller minimum is met exactly as asked
    hint = r"never gave every client 150 .* --min-samples below 150 \(or a smaller batch_size"
    with pytest.raises(DataError, match=hint):
        DirichletPartitioner(20, K, alpha=0.1, seed=0, max_retries=20)(labels)
    loose = DirichletPartitioner(20, K, alpha=0.1, seed=0, max_retries=20, min_samples=40)
    assert loose.min_size(6000) == 40
    assert min(len(x) for x in loose(labels)) >= 40


def test_dir_full_clients_get_no_more() -> None:
    """With α tiny, each class goes to one client and a full client is never picked again."""
    labels = np.repeat(np.arange(4), 100)
    parts = DirichletPartitioner(4, 4, alpha=1e-3, seed=0, batch_size=1)(labels)
    assert sorted(len(p) for p in parts) == [100, 100, 100, 100]
    assert (class_counts(labels, parts)[:, :4] > 0).sum(axis=1).tolist() == [1, 1, 1, 1]


def test_exdir_at_most_c_classes_and_every_class_used() -> None:
    labels = make_dataset(n=6000).labels.numpy()
    for clients, c in [(20, 2), (5, 2), (4, 3)]:
        parts = ExDirichletPartitioner(clients, K, c, alpha=0.1, seed=2)(labels)
        present = class_counts(labels, parts) > 0
        assert (present.sum(axis=1) <= c).all()
        assert present.any(axis=0).all()
        assert min(len(p) for p in parts) >= 10


def test_natural_one_client_per_domain() -> None:
    ds = make_dataset(domains=3)
    domains = ds.domains.numpy()  # type: ignore[union-attr]
    parts = NaturalPartitioner(3, seed=0)(ds.labels.numpy(), domains)
    for d, p in enumerate(parts):
        assert np.array_equal(p, np.flatnonzero(domains == d))


def test_make_partitioner_defaults_and_unknown_name(tmp_path: Path) -> None:
    p10 = make_partitioner(cfg(tmp_path, partition="pat"), 10, seed=0)
    p100 = make_partitioner(cfg(tmp_path, partition="exdir"), 100, seed=0)
    assert isinstance(p10, PathologicalPartitioner) and p10.classes_per_client == 2
    assert isinstance(p100, ExDirichletPartitioner) and p100.classes_per_client == 10
    d = make_partitioner(cfg(tmp_path, alpha=0.3, train_ratio=0.8), 10, seed=0, batch_size=32)
    assert isinstance(d, DirichletPartitioner) and (d.alpha, d.batch_size) == (0.3, 32)
    with pytest.raises(ConfigError, match="iid, pat, dir, exdir, natural"):
        make_partitioner(cfg(tmp_path, partition="shards"), 10, seed=0)
    with pytest.raises(ConfigError, match="alpha"):
        cfg(tmp_path, alpha=0.0)


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: DirichletPartitioner(4, K, alpha=0.0, seed=0), ConfigError, "alpha"),
        (lambda: ExDirichletPartitioner(4, K, 2, alpha=-1.0, seed=0), ConfigError, "alpha"),
        (lambda: PathologicalPartitioner(4, K, 11, seed=0), DataError, "at most 10"),
        (lambda: ExDirichletPartitioner(4, K, 11, 0.1, seed=0), DataError, "at most 10"),
        (lambda: PathologicalPartitioner(4, K, 2, seed=0), DataError, "at least 5 clients"),
    ],
)
def test_impossible_settings_are_refused(
    make: Callable[[], Partitioner], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        make()


def test_impossible_data_is_refused() -> None:
    labels = make_dataset(n=200).labels.numpy()
    with pytest.raises(DataError, match="use at most 200 clients"):
        IidPartitioner(201, seed=0)(labels)
    with pytest.raises(DataError, match="no domains"):
        NaturalPartitioner(3, seed=0)(labels, None)
    domains = np.arange(200) % 4
    with pytest.raises(DataError, match="set clients = 4"):
        NaturalPartitioner(3, seed=0)(labels, domains)
    # Two classes, ten clients, α tiny: each class goes whole to one client, eight stay empty.
    two = np.repeat([0, 1], 100)
    with pytest.raises(DataError, match=r"dir partition: 50 draws .* use fewer clients"):
        DirichletPartitioner(10, 2, alpha=1e-3, seed=0, max_retries=50)(two)
    with pytest.raises(DataError, match="labels must lie in"):
        DirichletPartitioner(2, 2, 1.0, seed=0)(np.array([0, 1, 2, 1]))


# --- per-client split, normalisation --------------------------------------------------------------


def test_split_sizes_add_up_and_follow_train_ratio(tmp_path: Path) -> None:
    ds = make_dataset()
    c = cfg(tmp_path, partition="dir", clients=6, alpha=0.5)
    part = make_partition(c, ds, seed=0, batch_size=20)
    clients = make_partitioner(c, K, seed=0, batch_size=20)(ds.labels.numpy())
    for i, idx in enumerate(clients):
        train, test = part.train_idx[i], part.test_idx[i]
        assert len(train) + len(test) == len(idx)
        assert len(train) == int(np.floor(0.75 * len(idx)))  # sklearn's train_test_split sizes
        assert np.array_equal(np.union1d(train, test), idx)
        assert len(part.val_idx[i]) == 0
    assert sum(len(t) + len(s) for t, s in zip(part.train_idx, part.test_idx, strict=True)) == 3000
    assert not part.has_validation


def test_validation_is_carved_from_train_and_leaves_test_alone(tmp_path: Path) -> None:
    ds = make_dataset()
    plain = make_partition(cfg(tmp_path, partition="iid", clients=5), ds, seed=1)
    part = make_partition(cfg(tmp_path, partition="iid", clients=5, val_ratio=0.2), ds, seed=1)
    assert part.has_validation
    for i in range(5):
        train, val, test = part.train_idx[i], part.val_idx[i], part.test_idx[i]
        assert np.array_equal(test, plain.test_idx[i])
        assert np.array_equal(np.union1d(train, val), plain.train_idx[i])
        assert len(np.intersect1d(train, val)) == 0
        assert len(val) == int(np.ceil(0.2 * len(plain.train_idx[i])))
        assert np.array_equal(part.eval_idx(i), val)

    data = federate(ds, part)
    for i, client in enumerate(data.clients):
        assert client.num_train == len(part.train_idx[i])
        assert torch.equal(client.eval_y, ds.labels[torch.from_numpy(part.val_idx[i])])


def test_natural_keeps_the_given_test_split(tmp_path: Path) -> None:
    ds = make_dataset(domains=3, test_mask=True)
    mask, domains = ds.test_mask.numpy(), ds.domains.numpy()  # type: ignore[union-attr]
    part = make_partition(cfg(tmp_path, partition="natural", clients=3), ds, seed=0)
    for d in range(3):
        assert np.array_equal(part.test_idx[d], np.flatnonzero((domains == d) & mask))
        assert np.array_equal(part.train_idx[d], np.flatnonzero((domains == d) & ~mask))
    # other partitions draw their own split from the pool
    drawn = make_partition(cfg(tmp_path, partition="iid", clients=3), ds, seed=0)
    assert not np.array_equal(drawn.test_idx[0], part.test_idx[0])


def test_client_too_small_to_split_is_an_error(tmp_path: Path) -> None:
    ds = make_dataset(n=20)
    with pytest.raises(DataError, match="client 0 has only 1 sample"):
        make_partition(cfg(tmp_path, partition="iid", clients=20), ds, seed=0)


def test_federate_normalises_to_minus_one_one(tmp_path: Path) -> None:
    ds = make_dataset()
    part = make_partition(cfg(tmp_path, partition="iid", clients=4), ds, seed=0)
    data = federate(ds, part)
    assert data.num_clients == 4 and data.num_classes == K and data.input_shape == (1, 6, 6)
    xs = torch.cat([torch.cat([c.train_x, c.eval_x]) for c in data.clients])
    assert xs.dtype == torch.float32 and xs.min() == -1.0 and xs.max() == 1.0  # pixels 0 and 255
    c0 = data.clients[0]
    assert c0.train_x.is_contiguous() and c0.eval_x.is_contiguous()
    idx = torch.from_numpy(part.train_idx[0])
    expected = (ds.images[idx].float() / 255 - 0.5) / 0.5
    assert torch.allclose(c0.train_x, expected) and torch.equal(c0.train_y, ds.labels[idx])


def test_build_federated_loads_partitions_and_normalises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = make_dataset()
    monkeypatch.setattr(federated, "load_dataset", lambda cfg, seed: ds)
    data = build_federated(cfg(tmp_path, partition="pat", clients=10), seed=0, batch_size=10)
    assert sum(c.num_train + c.num_eval for c in data.clients) == len(ds.labels)
    assert all(len(torch.cat([c.train_y, c.eval_y]).unique()) == 2 for c in data.clients)


# --- cache ----------------------------------------------------------------------------------------


def _refuse(*args: object, **kwargs: object) -> None:
    raise AssertionError("the partitioner ran although the partition is cached")


def same(a: Partition, b: Partition) -> bool:
    return all(
        np.array_equal(x, y)
        for split in ("train_idx", "test_idx", "val_idx")
        for x, y in zip(getattr(a, split), getattr(b, split), strict=True)
    )


def test_cache_hit_miss_and_corrupt_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = make_dataset()
    c = cfg(tmp_path, partition="dir", clients=6, alpha=0.3, val_ratio=0.1)
    first = make_partition(c, ds, seed=0, batch_size=20)
    path = cache_path(c, cache_key(c, ds, 0, 20))
    assert path.is_file() and path.parent.parent == tmp_path / "cache"
    assert not list(path.parent.glob("*.tmp"))  # the temp file was renamed into place

    monkeypatch.setattr(federated, "make_partitioner", _refuse)
    assert same(make_partition(c, ds, seed=0, batch_size=20), first)  # read from the cache

    changes: list[dict[str, Any]] = [
        {"seed": 1},
        {"batch_size": 21},
        {"cfg": dataclasses.replace(c, alpha=0.31)},
        {"cfg": dataclasses.replace(c, train_ratio=0.7)},
        {"cfg": dataclasses.replace(c, val_ratio=0.0)},
        {"ds": dataclasses.replace(ds, labels=ds.labels.roll(1))},
    ]
    for changed in changes:
        args: dict[str, Any] = {"cfg": c, "ds": ds, "seed": 0, "batch_size": 20} | changed
        with pytest.raises(AssertionError, match="partitioner ran"):
            make_partition(args["cfg"], args["ds"], args["seed"], args["batch_size"])

    monkeypatch.undo()
    for corrupt in (b"not a zip file", path.read_bytes()[:100]):
        path.write_bytes(corrupt)
        assert same(make_partition(c, ds, seed=0, batch_size=20), first)
        with np.load(path, allow_pickle=False) as f:  # rewritten, valid
            assert len(f["train"]) == sum(len(t) for t in first.train_idx)

    # A readable file whose indices do not cover the dataset is rebuilt too.
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["train"] = np.zeros_like(arrays["train"])
    with path.open("wb") as out:
        np.savez(out, **arrays)
    assert same(make_partition(c, ds, seed=0, batch_size=20), first)


def test_unwritable_cache_dir_still_builds(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    c = DataConfig(dataset="toy", partition="iid", clients=3, cache_dir=str(blocker))
    part = make_partition(c, make_dataset(), seed=0)
    assert part.num_clients == 3


# --- report ---------------------------------------------------------------------------------------


def test_summary_table_and_heatmap(tmp_path: Path) -> None:
    ds = make_dataset(domains=3)
    part = make_partition(cfg(tmp_path, partition="pat", clients=6, val_ratio=0.1), ds, seed=0)
    summary = partition_summary(ds, part)
    assert json.loads(json.dumps(summary)) == summary
    assert summary["dataset"] == "toy" and summary["num_classes"] == K and summary["total"] == 3000
    clients = summary["clients"]
    assert [c["id"] for c in clients] == list(range(6))
    for c, train, val, test in zip(
        clients, part.train_idx, part.val_idx, part.test_idx, strict=True
    ):
        assert (c["train"], c["val"], c["test"]) == (len(train), len(val), len(test))
        assert sum(c["labels"].values()) == len(train) + len(val) + len(test)
        assert len(c["labels"]) == 2 and all(v > 0 for v in c["labels"].values())
        assert sum(c["domains"].values()) == len(train) + len(val) + len(test)
    assert sum(sum(c["labels"].values()) for c in clients) == 3000

    table = format_partition_table(summary)
    lines = table.splitlines()
    assert len(lines) == 6 + 4 and lines[0].split()[:5] == [
        "client",
        "train",
        "val",
        "test",
        "classes",
    ]
    totals = lines[-1].split()
    assert totals[:5] == [
        "total",
        str(sum(c["train"] for c in clients)),
        str(sum(c["val"] for c in clients)),
        str(sum(c["test"] for c in clients)),
        "10",
    ]
    assert "3000 samples" in lines[-1]

    png = plot_partition_heatmap(summary, tmp_path / "out" / "heat.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- real data ------------------------------------------------------------------------------------


def test_mnist_dir_accounts_for_every_image(tmp_path: Path) -> None:
    """The acceptance check: MNIST, dir α = 0.1, 20 clients, seed 0 holds all 70 000 images."""
    c = DataConfig(dataset="mnist", partition="dir", alpha=0.1, clients=20, cache_dir=str(tmp_path))
    ds = load_dataset(c, 0)  # ships with the package's dependencies: no reason to skip
    part = make_partition(c, ds, seed=0, batch_size=100)
    everything = np.concatenate(part.train_idx + part.test_idx)
    assert len(ds.labels) == 70_000 and np.array_equal(np.sort(everything), np.arange(70_000))
    assert min(len(t) + len(s) for t, s in zip(part.train_idx, part.test_idx, strict=True)) >= 400
    summary = partition_summary(ds, part)
    assert summary["total"] == 70_000
    assert sum(c["train"] + c["test"] for c in summary["clients"]) == 70_000
