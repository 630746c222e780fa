"""The two shapes data takes: a pooled dataset, and the per-client split the engine trains on."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Dataset:
    """A dataset with its official train and test sets merged into one pool (the PFLlib protocol).

    ``images`` are uint8, ``[N, C, H, W]``; ``labels`` int64 ``[N]``. ``domains`` (int64 ``[N]``)
    is set for natural feature-shift datasets: one client per domain under ``natural``.
    """

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    domains: torch.Tensor | None = None
    domain_names: tuple[str, ...] = ()
    test_mask: torch.Tensor | None = None
    """For data that arrives already split per client (a PFLlib import): True where a sample was
    in its client's test set. The ``natural`` partition keeps that split instead of drawing one."""

    def __post_init__(self) -> None:
        assert self.images.dtype == torch.uint8 and self.images.dim() == 4, self.images.shape
        assert self.labels.dtype == torch.int64 and self.labels.shape == (len(self.images),)
        assert self.domains is None or self.domains.shape == self.labels.shape
        assert self.test_mask is None or (
            self.domains is not None and self.test_mask.shape == self.labels.shape
        )

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return (int(c), int(h), int(w))


@dataclass(frozen=True)
class ClientData:
    """One client's local data: normalised float32 images ``[n, C, H, W]`` and int64 labels.

    ``eval_*`` is what the client is evaluated on: its local test set, or, when the run asked for
    one (``val_ratio`` > 0), a validation set carved from its training data.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    eval_x: torch.Tensor
    eval_y: torch.Tensor

    @property
    def num_train(self) -> int:
        return len(self.train_y)

    @property
    def num_eval(self) -> int:
        return len(self.eval_y)

    def digest(self) -> str:
        """A digest of the client's data (shapes, dtypes and bytes): what a checkpoint records so
        that a resume on other data (files replaced under ``data_dir``) is refused."""
        h = hashlib.blake2b(digest_size=16)
        for t in (self.train_x, self.train_y, self.eval_x, self.eval_y):
            h.update(f"{tuple(t.shape)}{t.dtype};".encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def to(self, device: torch.device) -> ClientData:
        return ClientData(
            *(t.to(device) for t in (self.train_x, self.train_y, self.eval_x, self.eval_y))
        )


@dataclass(frozen=True)
class FederatedData:
    """Every client's local data, plus what a model needs to know about the inputs."""

    clients: tuple[ClientData, ...]
    num_classes: int
    input_shape: tuple[int, int, int]

    @property
    def num_clients(self) -> int:
        return len(self.clients)
