"""The face-embedding network facesr can train as its own verification judge (architecture only).

A small timm ResNet, deliberately *not* the SqueezeNet priors used in training, so the SR model cannot
have been optimised against the judge. Its training loop is ``facesr.identity.train``; its weights go
through ``facesr.weights.save_embedder`` / ``load_embedder``.
"""

from __future__ import annotations

from dataclasses import dataclass

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EmbedderConfig:
    arch: str = "resnet10t"  # timm small ResNet (4.9 M params): trains on CPU, unlike the SqueezeNet priors
    size: int = 96  # network input side; 192² faces are resized to size·8/7 and centre-cropped (CPU-sized)


class FaceEmbedder(nn.Module):
    """Faces (B, 3, S, S) in [0, 1], any S -> L2-normalised embeddings (B, D), flip-averaged."""

    def __init__(self, cfg: EmbedderConfig = EmbedderConfig(), num_classes: int = 1):
        super().__init__()
        self.cfg = cfg
        self.frozen = False  # set by freeze(): the judge must not drift (BN statistics, dropout)
        self.net = timm.create_model(cfg.arch, pretrained=False, num_classes=num_classes)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "FaceEmbedder":
        return super().train(mode and not self.frozen)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Resize to size·8/7, centre-crop to size, normalise. (B, 3, S, S) -> (B, 3, size, size)."""
        pad = self.cfg.size * 8 // 7
        x = F.interpolate(x.float(), size=(pad, pad), mode="bilinear", align_corners=False, antialias=True)
        o = (pad - self.cfg.size) // 2
        x = x[..., o : o + self.cfg.size, o : o + self.cfg.size]
        return self.normalize(x)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet mean/std, as timm's ResNets expect (training applies it after its own crops)."""
        return (x - self.mean) / self.std

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Already prepared input -> class logits (training)."""
        return self.net(x)

    def embed_prepared(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_head(self.net.forward_features(x), pre_logits=True)  # (B, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prepare(x)
        e = self.embed_prepared(x) + self.embed_prepared(x.flip(-1))
        return F.normalize(e, dim=1)


def freeze(model: FaceEmbedder) -> FaceEmbedder:
    """The judge is fixed: eval mode that stays eval, no gradients."""
    model.frozen = True
    model.eval().requires_grad_(False)
    return model


@dataclass(frozen=True)
class RecognizerConfig:
    arch: str = "resnet10t"  # timm trunk; its classifier becomes the embedding layer
    size: int = 96  # network input side: hr (192²) and every SR output are resized to size·8/7, centre-cropped
    dim: int = 128  # embedding size (unit sphere)
    input: str = "image"  # what it learns identities from: image = the whole face; residual = the paper's high-pass Δx at hr


class MarginHead(nn.Module):
    """Class centres on the unit sphere (ArcFace/CosFace's last layer): embeddings (B, D) -> cosines (B, C).

    The margin itself belongs to the loss (``facesr.losses.MarginLoss``), which knows the labels."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, dim) * 0.01)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return F.normalize(e.float(), dim=1) @ F.normalize(self.weight.float(), dim=1).t()  # (B, C)


class Recognizer(nn.Module):
    """A face recognizer for the identity term (issue 25): whole faces (B, 3, S, S) in [0, 1], any S ->
    ``embed``: unit embeddings (B, D); ``forward``: cosines to the training identities (B, C), which a margin
    loss trains. Trained by stage 1 (``stage1.model: recognizer``) on the training identities; stage 2 compares
    the embeddings of SR and HR faces, which works for people it never saw."""

    def __init__(self, cfg: RecognizerConfig = RecognizerConfig(), num_classes: int = 1):
        super().__init__()
        self.cfg = cfg
        self.frozen = False
        self.trunk = timm.create_model(cfg.arch, pretrained=False, num_classes=cfg.dim)  # (B, dim)
        self.head = MarginHead(cfg.dim, num_classes)
        # residuals are small and centred on zero: a learned input standardisation, as the priors have
        self.input_norm = nn.BatchNorm2d(3) if cfg.input == "residual" else None
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "Recognizer":
        return super().train(mode and not self.frozen)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """(Residual at hr,) resize to size·8/7, centre-crop to size, normalise: (B, 3, S, S) -> (B, 3, size, size)."""
        if self.input_norm is not None:
            from ..degrade import residual

            with torch.autocast(x.device.type, enabled=False):  # residuals are small: bf16 would keep 8 bits of them
                x = residual(x.float(), "hr")  # the paper's Δx at hr (σ = 7/3), before any resize
        pad = self.cfg.size * 8 // 7
        if x.shape[-1] != pad:
            x = F.interpolate(x, size=(pad, pad), mode="bilinear", align_corners=False, antialias=True)
        o = (pad - self.cfg.size) // 2
        x = x[..., o : o + self.cfg.size, o : o + self.cfg.size]
        return self.input_norm(x) if self.input_norm is not None else (x - self.mean) / self.std

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.trunk(self.prepare(x)).float(), dim=1)  # (B, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))  # (B, C)
