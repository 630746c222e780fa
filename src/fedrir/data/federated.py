"""From a pooled dataset to every client's local data: partition, local split, cache, normalise.

The PFLlib protocol: pool the official train and test sets, partition the pool across clients,
split each client's share ``train_ratio`` / rest into its local train and test sets (a seeded
shuffle, sizes as sklearn's ``train_test_split`` gives them), and scale pixels to [0, 1] then
normalise with mean 0.5 and std 0.5. A dataset that arrives already split per client (``test_mask``)
keeps its split under the ``natural`` partition.

Partitions (index arrays only) are cached as ``.npz`` files read with ``allow_pickle=False``,
keyed by a hash of every setting that changes them and a fingerprint of the labels; a file that
cannot be read or does not check out is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from fedrir.config import DataConfig
from fedrir.data.datasets import load_dataset
from fedrir.data.partition import IntArray, make_partitioner
from fedrir.data.sources.common import CACHE_ROOT
from fedrir.data.types import ClientData, Dataset, FederatedData
from fedrir.errors import DataError

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
"""Bump when the partition algorithms or the file layout change, so old cache files miss."""

SPLITS = ("train", "test", "val")
# Independent random streams per purpose, so that asking for a validation set leaves the
# train/test split (and so the test set) exactly as it is without one.
_SPLIT_STREAM, _VAL_STREAM = 1, 2


@dataclass(frozen=True)
class Partition:
    """Which pooled samples each client trains, validates and tests on (sorted int64 indices).

    ``val_idx`` is carved from the training share when ``val_ratio > 0`` (else empty arrays); the
    client then evaluates on it instead of its test set. Every pooled sample is in exactly one
    client's train, val or test set.
    """

    train_idx: tuple[IntArray, ...]
    test_idx: tuple[IntArray, ...]
    val_idx: tuple[IntArray, ...]

    def __post_init__(self) -> None:
        assert len(self.train_idx) == len(self.test_idx) == len(self.val_idx)

    @property
    def num_clients(self) -> int:
        return len(self.train_idx)

    @property
    def has_validation(self) -> bool:
        return any(len(v) > 0 for v in self.val_idx)

    def eval_idx(self, client: int) -> IntArray:
        """What ``client`` is evaluated on: its validation set if it has one, else its test set."""
        return self.val_idx[client] if self.has_validation else self.test_idx[client]


def _held_out(n: int, share: float, what: str, client: int) -> int:
    """How many of ``n`` samples a held-out ``share`` takes: ⌈share · n⌉ (sklearn's rounding),
    kept within [1, n − 1] so that both sides are non-empty."""
    if n < 2:
        raise DataError(
            f"client {client} has only {n} sample(s), too few to split off a {what} set; "
            "use fewer clients or a larger fraction of the dataset"
        )
    return min(max(math.ceil(share * n - 1e-9), 1), n - 1)


def split_clients(
    client_idx: list[IntArray],
    train_ratio: float,
    val_ratio: float,
    seed: int,
    test_mask: npt.NDArray[np.bool_] | None = None,
) -> Partition:
    """Split each client's samples into local train / test (and validation) sets.

    With ``test_mask`` the given split is kept; otherwise each client's samples are shuffled and
    the first ⌊train_ratio · n⌋ train, the rest test. ``val_ratio`` of the training set (rounded
    up) becomes the validation set.
    """
    split_rng = np.random.default_rng([seed, _SPLIT_STREAM])
    val_rng = np.random.default_rng([seed, _VAL_STREAM])
    empty = np.empty(0, dtype=np.int64)
    train, test, val = [], [], []
    for i, idx in enumerate(client_idx):
        if test_mask is None:
            shuffled = split_rng.permutation(idx)
            n_test = _held_out(len(idx), 1 - train_ratio, "test", i)
            tr, te = shuffled[: len(idx) - n_test], shuffled[len(idx) - n_test :]
        else:
            tr, te = idx[~test_mask[idx]], idx[test_mask[idx]]
            if len(tr) == 0 or len(te) == 0:
                raise DataError(
                    f"client {i}'s given split has {len(tr)} train and {len(te)} test samples; "
                    "each needs at least one of both (use another partition than natural)"
                )
        va = empty
        if val_ratio > 0:
            shuffled = val_rng.permutation(tr)
            n_val = _held_out(len(tr), val_ratio, "validation", i)
            va, tr = shuffled[:n_val], shuffled[n_val:]
        train.append(np.sort(tr))
        test.append(np.sort(te))
        val.append(np.sort(va))
    return Partition(tuple(train), tuple(test), tuple(val))


def cache_key(cfg: DataConfig, dataset: Dataset, seed: int, batch_size: int) -> str:
    """A hash of every setting that changes the partition, and of the data it is drawn from."""
    labels = hashlib.sha256(dataset.labels.numpy().tobytes())
    for extra in (dataset.domains, dataset.test_mask):
        labels.update(b"-" if extra is None else extra.numpy().tobytes())
    settings = {
        "format": CACHE_FORMAT,
        "dataset": cfg.dataset,
        "fraction": cfg.fraction,
        "partition": cfg.partition,
        "clients": cfg.clients,
        "alpha": cfg.alpha,
        "classes_per_client": cfg.classes_per_client,
        "train_ratio": cfg.train_ratio,
        "min_samples": cfg.min_samples,
        "val_ratio": cfg.val_ratio,
        "seed": seed,
        "batch_size": batch_size,
        "data": {
            "n": len(dataset.labels),
            "shape": list(dataset.images.shape),
            "num_classes": dataset.num_classes,
            "labels": labels.hexdigest(),
        },
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def cache_path(cfg: DataConfig, key: str) -> Path:
    root = (Path(cfg.cache_dir) if cfg.cache_dir else CACHE_ROOT).expanduser()
    return root / "partitions" / f"{cfg.dataset}-{cfg.partition}-{cfg.clients}-{key[:24]}.npz"


def _write_cache(path: Path, key: str, partition: Partition) -> None:
    """Write atomically (temp file, then rename) so that a crash never leaves half a file."""
    arrays: dict[str, npt.NDArray[np.generic]] = {"key": np.array(key)}
    for name in SPLITS:
        parts = getattr(partition, f"{name}_idx")
        arrays[name] = np.concatenate(parts).astype(np.int64)
        arrays[f"{name}_sizes"] = np.array([len(p) for p in parts], dtype=np.int64)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]
        os.replace(tmp, path)
    except OSError as e:
        log.warning("could not cache the partition at %s (%s); continuing without", path, e)
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _read_cache(path: Path, key: str, n: int, num_clients: int, val: bool) -> Partition | None:
    """The cached partition, or None when there is none or it is unreadable or inconsistent."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            if str(f["key"]) != key:
                raise ValueError("key mismatch")
            splits = {}
            for name in SPLITS:
                flat, sizes = f[name].astype(np.int64), f[f"{name}_sizes"].astype(np.int64)
                if sizes.shape != (num_clients,) or sizes.min() < 0 or sizes.sum() != len(flat):
                    raise ValueError(f"bad {name} sizes")
                splits[name] = tuple(np.split(flat, np.cumsum(sizes)[:-1]))
    except (OSError, ValueError, TypeError, KeyError, EOFError, zipfile.BadZipFile) as e:
        log.warning("ignoring unreadable partition cache %s (%s); rebuilding", path, e)
        return None
    partition = Partition(splits["train"], splits["test"], splits["val"])
    everything = np.sort(np.concatenate([np.concatenate(splits[s]) for s in SPLITS]))
    non_empty = all(
        len(partition.train_idx[i])
        and len(partition.test_idx[i])
        and (len(partition.val_idx[i]) or not val)
        for i in range(num_clients)
    )
    ordered = all(np.all(np.diff(p) > 0) for s in SPLITS for p in splits[s])
    if not (non_empty and ordered and np.array_equal(everything, np.arange(n))):
        log.warning("ignoring inconsistent partition cache %s; rebuilding", path)
        return None
    return partition


def make_partition(
    cfg: DataConfig, dataset: Dataset, seed: int, batch_size: int = 100
) -> Partition:
    """Partition ``dataset`` across clients and split each client's share (cached on disk).

    ``batch_size`` is the training batch size: the ``dir`` partition's minimum client size
    depends on it (PFLlib).
    """
    key = cache_key(cfg, dataset, seed, batch_size)
    path = cache_path(cfg, key)
    n = len(dataset.labels)
    cached = _read_cache(path, key, n, cfg.clients, cfg.val_ratio > 0)
    if cached is not None:
        return cached
    partitioner = make_partitioner(cfg, dataset.num_classes, seed, batch_size)
    domains = None if dataset.domains is None else dataset.domains.numpy()
    client_idx = partitioner(dataset.labels.numpy(), domains)
    test_mask = None
    if cfg.partition == "natural" and dataset.test_mask is not None:
        test_mask = dataset.test_mask.numpy().astype(bool)
    partition = split_clients(client_idx, cfg.train_ratio, cfg.val_ratio, seed, test_mask)
    _write_cache(path, key, partition)
    return partition


def _normalise(images: torch.Tensor, unit: bool) -> torch.Tensor:
    """uint8 pixels → float32 in [-1, 1]: scaled to [0, 1], then mean 0.5 and std 0.5 (PFLlib);
    ``unit``: scaled to [0, 1] only."""
    scaled = images.to(torch.float32).div_(255.0)
    return (scaled if unit else scaled.sub_(0.5).div_(0.5)).contiguous()


def federate(dataset: Dataset, partition: Partition) -> FederatedData:
    """Every client's normalised local tensors; its test set is the validation set if any."""
    clients = []
    for i in range(partition.num_clients):
        train = torch.from_numpy(partition.train_idx[i])
        held = torch.from_numpy(partition.eval_idx(i))
        clients.append(
            ClientData(
                train_x=_normalise(dataset.images[train], dataset.unit_pixels),
                train_y=dataset.labels[train].contiguous(),
                eval_x=_normalise(dataset.images[held], dataset.unit_pixels),
                eval_y=dataset.labels[held].contiguous(),
            )
        )
    return FederatedData(tuple(clients), dataset.num_classes, dataset.input_shape)


def build_federated(cfg: DataConfig, seed: int, batch_size: int = 100) -> FederatedData:
    """Load the pooled dataset, partition it (or read the cached partition), build the clients."""
    dataset = load_dataset(cfg, seed)
    return federate(dataset, make_partition(cfg, dataset, seed, batch_size))
