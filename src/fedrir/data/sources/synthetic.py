"""A procedural dataset with label skew and feature shift, for tests and quick checks offline."""

from __future__ import annotations

import numpy as np

from fedrir.config import DataConfig
from fedrir.data.sources.common import pooled, to_uint8
from fedrir.data.types import Dataset

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


def load_synthetic(cfg: DataConfig) -> Dataset:
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
            images.append(to_uint8(contrast * (noisy - 0.5) + 0.5 + offset + texture))
            labels.append(np.full(n, ci))
            domains.append(np.full(n, di))
    parts = [(np.concatenate(images)[:, None], np.concatenate(labels))]
    names = tuple(name for name, _, _ in SYNTHETIC_DOMAINS)
    return pooled(
        "synthetic", parts, SYNTHETIC_CLASSES, "synthetic", np.concatenate(domains), names
    )
