"""CIFAR-10 and CIFAR-100 from the official archives: the binary version, or (opt-in) python.

The python version is pickled, and unpickling runs code from the file, so it loads only with
``allow_pickle``; ``--download`` fetches the binary version.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedrir.config import DataConfig
from fedrir.data.sources.common import U8, Array, data_root, find_dir, pooled
from fedrir.data.types import Dataset
from fedrir.errors import DataError

_CIFAR_PIXELS = 3 * 32 * 32


@dataclass(frozen=True)
class Cifar:
    """Where one CIFAR variant's binary and python versions keep their splits."""

    name: str
    title: str
    num_classes: int
    label_bytes: int
    """Bytes before each binary record's pixels; the last one is the (fine) label."""
    bin_dir: str
    bin_files: tuple[str, ...]
    py_dir: str
    py_files: tuple[str, ...]
    py_labels: str


CIFAR10 = Cifar(
    "cifar10",
    "CIFAR-10",
    10,
    1,
    "cifar-10-batches-bin",
    (*(f"data_batch_{i}.bin" for i in range(1, 6)), "test_batch.bin"),
    "cifar-10-batches-py",
    (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"),
    "labels",
)
CIFAR100 = Cifar(
    "cifar100",
    "CIFAR-100",
    100,
    2,
    "cifar-100-binary",
    ("train.bin", "test.bin"),
    "cifar-100-python",
    ("train", "test"),
    "fine_labels",
)


def _read_cifar_bin(path: Path, c: Cifar) -> tuple[U8, Array]:
    record = c.label_bytes + _CIFAR_PIXELS
    try:
        raw = np.fromfile(path, np.uint8)
    except OSError as e:
        raise DataError(
            f"cannot read {path}: {e.strerror or e}; {c.title} is incomplete, fetch it again"
        ) from None
    if raw.size == 0 or raw.size % record:
        raise DataError(
            f"{path} is truncated or not a {c.title} binary batch ({raw.size} bytes is not a "
            f"whole number of {record}-byte records); fetch it again"
        )
    rows = raw.reshape(-1, record)
    return rows[:, c.label_bytes :].reshape(-1, 3, 32, 32), rows[:, c.label_bytes - 1]


def _read_cifar_py(path: Path, c: Cifar) -> tuple[U8, Array]:
    try:
        with path.open("rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data, labels = (
            np.asarray(batch[k.encode()] if k.encode() in batch else batch[k])
            for k in ("data", c.py_labels)
        )
    except Exception as e:  # unpickling arbitrary bytes can fail in any way
        raise DataError(
            f"cannot read {path} as a {c.title} python batch ({type(e).__name__}: {e}); "
            "fetch it again, or use the binary version"
        ) from None
    if data.dtype != np.uint8 or data.shape != (len(labels), _CIFAR_PIXELS) or labels.ndim != 1:
        raise DataError(
            f"{path}: expected uint8 data [N, {_CIFAR_PIXELS}] and N labels, got {data.dtype} "
            f"{data.shape} and {labels.shape}; the file is corrupt or not {c.title}"
        )
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar(c: Cifar, cfg: DataConfig) -> Dataset:
    folder = find_dir(cfg, c.name, c.bin_dir)
    if folder is not None:
        files, read = [folder / f for f in c.bin_files], _read_cifar_bin
    else:
        folder = find_dir(cfg, c.name, c.py_dir)
        if folder is None:
            raise DataError(
                f"{c.title} not found under {data_root(cfg)}: put {c.bin_dir}/ there, "
                "or pass --download"
            )
        if not cfg.allow_pickle:
            raise DataError(
                f"{folder} is the python version of {c.title}, which needs unpickling; pass "
                "--allow-pickle if you trust these files, or use the binary version (--download)"
            )
        files, read = [folder / f for f in c.py_files], _read_cifar_py
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise DataError(
            f"{folder} is incomplete (missing {', '.join(missing)}); fetch {c.title} again"
        )
    return pooled(c.name, [read(f, c) for f in files], c.num_classes, str(folder))


def cifar_available(c: Cifar, cfg: DataConfig) -> bool:
    return any(find_dir(cfg, c.name, d) is not None for d in (c.bin_dir, c.py_dir))
