"""scikit-learn's handwritten digits: bundled with a dependency and tiny, for quick runs."""

from __future__ import annotations

from fedrir.config import DataConfig
from fedrir.data.sources.common import pooled, to_uint8
from fedrir.data.types import Dataset


def load_digits(cfg: DataConfig) -> Dataset:
    """scikit-learn's 1797 handwritten digits, pixel values 0..16 scaled to 0..255.

    Each 8×8 pixel is repeated 2×2 (16×16 images): the reference trunk's two 5×5 convolutions and
    poolings need at least 16×16 inputs.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    d = sklearn_digits()
    images = to_uint8(d.images / 16).repeat(2, axis=1).repeat(2, axis=2)
    return pooled("digits", [(images[:, None], d.target)], 10, "scikit-learn digits")
