"""idx files, the format MNIST and Fashion-MNIST are published in, and Fashion-MNIST itself.

Fashion-MNIST comes only as idx files: the user's copy, or Debian's ``dataset-fashion-mnist``.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedrir.config import DataConfig
from fedrir.data.sources.common import Array, candidates, data_root, gray_split, pooled
from fedrir.data.types import Dataset
from fedrir.errors import DataError

_IDX_DTYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def read_idx(path: Path) -> Array:
    """Parse one idx file (the MNIST format), gzipped or not, into a native-endian array."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(
            f"cannot read {path}: {e}; the file is corrupt or truncated, fetch it again"
        ) from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise DataError(f"{path} is not an idx file (bad magic number); expected MNIST-format data")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated (its header is cut short); fetch it again")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected, held = math.prod(dims) * dtype.itemsize, len(raw) - header
    if held != expected:
        raise DataError(
            f"{path} is truncated or corrupt: its header announces shape {dims} ({expected} bytes) "
            f"but it holds {held} bytes of data; fetch it again"
        )
    return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _idx_files(folder: Path) -> list[Path] | None:
    """The four idx files (plain or .gz) in ``folder``, or None unless all four are there."""
    found = []
    for stem in IDX_FILES:
        path = next((p for p in (folder / stem, folder / f"{stem}.gz") if p.is_file()), None)
        if path is None:
            return None
        found.append(path)
    return found


def find_idx(folders: Sequence[Path]) -> list[Path] | None:
    """The four idx files from the first of ``folders`` that holds all of them."""
    return next((files for f in folders if (files := _idx_files(f)) is not None), None)


def load_idx(name: str, files: Sequence[Path]) -> Dataset:
    """The pooled 10-class dataset in the four ``files`` (train images, labels, test …)."""
    train_x, train_y, test_x, test_y = (read_idx(p) for p in files)
    parts = [
        gray_split(train_x, train_y, f"{files[0]} / {files[1]}"),
        gray_split(test_x, test_y, f"{files[2]} / {files[3]}"),
    ]
    if train_x.shape[1:] != test_x.shape[1:]:
        raise DataError(f"{files[0]} and {files[2]} hold images of different sizes")
    return pooled(name, parts, 10, str(files[0].parent))


FMNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's ``dataset-fashion-mnist`` package installs the idx files."""


def _fmnist_dirs(cfg: DataConfig) -> list[Path]:
    return [*candidates(cfg, "fmnist", "fashion-mnist"), FMNIST_SYSTEM_DIR]


def load_fmnist(cfg: DataConfig) -> Dataset:
    files = find_idx(_fmnist_dirs(cfg))
    if files is None:
        raise DataError(
            f"Fashion-MNIST not found under {data_root(cfg)} or {FMNIST_SYSTEM_DIR}: "
            "`apt-get install dataset-fashion-mnist`, or put the four idx(.gz) files in "
            f"{data_root(cfg) / 'fmnist'}"
        )
    return load_idx("fmnist", files)


def fmnist_available(cfg: DataConfig) -> bool:
    return find_idx(_fmnist_dirs(cfg)) is not None
