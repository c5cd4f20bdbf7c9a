"""Static description of a preset: shapes, conv counts, parameters, forward FLOPs."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from .models import SRNet, build_prior, conv_depth, get_preset
from .vocab import SIZES, TARGETS


def forward_flops(model: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward pass (multiply-add = 2 FLOPs), counted by PyTorch's FlopCounterMode."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def n_convs(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d) for m in model.modules())


def describe(preset: str, num_classes: int = 10575) -> dict:
    """Everything ``facesr info`` prints, as a dict (per image figures)."""
    p = get_preset(preset)
    net = SRNet(p.sr).eval()
    lr = torch.zeros(1, 3, SIZES["lr"], SIZES["lr"])
    shapes, feat = {}, lr
    with torch.no_grad():
        for key, stage in zip(TARGETS, net.stages):
            feat = stage(feat)
            shapes[key] = {"features": list(feat.shape[1:]), "image": [3, SIZES[key], SIZES[key]]}
    sr = {
        "input": [3, SIZES["lr"], SIZES["lr"]],
        "stages": shapes,
        "conv_layers_total": n_convs(net),
        "conv_depth_lr_to_x8": conv_depth(net),
        "params": n_params(net),
        "params_deploy": n_params(net.deploy()),
        "gflops_train_forward": forward_flops(net, lr) / 1e9,
        "gflops_deploy_forward": forward_flops(net.deploy(), lr) / 1e9,
    }
    prior = build_prior(p.prior, num_classes).eval()
    priors = {
        key: {
            "input": [3, SIZES[key], SIZES[key]],
            "gflops_forward": forward_flops(prior, torch.zeros(1, 3, SIZES[key], SIZES[key])) / 1e9,
        }
        for key in TARGETS
    }
    return {
        "preset": preset,
        "sr": sr,
        "prior": {"name": p.prior.name, "num_classes": num_classes, "conv_layers": n_convs(prior),
                  "params": n_params(prior), "per_scale": priors},
    }
