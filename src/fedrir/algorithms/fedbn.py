"""FedBN: Li, Jiang, Zhang, Kamp, Dou. "FedBN: Federated Learning on Non-IID Features via Local
Batch Normalization", ICLR 2021.

Everything is shared and averaged except the BatchNorm layers: their affine parameters and running
statistics stay on the client.

New clients: no zero-shot evaluation (the shared model needs a client's BatchNorm layers); the
adaptation trains the BatchNorm affine parameters on the frozen shared model.
"""

from __future__ import annotations

from torch import nn

from fedrir.algorithms.baseline import Baseline

BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def batchnorm_keys(module: nn.Module) -> frozenset[str]:
    """The state-dict keys (parameters and buffers) of every BatchNorm layer in ``module``."""
    layers = tuple(f"{n}." for n, m in module.named_modules() if isinstance(m, BATCHNORM))
    return frozenset(k for k in module.state_dict() if k.startswith(layers))


class FedBN(Baseline):
    """The whole model shared but its BatchNorm layers."""

    name = "fedbn"
    shared = ("body.", "head.")

    def _upload_keys(self) -> frozenset[str]:
        return super()._upload_keys() - batchnorm_keys(self.modules)
