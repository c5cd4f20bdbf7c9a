"""Peer networks of the paper's Table 1 that work on the bicubic-upsampled input. Architecture only.

Both take ``lr`` (B, 3, 24, 24), upsample it bicubically to 192² inside the network (as their papers
feed the interpolated image) and return ``{"hr": (B, 3, 192, 192)}``: one output, at x8, in the same
vocabulary as the cascade's ``hr`` branch, so training, metrics, checkpoints, evaluation and export
take them unchanged. ``deploy()`` gives the lr -> hr tensor module that export and ``facesr sr`` use.

* **SRCNN** (Dong et al., TPAMI 2016, the 9-1-5 network): conv 9×9 (64) + ReLU, conv 1×1 (32) + ReLU,
  conv 5×5 (3); it predicts the image itself. "Same" padding, so the whole 192² is predicted (the paper
  trains on valid-padded crops and loses a 6-px border).
* **VDSR** (Kim et al., CVPR 2016): 20 conv 3×3 layers of 64 filters with ReLU between them, the last
  predicting the residual that is added to the interpolated input (the global residual).

SRGAN (Ledig et al., CVPR 2017) works on the lr itself: its generator **SRResNet** (conv 9×9 + PReLU, B
residual blocks conv-BN-PReLU-conv-BN, conv-BN and a skip over them, then one conv + pixel shuffle ×2 + PReLU
per factor of 2, conv 9×9) returns ``{"hr"}`` like the others; its **Discriminator** (conv + LeakyReLU,
then conv-BN-LeakyReLU blocks doubling the width every second block and halving the size in between, dense
+ LeakyReLU, dense to one logit) is the second network the adversarial loss trains beside it. Ledig's two
dense layers sit on the flattened 6×6 map of 96² crops; at 192² that would be 12×12×512 inputs (75M weights
in the first dense layer), so the map is averaged to 1×1 first, as later SRGAN code does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..resample import upsample_bicubic
from ..vocab import SIZES


def interpolated(lr: torch.Tensor) -> torch.Tensor:
    """lr (B, 3, 24, 24) -> bicubic (B, 3, 192, 192): the input both papers start from."""
    return upsample_bicubic(lr, SIZES["hr"])  # F.interpolate's bicubic, as matmuls (facesr/resample.py)


@dataclass(frozen=True)
class SRCNNConfig:
    widths: tuple[int, int] = (64, 32)  # filters of the first two layers (the paper's 64/32)
    kernels: tuple[int, int, int] = (9, 1, 5)  # the paper's 9-1-5 network


@dataclass(frozen=True)
class VDSRConfig:
    depth: int = 20  # conv layers, the first and last included (the paper's 20)
    width: int = 64  # filters of every hidden layer (the paper's 64)


@dataclass(frozen=True)
class SRResNetConfig:
    blocks: int = 16  # residual blocks (Ledig's B = 16)
    width: int = 64  # filters of every layer before the output conv (Ledig's 64)


@dataclass(frozen=True)
class DiscriminatorConfig:
    width: int = 64  # filters of the first conv; doubled every second block up to 8x (Ledig's 64 ... 512)
    blocks: int = 7  # conv-BN-LeakyReLU blocks after the first conv, strides 2, 1, 2, 1, ... (Ledig's 7)
    dense: int = 1024  # units of the hidden dense layer (Ledig's 1024)


class HROnly(nn.Module):
    """The test-time network of a single-output peer: lr -> hr tensor (shares weights with the peer)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        return self.net.upscale(lr)


