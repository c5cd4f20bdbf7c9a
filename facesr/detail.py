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
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
import torch.nn as nn

from .models import SRNet


def check_detail(detail: float, where: str = "detail") -> float:
    """``detail`` as a float if it is a positive, finite factor; ValueError naming ``where`` otherwise."""
    try:
        d = float(detail)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: expected a number, got {detail!r}") from None
    if not (math.isfinite(d) and d > 0):
        raise ValueError(f"{where}: the corrections' scale must be positive (1 = as trained), got {detail!r}")
    return d


def with_detail(net: nn.Module, detail: float) -> nn.Module:
    """A copy of the cascade ``net`` whose every output is ``bicubic(lr) + detail · (net's output - bicubic(lr))``:
    each branch's last convolution scaled by ``detail``; ``net`` itself is left as it was. ValueError for a
    network without the bicubic skip (a Table 1 peer, or a cascade built with ``image_skip=False``)."""
    d = check_detail(detail)
    while isinstance(getattr(net, "module", None), nn.Module):  # a DeepSpeed / DDP wrapper: the network inside
        net = net.module
    net = getattr(net, "_orig_mod", net)  # torch.compile's wrapper
    if not isinstance(net, SRNet) or not net.cfg.image_skip:
        raise ValueError(f"detail {d}: only the cascade with its bicubic skip (image_skip) draws corrections to "
                         f"bicubic; this network is {type(net).__name__}")
    out = copy.deepcopy(net)
    if d != 1.0:
        with torch.no_grad():
            for branch in out.branches:
                last = branch.body[-1]
                last.weight.mul_(d)
                if last.bias is not None:
                    last.bias.mul_(d)
    return out


def at_detail(net: nn.Module, path: str | Path, detail: float) -> nn.Module:
    """``net``, loaded from ``path`` (a run folder or SR-net safetensors), at the absolute strength ``detail``: the
    strength the file ships with (its metadata ``detail``, 1 when absent) undone first."""
    from .infer import find_srnet
    from .weights import read_meta

    d, path = check_detail(detail), Path(path)  # the value asked for named in an error, not the ratio applied
    shipped = float(read_meta(find_srnet(path) if path.is_dir() else path).get("detail", 1.0))
    return with_detail(net, d / shipped)
