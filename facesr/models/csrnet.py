"""The cascaded SR network of C-SRIP (paper Sec. 2.1, Fig. 2). Architecture only.

Three SR modules each upscale 2×. A module is a sub-pixel convolution
(conv -> PixelShuffle(2) -> activation) followed by residual blocks of two
(conv, BN, activation) sub-blocks with a post-activation element-wise sum.
After each module a branch of large-filter convolutions turns its features into
the image at that scale (48², 96², 192²). Only the last branch is needed at test
time; ``SRNet.deploy()`` drops the others.

Depth (how we count "53 layers"): convolution layers on the path from the LR
input to the 8× output, BN and activations not counted:
3 modules × (1 sub-pixel conv + 8 blocks × 2 convs) = 51, plus the 2 convs of
the last branch = 53.

Upscaling comes first in each module so that the first module takes the RGB
input directly (no extra stem) and every module refines at its output scale.
Widths halve as resolution doubles (128, 64, 32) so each module costs about the
same FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..resample import upsample_bicubic
from ..vocab import TARGETS


@dataclass(frozen=True)
class SRNetConfig:
    widths: tuple[int, int, int] = (128, 64, 32)  # channels of the 2×, 4×, 8× modules; halve as pixels quadruple
    blocks: int = 8  # residual blocks per module; 8 gives the paper's 53-layer depth
    branch_kernels: tuple[int, int] = (9, 5)  # the branches' "large-filter" convs (SRCNN-like 9 then 5)
    act: str = "relu"  # activation in blocks and upsamplers: relu | prelu | silu
    # Between the branch convs: no BN there, so a ReLU can die, and a dead one cuts the image
    # branch off for good (seen: every hidden ReLU of the tiny demo's three branches dead after
    # one epoch at the paper's lr, the output frozen at bicubic). PReLU keeps a gradient.
    branch_act: str = "prelu"
    image_skip: bool = True  # branches predict a correction to the bicubic upsampling of lr: training starts at the baseline
    # A detail gate (``DetailGate``): each face's corrections to bicubic scaled by a strength in [0, 1] that a small
    # CNN reads off its lr. Trained after the cascade (training's stage 3), never by stage 2; needs image_skip.
    gate: bool = False


def _act(name: str, channels: int) -> nn.Module:
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "prelu":
        return nn.PReLU(channels)
    if name == "silu":
        return nn.SiLU(inplace=True)
    raise ValueError(f"SRNetConfig.act: unknown activation {name!r} (relu, prelu, silu)")


class ResidualBlock(nn.Module):
    """x + act(bn(conv(act(bn(conv(x))))))  — post-activation sum, as in the paper."""

    def __init__(self, c: int, act: str):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1, bias=False),
            nn.BatchNorm2d(c),
            _act(act, c),
            nn.Conv2d(c, c, 3, padding=1, bias=False),
            nn.BatchNorm2d(c),
            _act(act, c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return y.add_(x) if _inference() else x + y


class SRModule(nn.Module):
    """2× upscaling by sub-pixel convolution, then residual refinement. (B, Cin, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, c_in: int, c: int, blocks: int, act: str):
        super().__init__()
        self.up = nn.Sequential(nn.Conv2d(c_in, 4 * c, 3, padding=1), nn.PixelShuffle(2), _act(act, c))
        self.blocks = nn.Sequential(*[ResidualBlock(c, act) for _ in range(blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.up(x))


class Branch(nn.Module):
    """Large-filter convolutions from features to an RGB image at the module's scale."""

    def __init__(self, c: int, kernels: tuple[int, int], act: str):
        super().__init__()
        k1, k2 = kernels
        mid = max(c // 2, 3)
        self.body = nn.Sequential(
            nn.Conv2d(c, mid, k1, padding=k1 // 2),
            _act(act, mid),
            nn.Conv2d(mid, 3, k2, padding=k2 // 2),
        )
        nn.init.zeros_(self.body[-1].weight)  # start from the skip image (bicubic upsampling)
        nn.init.zeros_(self.body[-1].bias)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        return self.body(feat)


class DetailGate(nn.Module):
    """lr (B, 3, 24, 24) in [0, 1] -> (B,) how strongly to apply the cascade's corrections to this face (unclamped:
    ``SRNet`` clamps it to [0, 1]). Three convolutions, 14k weights: it reads what kind of input it was given
    (blurred, compressed, noisy), which is what decides how much of a correction drawn from 24² is right."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 1),
        )

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        return self.body(lr - 0.5).squeeze(1)


def _strength(gate: nn.Module | None, lr: torch.Tensor) -> torch.Tensor | None:
    """The gate's strength per face as (B, 1, 1, 1) in [0, 1], or None without a gate."""
    return None if gate is None else gate(lr).clamp(0, 1).view(-1, 1, 1, 1)


def _skip(lr: torch.Tensor, size: int) -> torch.Tensor:
    return upsample_bicubic(lr, size)  # F.interpolate's bicubic, as matmuls (facesr/resample.py)


def _inference() -> bool:
    """No autograd graph is being built: sums may be taken in place, into a tensor no one else holds (the same
    numbers without a fresh allocation; on 2 cores a (32, 8, 192, 192) add 2 ms in place against 5-12 ms)."""
    return not torch.is_grad_enabled()


def _with_skip(img: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
    """img + the bicubic upsampling of lr; without autograd summed into the (contiguous, fp32) skip image."""
    skip = _skip(lr, img.shape[-1])
    return skip.add_(img) if _inference() and skip.dtype == torch.promote_types(skip.dtype, img.dtype) else img + skip


class SRNet(nn.Module):
    """lr (B, 3, 24, 24) -> {"x2": (B,3,48,48), "x4": (B,3,96,96), "hr": (B,3,192,192)}."""

    def __init__(self, cfg: SRNetConfig = SRNetConfig()):
        super().__init__()
        self.cfg = cfg
        c_in = (3,) + tuple(cfg.widths[:-1])
        self.stages = nn.ModuleList(SRModule(i, o, cfg.blocks, cfg.act) for i, o in zip(c_in, cfg.widths))
        self.branches = nn.ModuleList(Branch(c, cfg.branch_kernels, cfg.branch_act) for c in cfg.widths)
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m not in (b.body[-1] for b in self.branches):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        if cfg.gate and not cfg.image_skip:
            raise ValueError("SRNetConfig.gate scales the corrections to bicubic, which needs image_skip")
        self.gate = DetailGate() if cfg.gate else None  # PyTorch's default init: trained from scratch in stage 3

    def forward(self, lr: torch.Tensor) -> dict[str, torch.Tensor]:
        out, feat = {}, lr
        d = _strength(self.gate, lr)
        for key, stage, branch in zip(TARGETS, self.stages, self.branches):
            feat = stage(feat)  # (B, C_i, 24·2^i, 24·2^i)
            img = branch(feat)  # (B, 3, 24·2^i, 24·2^i)
            img = img if d is None else img * d.to(img.dtype)
            out[key] = _with_skip(img, lr) if self.cfg.image_skip else img
        return out

    def deploy(self) -> "SRNetDeploy":
        """The test-time network: the 8× path only; shares weights with this module."""
        return SRNetDeploy(self)


class SRNetDeploy(nn.Module):
    """lr (B, 3, 24, 24) -> hr (B, 3, 192, 192); the intermediate branches removed."""

    def __init__(self, net: SRNet):
        super().__init__()
        self.image_skip = net.cfg.image_skip
        self.stages = net.stages
        self.head = net.branches[-1]
        self.gate = net.gate

    def correction(self, lr: torch.Tensor) -> torch.Tensor:
        """What the 8× branch draws: with image_skip, the correction to bicubic (before a gate scales it)."""
        feat = lr
        for stage in self.stages:
            feat = stage(feat)
        return self.head(feat)

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        d = _strength(self.gate, lr)
        img = self.correction(lr)
        img = img if d is None else img * d.to(img.dtype)
        return _with_skip(img, lr) if self.image_skip else img


def conv_depth(net: SRNet) -> int:
    """Convolutions on the LR -> 8× path (see module docstring for the counting rule)."""
    deploy = net.deploy()
    gate = set(deploy.gate.modules()) if deploy.gate is not None else set()  # beside the path, not on it
    return sum(isinstance(m, nn.Conv2d) and m not in gate for m in deploy.modules())
