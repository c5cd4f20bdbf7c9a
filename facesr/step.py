"""Forward + loss for one batch, shared by training (any engine), benchmarks and tests.

The engine (DeepSpeed, or a plain optimizer in benchmarks) owns backward and
step; these functions own precision and memory format, so the same switches
serve GPU and CPU: bf16 autocast and channels_last are fast on both AMX CPUs
and tensor-core GPUs.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn

from .degrade import prior_view
from .vocab import LEVELS


PRECISIONS = ("auto", "bf16", "fp32")
# torch.compile modes of the step's forward + loss (engine.step_compile): off = eager; default = inductor's fused
# kernels; reduce-overhead = those kernels in CUDA graphs (one launch replays a whole graph; CUDA only)
STEP_COMPILE = ("off", "default", "reduce-overhead")


@dataclass(frozen=True)
class Precision:
    bf16: bool = True  # autocast convolutions to bfloat16 (losses stay fp32)
    channels_last: bool = True  # NHWC activations: what oneDNN/AMX and cuDNN prefer

    @property
    def name(self) -> str:
        return f"{'bf16' if self.bf16 else 'fp32'}{'+channels_last' if self.channels_last else ''}"

    def autocast(self, device: torch.device | str):
        dev = torch.device(device).type
        return torch.autocast(dev, dtype=torch.bfloat16) if self.bf16 else nullcontext()

    def module(self, m: nn.Module) -> nn.Module:
        return m.to(memory_format=torch.channels_last) if self.channels_last else m

    def tensor(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x


def resolve_precision(precision: str, device: torch.device | str, channels_last: bool | None = None) -> Precision:
    """``auto`` | ``bf16`` | ``fp32`` on ``device`` -> Precision.

    ``auto`` is bf16 where the hardware computes it natively (``facesr.hardware.native_bf16``), else fp32.
    ``channels_last=None`` means NHWC activations with either dtype: oneDNN's and cuDNN's fast kernels want
    them, and on an AVX512-BF16 EPYC even fp32 gained from it (tiny step +14%, paper step +44%, `facesr
    bench step`); False forces NCHW.
    """
    from .hardware import native_bf16

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    bf16 = native_bf16(device) if precision == "auto" else precision == "bf16"
    if channels_last is None:
        channels_last = True
    return Precision(bf16=bf16, channels_last=channels_last)


def to_device(batch: dict, device: torch.device | str, precision: Precision) -> dict[str, torch.Tensor]:
    """Move a batch to ``device``; image levels become float [0, 1] there, in the precision's memory format.

    Batches travel as uint8 (a quarter of float32's bytes; pinned by the loader on CUDA, so the copy is
    asynchronous) and are converted on the device. Float levels (tests, benchmarks) pass through as they are.
    """
    out = {}
    for k, v in batch.items():
        if not torch.is_tensor(v):
            continue
        v = v.to(device, non_blocking=True)
        if k in LEVELS:
            if v.dtype == torch.uint8:
                v = v.float().div_(255)  # (B, 3, S, S) in [0, 1]
            v = precision.tensor(v)
        out[k] = v
    return out


class TermSums:
    """Loss terms summed on the device over micro-batches; they cross to the host once, at a log step.

    ``float(term)`` per micro-batch would wait for the device every time (19 waits a step before this).
    """

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.n = 0

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        for k, v in terms.items():
            v = v.detach().float()
            # a copy, never the term itself: a CUDA graph's outputs are overwritten by its next replay
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        self.n += 1

    def mean(self) -> dict[str, float]:
        """Means since the last call (non-finite ones dropped), then reset: the one host transfer."""
        keys = sorted(self.sums)
        values = torch.stack([self.sums[k] for k in keys]).tolist() if keys else []
        n = max(self.n, 1)
        out = {k: v / n for k, v in zip(keys, values) if math.isfinite(v / n)}
        self.sums, self.n = {}, 0
        return out


def build_ema(model: nn.Module, decay: float):
    """timm's ``ModelEmaV3`` of ``model`` (a copy on its device, in eval mode), or None when ``decay`` is 0: the
    weights' moving average a stage writes in place of its last iterate (``ema_decay``). Its warm-up caps the decay
    at ``1 - (1 + step)^(-2/3)``, so the first steps do not pin it to the initial weights; ``update(model, step)``
    runs on the device (foreach lerps, no host sync)."""
    if not decay:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=decay, use_warmup=True)


def compile_forward(forward, mode: str = "off"):
    """``forward(model, batch) -> terms`` (a stage's forward: the network and its loss) for the training step.

    ``default``: one graph of network + loss compiled by inductor (fused elementwise kernels around the
    convolutions); static shapes (``dynamic=False``: every micro-batch has the same size, the loader drops an
    epoch's ragged tail). ``reduce-overhead``: the same kernels captured in CUDA graphs, forward and backward,
    so a step's ~2,000 small launches become a few graph launches; each call marks a new step first, so
    the previous replay's outputs may be overwritten (``TermSums`` keeps copies). On a CPU it is ``default``.
    """
    if mode not in STEP_COMPILE:
        raise ValueError(f"step compile mode must be one of {STEP_COMPILE}, got {mode!r}")
    if mode == "off":
        return forward
    compiled = torch.compile(forward, mode=mode, dynamic=False)
    if mode == "default":
        return compiled

    def graphed(*args, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(*args, **kwargs)

    return graphed


def sr_forward(model: nn.Module, loss_fn: nn.Module, batch: dict, precision: Precision) -> dict[str, torch.Tensor]:
    """Stage 2: the cascade on ``lr`` and the loss of eq. (4). Returns the named terms."""
    with precision.autocast(batch["lr"].device):
        sr = model(batch["lr"])
        return loss_fn(sr, batch)


def prior_inputs(batch: dict, keys, precision: Precision, kind: str = "residual") -> dict[str, torch.Tensor]:
    """What each prior sees of the ground truth at its level (residual Δx, or the image: ``prior_view``), fp32
    then the precision's format."""
    return {k: precision.tensor(prior_view(batch[k].float(), k, kind)) for k in keys}


def prior_forward(priors: nn.ModuleDict, loss_fn: nn.Module, batch: dict, precision: Precision,
                  kind: str = "residual") -> dict:
    """Stage 1: each prior on its residual images (or whole images: ``kind``); cross-entropy and accuracy per scale."""
    inputs = prior_inputs(batch, priors.keys(), precision, kind)
    with precision.autocast(batch["cls"].device):
        logits = {k: priors[k](x) for k, x in inputs.items()}
    return loss_fn(logits, batch["cls"])


def gate_forward(gate: nn.Module, cascade: nn.Module, batch: dict, precision: Precision,
                 target_max: float) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Stage 3: the frozen full-strength ``cascade`` (an ``SRNetDeploy``) draws its x8 correction to bicubic for
    ``lr``; each face's PSNR-optimal strength of it (``facesr.detail.optimal_strength``, clipped to [0,
    target_max]) is the target the detail ``gate`` regresses from ``lr``. Returns the terms (squared error as
    ``loss``, the mean prediction and target), the correction (fp32) and the gate's predictions (B,). The
    correction is taken before the bicubic skip is added, so bf16 rounds it, not the whole image."""
    from .detail import optimal_strength

    lr = batch["lr"]
    with torch.no_grad(), precision.autocast(lr.device):
        c = cascade.correction(lr).float()
    target = optimal_strength(c, lr, batch["hr"]).clamp(0, target_max)
    with precision.autocast(lr.device):
        pred = gate(lr).float()
    terms = {"loss": ((pred - target) ** 2).mean(), "strength/x8": pred.detach().mean(), "optimal/x8": target.mean()}
    return terms, c, pred
