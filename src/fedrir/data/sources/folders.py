"""Image-folder datasets with one folder per domain (Office-Caltech-10, DomainNet).

Their domains are the natural feature shift the ``natural`` partition splits along: every image
keeps the index of the domain folder it came from. Two preprocessings (``folder_preprocessing``):
``resize`` (PFLlib's: bilinear resize to 64×64; pixels later normalised to [−1, 1]) and ``authors``
(the FedRIR code's: a RandomResizedCrop to 64×64 of scale 0.75–1 and aspect ratio 3/4–4/3, then a
horizontal flip with probability 1/2, drawn once per image when the data is made, so fixed for
every run; pixels later kept in [0, 1]). The draws come from a generator seeded by the image's
index in the dataset, so the same folder always gives the same images.
"""

from __future__ import annotations

import dataclasses
import logging
import math
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
CROP_SCALE, CROP_RATIO = (0.75, 1.0), (3 / 4, 4 / 3)
"""The authors' RandomResizedCrop: share of the area kept, and aspect ratios (torchvision's)."""
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


def crop_box(width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A random-resized-crop box (left, top, right, bottom) as torchvision draws it: up to ten
    tries at a random area share and log-uniform aspect ratio, else the central crop."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*CROP_SCALE)
        ratio = math.exp(rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    ratio = width / height
    if ratio < CROP_RATIO[0]:
        w, h = width, round(width / CROP_RATIO[0])
    elif ratio > CROP_RATIO[1]:
        w, h = round(height * CROP_RATIO[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def _read_image(path: Path, index: int | None = None) -> U8:
    """One image as uint8 ``[3, 64, 64]``: RGB, bilinear resize (as PFLlib's preprocessing); with
    an ``index``, the authors' crop and flip drawn from a generator seeded by it."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
            box = None
            if index is not None:
                rng = np.random.default_rng(index)
                box = crop_box(rgb.width, rgb.height, rng)
            size = (IMAGE_SIZE, IMAGE_SIZE)
            rgb = rgb.resize(size, Image.Resampling.BILINEAR, box=box)
            if index is not None and rng.random() < 0.5:
                rgb = rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
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
    authors = cfg.folder_preprocessing == "authors"
    indices = range(len(paths)) if authors else [None] * len(paths)
    with ThreadPoolExecutor() as pool:  # decoding releases the GIL
        for i, img in enumerate(pool.map(_read_image, paths, indices)):
            images[i] = img
    parts = [(images, np.asarray(labels))]
    ds = pooled(t.name, parts, len(t.classes), str(root), np.asarray(domain_idx), tuple(domains))
    return dataclasses.replace(ds, unit_pixels=authors)


def tree_available(t: FolderTree, cfg: DataConfig) -> bool:
    return _tree_root(t, cfg) is not None
