"""Networks of C-SRIP and their named presets (one explicit dict)."""

from __future__ import annotations

from dataclasses import dataclass

import timm
import torch.nn as nn

from .csrnet import SRNet, SRNetConfig, SRNetDeploy, conv_depth
from .embedder import EmbedderConfig, FaceEmbedder
from .prior import FrozenPrior, PriorConfig, SqueezeNetResidual


@dataclass(frozen=True)
class ModelPreset:
    sr: SRNetConfig  # the cascade
    prior: PriorConfig  # each of the three identity priors


PRESETS: dict[str, ModelPreset] = {
    # The paper: 53 conv layers LR->8x, widths 128/64/32, SqueezeNet 1.1 priors.
    "paper": ModelPreset(sr=SRNetConfig(), prior=PriorConfig()),
    # Small enough for CPU tests and the 2-core demo: same structure, 1 block per module.
    "tiny": ModelPreset(
        sr=SRNetConfig(widths=(32, 16, 8), blocks=1, branch_kernels=(5, 3)),
        prior=PriorConfig(width=0.25, dropout=0.2, norm=True),  # norm: tiny priors without BN never learn (prior.py)
    ),
}


def get_preset(name: str) -> ModelPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def build_prior(cfg: PriorConfig, num_classes: int) -> nn.Module:
    """A fresh identity prior from timm's registry."""
    return timm.create_model(cfg.name, num_classes=num_classes, width=cfg.width, dropout=cfg.dropout, norm=cfg.norm)


__all__ = [
    "PRESETS", "ModelPreset", "get_preset", "build_prior",
    "SRNet", "SRNetConfig", "SRNetDeploy", "conv_depth",
    "FrozenPrior", "PriorConfig", "SqueezeNetResidual",
    "EmbedderConfig", "FaceEmbedder",
]
