"""Image-folder datasets with one folder per domain (Office-Caltech-10, DomainNet).

Their domains are the natural feature shift the ``natural`` partition splits along: every image
keeps the index of the domain folder it came from.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedrir.config import DataConfig
from fedrir.data.sources.common import U8, candidates, data_root, pooled
from fedrir.data.types import Dataset
from fedrir.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SIZE = 64
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


@dataclass(frozen=True)
class FolderTree:
    """A ``<root>/<domain>/<class>/<image>`` dataset restricted to the listed classes."""

    name: str
    title: str
    domains: tuple[str, ...]
    classes: tuple[str, ...]


OFFICE_CALTECH10 = FolderTree(
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
DOMAINNET = FolderTree(
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


def _tree_root(t: FolderTree, cfg: DataConfig) -> Path | None:
    return next(
        (c for c in candidates(cfg, t.name) if any((c / d).is_dir() for d in t.domains)), None
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


def load_tree(t: FolderTree, cfg: DataConfig) -> Dataset:
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
    return pooled(t.name, parts, len(t.classes), str(root), np.asarray(domain_idx), tuple(domains))


def tree_available(t: FolderTree, cfg: DataConfig) -> bool:
    return _tree_root(t, cfg) is not None
