"""A dataset folder written by PFLlib (``train/<i>.npz``, ``test/<i>.npz``), one client per file.

PFLlib pickles its ``.npz`` contents, and unpickling runs code from the file, so these load only
with ``allow_pickle``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from fedrir.config import DataConfig
from fedrir.data.sources.common import U8, Array, pooled, to_uint8
from fedrir.data.types import Dataset
from fedrir.errors import DataError

log = logging.getLogger(__name__)


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


def _read_pfllib(path: Path, allow_pickle: bool) -> tuple[U8, Array]:
    """One client file: ``data`` = {'x': float32 [n, C, H, W] normalised, 'y': int [n]}, a pickled
    dict: read only when the user opted in (``allow_pickle``)."""
    try:
        with np.load(path, allow_pickle=allow_pickle) as npz:
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
    return to_uint8(x * 0.5 + 0.5), y  # PFLlib normalises with Normalize(0.5, 0.5)


def load_pfllib(cfg: DataConfig) -> Dataset:
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
    parts = [_read_pfllib(f, cfg.allow_pickle) for f in train + test]
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
    return pooled("pfllib", parts, num_classes, str(root), clients, names, in_test)


def pfllib_available(cfg: DataConfig) -> bool:
    return _pfllib_root(cfg) is not None
