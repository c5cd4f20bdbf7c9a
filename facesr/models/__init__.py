"""Networks of C-SRIP, the Table 1 peers, and their named presets (one explicit dict).

Stage 2 trains one of ``SR_MODELS`` (``stage2.model``): the cascade, or a peer of the paper's Table 1
(SRCNN, VDSR) on the bicubic-upsampled input, or SRGAN's generator SRResNet on the lr. Every one maps ``lr`` to a dict of outputs keyed by
target (the cascade ``x2``, ``x4``, ``hr``; the peers ``hr`` only) and has ``deploy()`` (lr -> hr).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import timm
import torch.nn as nn

from .csrnet import DetailGate, SRNet, SRNetConfig, SRNetDeploy, conv_depth
from .embedder import EmbedderConfig, FaceEmbedder, MarginHead, Recognizer, RecognizerConfig
from .peers import (SRCNN, VDSR, Discriminator, DiscriminatorConfig, HROnly, SRCNNConfig, SRResNet, SRResNetConfig,
                    VDSRConfig)
from .prior import FrozenPrior, PriorConfig, SqueezeNetResidual


@dataclass(frozen=True)
class ModelPreset:
    sr: SRNetConfig  # the cascade
    prior: PriorConfig  # each of the three identity priors
    srcnn: SRCNNConfig = SRCNNConfig()  # Table 1 peer: the 9-1-5 SRCNN
    vdsr: VDSRConfig = VDSRConfig()  # Table 1 peer: 20-layer VDSR
    srresnet: SRResNetConfig = SRResNetConfig()  # Table 1 peer: SRGAN's generator (16 blocks of 64)
    critic: DiscriminatorConfig = DiscriminatorConfig()  # SRGAN's discriminator (stage2.loss=adversarial)
    recognizer: RecognizerConfig = RecognizerConfig()  # the identity term's face recognizer (stage1.model=recognizer)


PRESETS: dict[str, ModelPreset] = {
    # The paper: 53 conv layers LR->8x, widths 128/64/32, SqueezeNet 1.1 priors.
    "paper": ModelPreset(sr=SRNetConfig(), prior=PriorConfig()),
    # Small enough for CPU tests and the 2-core demo: same structure, 1 block per module.
    "tiny": ModelPreset(
        sr=SRNetConfig(widths=(32, 16, 8), blocks=1, branch_kernels=(5, 3)),
        prior=PriorConfig(width=0.25, dropout=0.2, norm=True),  # norm: tiny priors without BN never learn (prior.py)
        srcnn=SRCNNConfig(widths=(16, 8)),  # the 9-1-5 kernels kept, a quarter of the filters
        vdsr=VDSRConfig(depth=5, width=16),
        srresnet=SRResNetConfig(blocks=2, width=16),
        critic=DiscriminatorConfig(width=16, blocks=5, dense=64),
    ),
}
# A capacity probe a CPU can train: tiny with twice its widths (4x its FLOPs an image; the paper's is 71x).
# For the question "does the tiny preset lack capacity?" (README: issue 25), not a deployment size.
PRESETS["tiny-wide"] = replace(PRESETS["tiny"], sr=SRNetConfig(widths=(64, 32, 16), blocks=1, branch_kernels=(5, 3)))

# stage2.model -> the network class; its config is the preset's field of the same role (sr_config)
SR_MODELS: dict[str, type[nn.Module]] = {"cascade": SRNet, "srcnn": SRCNN, "vdsr": VDSR, "srresnet": SRResNet}
OUTPUTS: dict[str, tuple[str, ...]] = {"cascade": ("x2", "x4", "hr"), "srcnn": ("hr",), "vdsr": ("hr",),
                                       "srresnet": ("hr",)}


def get_preset(name: str) -> ModelPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def sr_config(preset: str, model: str):
    """The config of SR network ``model`` (a key of SR_MODELS) in model preset ``preset``."""
    if model not in SR_MODELS:
        raise ValueError(f"unknown SR model {model!r}; choose one of {sorted(SR_MODELS)}")
    p = get_preset(preset)
    return {"cascade": p.sr, "srcnn": p.srcnn, "vdsr": p.vdsr, "srresnet": p.srresnet}[model]


def build_critic(preset: str = "paper") -> nn.Module:
    """A fresh discriminator of preset ``preset`` (SRGAN's, for stage2.loss=adversarial)."""
    return Discriminator(get_preset(preset).critic)


def build_sr(model: str, cfg=None, preset: str = "paper") -> nn.Module:
    """A fresh SR network ``model`` built from ``cfg`` (default: preset ``preset``'s config of it)."""
    return SR_MODELS[model](cfg if cfg is not None else sr_config(preset, model))


def sr_model_name(net: nn.Module) -> str:
    """The SR_MODELS key of a built network (what a weights file records)."""
    for name, cls in SR_MODELS.items():
        if type(net) is cls:
            return name
    raise ValueError(f"{type(net).__name__} is not one of the SR models {sorted(SR_MODELS)}")


def build_recognizer(cfg: RecognizerConfig, num_classes: int) -> Recognizer:
    """A fresh face recognizer (the identity term's), with a margin head over ``num_classes`` identities."""
    return Recognizer(cfg, num_classes)


def build_prior(cfg: PriorConfig, num_classes: int) -> nn.Module:
    """A fresh identity prior from timm's registry."""
    return timm.create_model(cfg.name, num_classes=num_classes, width=cfg.width, dropout=cfg.dropout, norm=cfg.norm)


__all__ = [
    "PRESETS", "ModelPreset", "get_preset", "build_prior", "build_critic",
    "SR_MODELS", "OUTPUTS", "sr_config", "build_sr", "sr_model_name",
    "DetailGate", "SRNet", "SRNetConfig", "SRNetDeploy", "conv_depth",
    "SRCNN", "SRCNNConfig", "VDSR", "VDSRConfig", "HROnly", "SRResNet", "SRResNetConfig",
    "Discriminator", "DiscriminatorConfig",
    "FrozenPrior", "PriorConfig", "SqueezeNetResidual",
    "EmbedderConfig", "FaceEmbedder", "MarginHead", "Recognizer", "RecognizerConfig", "build_recognizer",
]