class SRCNN(nn.Module):
    """lr (B, 3, 24, 24) -> {"hr": (B, 3, 192, 192)}: three convolutions on the bicubic-upsampled image."""

    def __init__(self, cfg: SRCNNConfig = SRCNNConfig()):
        super().__init__()
        self.cfg = cfg
        (c1, c2), (k1, k2, k3) = cfg.widths, cfg.kernels
        self.body = nn.Sequential(
            nn.Conv2d(3, c1, k1, padding=k1 // 2), nn.ReLU(inplace=True),
            nn.Conv2d(c1, c2, k2, padding=k2 // 2), nn.ReLU(inplace=True),
            nn.Conv2d(c2, 3, k3, padding=k3 // 2),
        )

    def upscale(self, lr: torch.Tensor) -> torch.Tensor:
        return self.body(interpolated(lr))  # (B, 3, 192, 192)

    def forward(self, lr: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"hr": self.upscale(lr)}

    def deploy(self) -> HROnly:
        return HROnly(self)


class VDSR(nn.Module):
    """lr (B, 3, 24, 24) -> {"hr": (B, 3, 192, 192)}: bicubic + a 20-layer residual."""

    def __init__(self, cfg: VDSRConfig = VDSRConfig()):
        super().__init__()
        if cfg.depth < 2:
            raise ValueError(f"VDSRConfig.depth: at least 2 layers, got {cfg.depth}")
        self.cfg = cfg
        layers: list[nn.Module] = [nn.Conv2d(3, cfg.width, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(cfg.depth - 2):
            layers += [nn.Conv2d(cfg.width, cfg.width, 3, padding=1), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(cfg.width, 3, 3, padding=1))
        self.body = nn.Sequential(*layers)
        for m in self.body:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")  # the paper's (He et al.) initialisation
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.body[-1].weight)  # the residual starts at zero: training starts from bicubic

    def upscale(self, lr: torch.Tensor) -> torch.Tensor:
        up = interpolated(lr)  # (B, 3, 192, 192)
        return up + self.body(up)

    def forward(self, lr: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"hr": self.upscale(lr)}

    def deploy(self) -> HROnly:
        return HROnly(self)


class _ResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.PReLU(width),
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class SRResNet(nn.Module):
    """lr (B, 3, 24, 24) -> {"hr": (B, 3, 192, 192)}: SRGAN's generator, on the lr (no interpolated input)."""

    def __init__(self, cfg: SRResNetConfig = SRResNetConfig()):
        super().__init__()
        if cfg.blocks < 1:
            raise ValueError(f"SRResNetConfig.blocks: at least 1, got {cfg.blocks}")
        self.cfg = cfg
        w = cfg.width
        self.head = nn.Sequential(nn.Conv2d(3, w, 9, padding=4), nn.PReLU(w))
        self.blocks = nn.Sequential(*[_ResBlock(w) for _ in range(cfg.blocks)])
        self.fuse = nn.Sequential(nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w))
        ups: list[nn.Module] = []
        for _ in range(3):  # 2^3 = 8x
            ups += [nn.Conv2d(w, 4 * w, 3, padding=1), nn.PixelShuffle(2), nn.PReLU(w)]
        self.up = nn.Sequential(*ups)
        self.tail = nn.Conv2d(w, 3, 9, padding=4)

    def upscale(self, lr: torch.Tensor) -> torch.Tensor:
        x = self.head(lr)
        x = x + self.fuse(self.blocks(x))  # the skip over all residual blocks
        return self.tail(self.up(x))  # (B, 3, 192, 192)

    def forward(self, lr: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"hr": self.upscale(lr)}

    def deploy(self) -> HROnly:
        return HROnly(self)


class Discriminator(nn.Module):
    """SRGAN's discriminator: hr-size images (B, 3, S, S) in [0, 1] -> logits (B,) of "a real face"."""

    def __init__(self, cfg: DiscriminatorConfig = DiscriminatorConfig()):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        layers: list[nn.Module] = [nn.Conv2d(3, w, 3, padding=1), nn.LeakyReLU(0.2, inplace=True)]
        c = w
        for i in range(cfg.blocks):
            out = min(w * 2 ** ((i + 1) // 2), 8 * w)  # 64, 128, 128, 256, 256, 512, 512
            layers += [nn.Conv2d(c, out, 3, stride=2 if i % 2 == 0 else 1, padding=1), nn.BatchNorm2d(out),
                       nn.LeakyReLU(0.2, inplace=True)]
            c = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, cfg.dense),
                                  nn.LeakyReLU(0.2, inplace=True), nn.Linear(cfg.dense, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(2 * x - 1)).squeeze(1)  # Ledig scales images to [-1, 1]
