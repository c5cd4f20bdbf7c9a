"""The frozen feature network of the perceptual loss ℓp (paper Sec. 3, Table 1). Architecture only.

The paper trains ℓp (Johnson et al., ECCV 2016) with "features from the fire2, fire3 and fire4 layers
of SqueezeNet". Johnson et al. take the features of an ImageNet-trained classifier (VGG-16), and the
paper names no other training for this network, so it is torchvision's ``squeezenet1_1`` with its
ImageNet weights (the paper's identity priors are SqueezeNet 1.1 as well). In torchvision's numbering
``features[3]``, ``[4]`` and ``[6]`` are fire2, fire3 and fire4 (``features[0..2]`` are conv1, its
ReLU and the first max-pool). Weights come from an explicit file (``facesr.weights.load_squeezenet``).

``PriorFeatures`` is the offline alternative: the fire2-4 features of a frozen stage-1 prior (SqueezeNet 1.1,
``facesr.models.prior``) of the same output scale. On the paper's priors (trained on high-pass residuals) ℓp
and C-SRIP share their secondary networks and differ only in what they take from them (local conv features
against the global identity cross-entropy), the contrast the paper draws in Sec. 3; residual features leave
colour and brightness free, though. Priors trained by stage 1 on whole images (``stage1.input: image``) are
a SqueezeNet trained on faces instead of ImageNet, seeing what an ImageNet SqueezeNet sees.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torchvision.models import squeezenet1_1

from ..degrade import prior_view

FIRE = {"fire2": 3, "fire3": 4, "fire4": 6}  # layer name -> index in torchvision's squeezenet1_1.features
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SqueezeFeatures(nn.Module):
    """[0, 1] images (B, 3, H, W) -> [fire2, fire3, fire4] feature maps; frozen, always in eval mode.

    ``state`` is a torchvision ``squeezenet1_1`` state dict (its ``features.*`` entries are used).
    """

    def __init__(self, state: dict[str, torch.Tensor] | None = None, layers: tuple[str, ...] = tuple(FIRE)):
        super().__init__()
        unknown = [name for name in layers if name not in FIRE]
        if unknown:
            raise ValueError(f"unknown SqueezeNet layers {unknown}; choose from {list(FIRE)}")
        net = squeezenet1_1(weights=None)
        if state is not None:
            net.load_state_dict(state)
        self.taps = [FIRE[name] for name in layers]
        self.layers = tuple(layers)
        self.features = net.features[: max(self.taps) + 1]  # nothing past the last tapped fire module
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "SqueezeFeatures":
        return super().train(False)  # frozen: no mode switch can change it

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)  # ImageNet normalisation
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                out.append(x)  # fire2, fire3 (B, 128, ~H/4, ~W/4); fire4 (B, 256, ~H/8, ~W/8)
        return out


# fire2, fire3, fire4 in SqueezeNetResidual.features: [input BN, conv1, ReLU, pool, fire2, fire3, pool, fire4, ...]
PRIOR_FIRE = {"fire2": 4, "fire3": 5, "fire4": 7}


class PriorFeatures(nn.Module):
    """[0, 1] images (B, 3, S, S) of output ``key`` -> [fire2, fire3, fire4] maps of that scale's frozen identity
    prior on what it was trained on (``FrozenPrior.input``: their high-pass residual, computed in fp32 as C-SRIP's
    loss does, or the images themselves)."""

    def __init__(self, prior: nn.Module, key: str, layers: tuple[str, ...] = tuple(PRIOR_FIRE)):
        super().__init__()
        unknown = [name for name in layers if name not in PRIOR_FIRE]
        if unknown:
            raise ValueError(f"unknown SqueezeNet layers {unknown}; choose from {list(PRIOR_FIRE)}")
        net = getattr(prior, "model", prior)  # a FrozenPrior wraps the SqueezeNetResidual
        self.key = key
        self.input = getattr(prior, "input", "residual")
        self.taps = [PRIOR_FIRE[name] for name in layers]
        self.features = net.features[: max(self.taps) + 1]
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "PriorFeatures":
        return super().train(False)  # frozen: BN statistics stay the prior's

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        with torch.autocast(x.device.type, enabled=False):
            x = prior_view(x.float(), self.key, self.input)
        x = x.to(next(self.features.parameters()).dtype)
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                out.append(x)
        return out
