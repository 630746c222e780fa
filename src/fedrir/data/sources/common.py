"""What every dataset source shares: where files are looked for, and how parts become a Dataset.

Files are looked for under the data root (``data_dir``, or ``~/.cache/fedrir/data`` when empty),
in ``<root>/<name>`` first, then in the root itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from fedrir.config import DataConfig
from fedrir.data.types import Dataset
from fedrir.errors import DataError

U8 = npt.NDArray[np.uint8]
Array = npt.NDArray[Any]

CACHE_ROOT = Path("~/.cache/fedrir")
DEFAULT_ROOT = CACHE_ROOT / "data"


def data_root(cfg: DataConfig) -> Path:
    """Where local dataset copies live and downloads go."""
    return Path(cfg.data_dir or DEFAULT_ROOT).expanduser()


def candidates(cfg: DataConfig, *subdirs: str) -> list[Path]:
    """The folders a dataset may sit in: ``<root>/<subdir>`` for each subdir, then ``<root>``."""
    root = data_root(cfg)
    return [root / s for s in subdirs] + [root]


def find_dir(cfg: DataConfig, subdir: str, name: str) -> Path | None:
    """The folder ``name`` under ``<root>/<subdir>`` or ``<root>``, if either holds it."""
    return next((c / name for c in candidates(cfg, subdir) if (c / name).is_dir()), None)


def to_uint8(unit: Array) -> U8:
    """Pixel values on a 0..1 scale as uint8 0..255, rounded, out-of-range values clipped."""
    return np.clip(np.rint(unit * 255), 0, 255).astype(np.uint8)


def gray_split(x: Array, y: Array, source: str) -> tuple[U8, Array]:
    """Check one split of a 10-class grayscale dataset and give its images a channel axis."""
    if x.dtype != np.uint8 or x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise DataError(
            f"{source}: expected uint8 images [N, H, W] and N labels, got {x.dtype} {x.shape} "
            f"images and {y.shape} labels; the files are mixed up or not this dataset"
        )
    return x[:, None], y


def pooled(
    name: str,
    parts: Sequence[tuple[U8, Array]],
    num_classes: int,
    source: str,
    domains: Array | None = None,
    domain_names: tuple[str, ...] = (),
    test_mask: Array | None = None,
) -> Dataset:
    """Merge (images, labels) parts in order into a Dataset, checking the labels fit."""
    images = np.concatenate([x for x, _ in parts])
    labels = np.concatenate([y for _, y in parts]).astype(np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"{source} holds labels outside 0..{num_classes - 1} "
            f"(found {labels.min()}..{labels.max()}); the files are corrupt or not {name}"
        )
    return Dataset(
        name,
        torch.from_numpy(images),
        torch.from_numpy(labels),
        num_classes,
        domains=None if domains is None else torch.from_numpy(domains.astype(np.int64)),
        domain_names=domain_names,
        test_mask=None if test_mask is None else torch.from_numpy(test_mask.astype(np.bool_)),
    )
