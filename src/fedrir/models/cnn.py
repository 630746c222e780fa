"""Small convolutional modules shared by FedRIR and the baselines; sizes follow the input shape."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

InputShape = tuple[int, int, int]  # (channels, height, width)

MIN_SIDE = 16
"""The smallest height and width the trunk takes: two 5×5 convolutions, each followed by a 2×2
pooling, leave a 1×1 map at 16×16."""


def conv_trunk(in_channels: int) -> nn.Sequential:
    """The reference trunk: Conv(in,32,5)–BN–ReLU–MaxPool2–Conv(32,64,5)–BN–ReLU–MaxPool2–flat."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, kernel_size=5),
        nn.BatchNorm2d(32),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, kernel_size=5),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Flatten(),  # flattens with reshape semantics, so channels-last inputs work
    )


def output_size(module: nn.Module, input_shape: InputShape) -> int:
    """Width of ``module``'s flat output for one input of ``input_shape`` (1024 for 1×28×28)."""
    was_training = module.training
    module.eval()
    with torch.no_grad():
        out = module(torch.zeros(1, *input_shape))
    module.train(was_training)
    return int(out.shape[1])


class Encoder(nn.Module):
    """The trunk followed by a linear layer: ``[B, C, H, W] → [B, out_dim]``.

    FedRIR's GFE (``out_dim = d``) and CSFE (``out_dim = 2d``: mean and log-variance), and the
    baselines' shared backbone.
    """

    def __init__(self, input_shape: InputShape, out_dim: int) -> None:
        super().__init__()
        self.trunk = conv_trunk(input_shape[0])
        self.fc = nn.Linear(output_size(self.trunk, input_shape), out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.trunk(x))


class Generator(nn.Module):
    """VAE decoder, as the reference: Linear → reshape to 64×b×b → ConvTranspose(64, 32, 5,
    stride 2) → ReLU → ConvTranspose(32, C, 5, stride 2), both with output padding 1; no
    normalisation and no output squashing (the MSE target is the normalised image).

    Each transposed conv maps s to 2s + 4, so b = (H − 12) / 4 gives the image size exactly (4 for
    28×28, 5 for 32×32, 13 for 64×64); other sizes are resized bilinearly at the end.
    """

    def __init__(self, input_shape: InputShape, latent_dim: int) -> None:
        super().__init__()
        channels, height, width = input_shape
        self.image_size = (height, width)
        self.base = (max(1, -(-(height - 12) // 4)), max(1, -(-(width - 12) // 4)))
        self.fc = nn.Linear(latent_dim, 64 * self.base[0] * self.base[1])
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(64, 32, kernel_size=5, stride=2, output_padding=1),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(32, channels, kernel_size=5, stride=2, output_padding=1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.deconv(self.fc(z).reshape(len(z), 64, *self.base))
        if out.shape[-2:] != self.image_size:
            out = F.interpolate(out, size=self.image_size, mode="bilinear", align_corners=False)
        return out


class GaussianMLP(nn.Module):
    """q(y | x) = N(mu(x), exp(logvar(x))) with two 2-layer MLPs; logvar squashed by tanh (CLUB).

    ``dim // 4`` hidden units: 128 for d = 512, as the reference's CLUB(d, d, 256).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        hidden = max(1, dim // 4)
        self.mu = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        self.logvar = nn.Sequential(
            nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim), nn.Tanh()
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mu(x), self.logvar(x)
