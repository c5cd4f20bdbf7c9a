"""Detail strength: the cascade's corrections to bicubic, scaled, folded into its weights.

Every output of the cascade is the bicubic upsampling of ``lr`` plus a correction its branch draws
(``SRNetConfig.image_skip``); a branch ends in a convolution, so ``bicubic + d · correction`` is the
same network with that convolution's weight and bias times ``d``. ``with_detail(net, d)`` returns such
a copy: nothing at inference changes (a run folder, ``facesr sr``, ``facesr export`` read it as any
other), and ``d = 1`` is the network as trained.

Why a network would ship with ``d < 1`` (README, issue 25): a correction drawn from a 24² face is
partly right and partly invented; shrinking it toward bicubic is the classic shrinkage of a noisy
estimate, and on faces made small by other means than training's (where the invented part is
larger) it raised both PSNR and how recognizable the face stays. Choose ``d`` on validation
identities (``facesr eval quality|identity --detail``), never on the faces you report.

A strength per face (``SRNetConfig.gate``): one ``d`` cannot serve every input (faces JPEG-compressed at 24²
keep their person best near 0.3, the paper's degradation wants more than 1), so a cascade may carry a
``DetailGate`` that reads each face's strength off its lr. ``with_gate`` attaches one trained to predict the
PSNR-optimal strength, its output scaled by ``strength`` (folded into its last layer) and clamped to [0, 1];
``at_detail`` gives every face one fixed strength again, the gate removed.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import torch
import torch.nn as nn

from .models import DetailGate, SRNet


def check_detail(detail: float, where: str = "detail") -> float:
    """``detail`` as a float if it is a positive, finite factor; ValueError naming ``where`` otherwise."""
    try:
        d = float(detail)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: expected a number, got {detail!r}") from None
    if not (math.isfinite(d) and d > 0):
        raise ValueError(f"{where}: the corrections' scale must be positive (1 = as trained), got {detail!r}")
    return d


def _inner(net: nn.Module) -> nn.Module:
    """The network inside DeepSpeed / DDP / torch.compile wrappers."""
    while isinstance(getattr(net, "module", None), nn.Module):  # a DeepSpeed / DDP wrapper: the network inside
        net = net.module
    return getattr(net, "_orig_mod", net)  # torch.compile's wrapper


def _cascade(net: nn.Module, what: str) -> SRNet:
    """The cascade inside ``net`` (wrappers removed); ValueError naming ``what`` for a network without the bicubic
    skip (a Table 1 peer, or a cascade built with ``image_skip=False``)."""
    net = _inner(net)
    if not isinstance(net, SRNet) or not net.cfg.image_skip:
        raise ValueError(f"{what}: only the cascade with its bicubic skip (image_skip) draws corrections to "
                         f"bicubic; this network is {type(net).__name__}")
    return net


def with_detail(net: nn.Module, detail: float) -> nn.Module:
    """A copy of the cascade ``net`` whose every output is ``bicubic(lr) + detail · (net's output - bicubic(lr))``:
    each branch's last convolution scaled by ``detail`` (a gate's per-face strength, if it has one, applies on top);
    ``net`` itself is left as it was. ValueError for a network without the bicubic skip."""
    d = check_detail(detail)
    out = copy.deepcopy(_cascade(net, f"detail {d}"))
    if d != 1.0:
        with torch.no_grad():
            for branch in out.branches:
                last = branch.body[-1]
                last.weight.mul_(d)
                if last.bias is not None:
                    last.bias.mul_(d)
    return out


def without_gate(net: nn.Module) -> SRNet:
    """A copy of the cascade ``net`` without its detail gate (every face at the strength of its weights)."""
    out = copy.deepcopy(_cascade(net, "without_gate"))
    out.gate, out.cfg = None, dataclasses.replace(out.cfg, gate=False)
    return out


def with_gate(net: nn.Module, gate: DetailGate, strength: float = 1.0) -> SRNet:
    """A copy of the cascade ``net`` with a copy of ``gate`` as its detail gate: each face's corrections scaled by
    ``clamp(strength · gate(lr), 0, 1)``, ``strength`` folded into the gate's last layer. ``net``'s weights are
    taken as they are (``at_detail(net, path, 1)`` first for a file that ships a fixed strength)."""
    k = check_detail(strength, "gate strength")
    gate = _inner(gate)
    if not isinstance(gate, DetailGate):
        raise ValueError(f"with_gate: expected a DetailGate, got {type(gate).__name__}")
    out = without_gate(net)
    out.cfg = dataclasses.replace(out.cfg, gate=True)
    out.gate = copy.deepcopy(gate).to(next(out.parameters()).device).eval()
    with torch.no_grad():
        last = out.gate.body[-1]
        last.weight.mul_(k)
        last.bias.mul_(k)
    return out


def at_gate_strength(net: nn.Module, path: str | Path, strength: float) -> SRNet:
    """The gated cascade ``net``, loaded from ``path``, with its gate's predictions scaled by ``strength`` instead
    of the strength it was written with (metadata ``gate_strength``). ValueError for a network without a gate."""
    from .infer import find_srnet
    from .weights import read_meta

    k, path = check_detail(strength, "gate strength"), Path(path)
    cascade = _cascade(net, f"gate strength {k}")
    if cascade.gate is None:
        raise ValueError(f"gate strength {k:g}: {path} has no detail gate (train one: run.stages=[3])")
    shipped = float(read_meta(find_srnet(path) if path.is_dir() else path).get("gate_strength", 1.0))
    return with_gate(cascade, cascade.gate, k / shipped)


def at_detail(net: nn.Module, path: str | Path, detail: float) -> nn.Module:
    """``net``, loaded from ``path`` (a run folder or SR-net safetensors), at the absolute strength ``detail`` for
    every face: the strength the file ships with (its metadata ``detail``, 1 when absent) undone first, and a
    detail gate, if the file has one, removed."""
    from .infer import find_srnet
    from .weights import read_meta

    d, path = check_detail(detail), Path(path)  # the value asked for named in an error, not the ratio applied
    shipped = float(read_meta(find_srnet(path) if path.is_dir() else path).get("detail", 1.0))
    net = without_gate(net) if getattr(_cascade(net, f"detail {d}"), "gate", None) is not None else net
    return with_detail(net, d / shipped)


def optimal_strength(correction: torch.Tensor, lr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """Each face's PSNR-optimal strength of the cascade's x8 ``correction`` c to bicubic (``SRNetDeploy.correction``):
    the ``d`` that minimises ``|bicubic(lr) + d · c - hr|²``, ``<c, hr - bicubic> / <c, c>`` (B,), in fp32."""
    from .resample import upsample_bicubic

    bic = upsample_bicubic(lr.float(), hr.shape[-1])
    c = correction.float().flatten(1)
    return (c * (hr.float() - bic).flatten(1)).sum(1) / (c * c).sum(1).clamp_min(1e-8)
