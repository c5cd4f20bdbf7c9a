"""Identity priors (paper Sec. 2.2): SqueezeNet 1.1 on high-pass residual images. Architecture only.

Registered in timm's model registry (timm ships no SqueezeNet), so
``timm.create_model("squeezenet1_1_residual", num_classes=K)`` builds one; the
fire modules are torchvision's. Two deliberate departures from SqueezeNet 1.1,
both for residual-image input:

* an input BatchNorm: residual images are small (|Δx| ≈ 0.02) and centred on
  zero, so a learned per-channel standardisation replaces ImageNet mean/std;
* no ReLU on the logits (torchvision applies one before pooling), so
  cross-entropy sees signed logits.

``norm=True`` adds a BatchNorm after every convolution (stem, squeeze and both
expands). Measured on 101 LFW + CelebA identities (x4 residuals, tiny width):
without it the class-balanced priors never left ln(C) in 8 epochs (every
ReLU dead, output constant); with it held-out top-1 reached 5.6x chance.
The paper's SqueezeNet 1.1 has none, so the paper preset keeps ``norm=False``.

``FrozenPrior`` is the one place a prior is frozen for stage 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from timm.models import register_model
from torchvision.models.squeezenet import Fire

# SqueezeNet 1.1 fire modules: (squeeze, expand1x1 = expand3x3); "M" = 3×3/2 max-pool.
_FIRES_1_1 = ["M", (16, 64), (16, 64), "M", (32, 128), (32, 128), "M", (48, 192), (48, 192), (64, 256), (64, 256)]


@dataclass(frozen=True)
class PriorConfig:
    name: str = "squeezenet1_1_residual"  # timm registry name
    width: float = 1.0  # channel multiplier of every fire module (1.0 = SqueezeNet 1.1)
    dropout: float = 0.5  # dropout before the classifier, as in SqueezeNet
    norm: bool = False  # BatchNorm after every conv (trains from scratch where plain SqueezeNet dies); paper: none


def _normed(conv: nn.Conv2d, norm: bool) -> nn.Module:
    return nn.Sequential(conv, nn.BatchNorm2d(conv.out_channels)) if norm else conv


class SqueezeNetResidual(nn.Module):
    """Residual image (B, 3, S, S), any S ≥ 32 -> logits (B, K)."""

    def __init__(self, num_classes: int = 1000, width: float = 1.0, dropout: float = 0.5, in_chans: int = 3,
                 norm: bool = False, **_):
        super().__init__()
        self.num_classes = num_classes
        stem = max(8, int(64 * width))
        layers: list[nn.Module] = [
            nn.BatchNorm2d(in_chans),
            _normed(nn.Conv2d(in_chans, stem, 3, stride=2), norm),
            nn.ReLU(inplace=True),
        ]
        c = stem
        for spec in _FIRES_1_1:
            if spec == "M":
                layers.append(nn.MaxPool2d(3, stride=2, ceil_mode=True))
            else:
                s, e = (max(4, int(v * width)) for v in spec)
                fire = Fire(c, s, e, e)
                if norm:
                    fire.squeeze = _normed(fire.squeeze, norm)
                    fire.expand1x1 = _normed(fire.expand1x1, norm)
                    fire.expand3x3 = _normed(fire.expand3x3, norm)
                layers.append(fire)
                c = 2 * e
        self.features = nn.Sequential(*layers)
        self.num_features = c
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Conv2d(c, num_classes, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.classifier.weight, std=0.01)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)  # (B, C, s, s)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if pre_logits:
            return self.pool(x).flatten(1)  # (B, C)
        return self.pool(self.classifier(self.drop(x))).flatten(1)  # (B, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.classifier = nn.Conv2d(self.num_features, num_classes, 1)


@register_model
def squeezenet1_1_residual(pretrained: bool = False, **kwargs) -> SqueezeNetResidual:
    """SqueezeNet 1.1 for high-pass residual faces (no pretrained weights exist)."""
    if pretrained:
        raise ValueError("squeezenet1_1_residual has no pretrained weights; train stage 1")
    kwargs.pop("pretrained_cfg", None)
    kwargs.pop("pretrained_cfg_overlay", None)
    return SqueezeNetResidual(**kwargs)


class FrozenPrior(nn.Module):
    """A trained prior fixed for stage 2: eval mode that stays eval, no weight gradients.

    Gradients still flow to the input, which is how the identity loss reaches the SR network. ``input`` records
    what it was trained on (``facesr.degrade.prior_view``: ``residual`` or ``image``); callers feed it that.
    """

    def __init__(self, model: nn.Module, input: str = "residual"):
        super().__init__()
        self.input = input
        self.model = model.eval()
        self.model.requires_grad_(False)

    def train(self, mode: bool = True) -> "FrozenPrior":
        return super().train(False)  # BN statistics and dropout stay fixed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)
