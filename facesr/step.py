"""Forward + loss for one batch, shared by training (any engine), benchmarks and tests.

The engine (DeepSpeed, or a plain optimizer in benchmarks) owns backward and
step; these functions own precision and memory format, so the same switches
serve GPU and CPU: bf16 autocast and channels_last are fast on both AMX CPUs
and tensor-core GPUs.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn

from .degrade import residual
from .vocab import LEVELS


@dataclass(frozen=True)
class Precision:
    bf16: bool = True  # autocast convolutions to bfloat16 (losses stay fp32)
    channels_last: bool = True  # NHWC activations and weights: what oneDNN/AMX and cuDNN prefer

    def autocast(self, device: torch.device | str):
        dev = torch.device(device).type
        return torch.autocast(dev, dtype=torch.bfloat16) if self.bf16 else nullcontext()

    def module(self, m: nn.Module) -> nn.Module:
        return m.to(memory_format=torch.channels_last) if self.channels_last else m

    def tensor(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x


def to_device(batch: dict, device: torch.device | str, precision: Precision) -> dict[str, torch.Tensor]:
    """Move a batch to ``device``; image levels in the precision's memory format."""
    out = {}
    for k, v in batch.items():
        if not torch.is_tensor(v):
            continue
        v = v.to(device, non_blocking=True)
        out[k] = precision.tensor(v) if k in LEVELS else v
    return out


def sr_forward(model: nn.Module, loss_fn: nn.Module, batch: dict, precision: Precision) -> dict[str, torch.Tensor]:
    """Stage 2: the cascade on ``lr`` and the loss of eq. (4). Returns the named terms."""
    with precision.autocast(batch["lr"].device):
        sr = model(batch["lr"])
        return loss_fn(sr, batch)


def prior_inputs(batch: dict, keys, precision: Precision) -> dict[str, torch.Tensor]:
    """Residual images Δx of the ground truth at each prior's level, fp32 then the precision's format."""
    return {k: precision.tensor(residual(batch[k].float(), k)) for k in keys}


def prior_forward(priors: nn.ModuleDict, loss_fn: nn.Module, batch: dict, precision: Precision) -> dict:
    """Stage 1: each prior on its residual images; cross-entropy and accuracy per scale."""
    inputs = prior_inputs(batch, priors.keys(), precision)
    with precision.autocast(batch["cls"].device):
        logits = {k: priors[k](x) for k, x in inputs.items()}
    return loss_fn(logits, batch["cls"])
