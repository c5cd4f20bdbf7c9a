"""Training-step benchmark: fp32 NCHW against bf16 autocast + channels_last, and the machine's conv peak.

A step is what stage 2 does per batch: SR forward, three frozen priors on the
SR residuals, the loss of eq. (4), backward, Adam step. FLOPs per step are
counted by PyTorch's FlopCounterMode over a real step (forward + backward),
so achieved GFLOP/s and MFU use the same work definition.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from .losses import CSRIPLoss
from .models import FrozenPrior, SRNet, build_prior, get_preset
from .step import Precision, sr_forward, to_device
from .vocab import SIZES, TARGETS


@dataclass
class StepBench:
    preset: str = "tiny"
    batch: int = 8  # the paper's stage-2 batch
    classes: int = 1000  # prior classes (head size only changes a 1×1 conv)
    seconds: float = 10.0  # measuring time per variant, after warm-up
    warmup: int = 2
    compile: bool = False  # torch.compile the SR net of the bf16 variant (inductor); measured slower on this CPU
    threads: int = 0  # torch threads; 0 = PyTorch's default


def _batch(n: int, classes: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    b = {k: torch.rand(n, 3, s, s, generator=gen) for k, s in SIZES.items()}
    b["cls"] = torch.randint(0, classes, (n,), generator=gen)
    return b


def _setup(cfg: StepBench, precision: Precision):
    torch.manual_seed(0)
    p = get_preset(cfg.preset)
    net = precision.module(SRNet(p.sr))
    priors = {k: FrozenPrior(precision.module(build_prior(p.prior, cfg.classes))) for k in TARGETS}
    loss_fn = CSRIPLoss(priors, alpha=0.001)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    # The fp32 NCHW baseline is always plain eager PyTorch; compile applies to the tuned variant only.
    model = torch.compile(net) if cfg.compile and precision.bf16 else net
    return net, model, loss_fn, opt


def _step(model, loss_fn, opt, batch, precision) -> float:
    terms = sr_forward(model, loss_fn, batch, precision)
    opt.zero_grad(set_to_none=True)
    terms["loss"].backward()
    opt.step()
    return float(terms["loss"].detach())


def step_flops(cfg: StepBench) -> int:
    """FLOPs of one training step (forward + backward, priors included) at batch ``cfg.batch``."""
    prec = Precision(bf16=False, channels_last=False)
    net, model, loss_fn, opt = _setup(StepBench(**{**cfg.__dict__, "compile": False}), prec)
    batch = to_device(_batch(cfg.batch, cfg.classes, torch.Generator().manual_seed(0)), "cpu", prec)
    with FlopCounterMode(display=False) as fc:
        terms = sr_forward(model, loss_fn, batch, prec)
        terms["loss"].backward()
    return fc.get_total_flops()


def time_steps(cfg: StepBench, precision: Precision) -> dict:
    net, model, loss_fn, opt = _setup(cfg, precision)
    batch = to_device(_batch(cfg.batch, cfg.classes, torch.Generator().manual_seed(0)), "cpu", precision)
    t0 = time.perf_counter()
    for _ in range(cfg.warmup):
        _step(model, loss_fn, opt, batch, precision)
    warm_s = time.perf_counter() - t0
    n, t0 = 0, time.perf_counter()
    while n < 2 or time.perf_counter() - t0 < cfg.seconds:
        loss = _step(model, loss_fn, opt, batch, precision)
        n += 1
    dt = (time.perf_counter() - t0) / n
    return {"steps": n, "step_s": dt, "images_per_s": cfg.batch / dt, "warmup_s": warm_s, "last_loss": loss}


def conv_peak(seconds: float = 3.0, bf16: bool = True) -> dict:
    """Throughput of a large 3×3 convolution (forward), the machine's practical conv peak."""
    x = torch.randn(16, 256, 56, 56).to(memory_format=torch.channels_last)
    w = torch.randn(256, 256, 3, 3).to(memory_format=torch.channels_last)
    dtype = torch.bfloat16 if bf16 else torch.float32
    x, w = x.to(dtype), w.to(dtype)
    flops = 2 * 16 * 256 * 256 * 9 * 56 * 56
    for _ in range(2):
        F.conv2d(x, w, padding=1)
    n, t0 = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - t0 < seconds:
        F.conv2d(x, w, padding=1)
        n += 1
    dt = (time.perf_counter() - t0) / n
    return {"dtype": str(dtype), "gflops_per_s": flops / dt / 1e9, "shape": "16x256x56x56 * 256x256x3x3"}


def run_bench(cfg: StepBench, log=print) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    flops = step_flops(cfg)
    log(f"[{cfg.preset}] step FLOPs at batch {cfg.batch}: {flops / 1e9:.1f} GFLOP "
        f"({flops / cfg.batch / 1e9:.2f}/image)")
    peak = conv_peak()
    log(f"bf16 conv peak: {peak['gflops_per_s']:.0f} GFLOP/s ({peak['shape']})")
    variants = {
        "fp32_nchw": Precision(bf16=False, channels_last=False),
        "bf16_channels_last": Precision(bf16=True, channels_last=True),
    }
    results = {}
    for name, prec in variants.items():
        r = time_steps(cfg, prec)
        r["gflops_per_s"] = flops / r["step_s"] / 1e9
        r["mfu_vs_bf16_conv_peak"] = r["gflops_per_s"] / peak["gflops_per_s"]
        results[name] = r
        log(f"  {name:>20}: {r['images_per_s']:8.2f} img/s  {r['gflops_per_s']:8.1f} GFLOP/s  "
            f"MFU {100 * r['mfu_vs_bf16_conv_peak']:5.1f}%  ({r['steps']} steps, warm-up {r['warmup_s']:.1f}s)")
    ratio = results["bf16_channels_last"]["images_per_s"] / results["fp32_nchw"]["images_per_s"]
    log(f"  speed-up bf16+channels_last / fp32 NCHW: {ratio:.2f}x")
    return {
        "bench": "step", "config": cfg.__dict__, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "step_gflop": flops / 1e9, "peak": peak,
        "variants": results, "speedup_bf16_cl_over_fp32": ratio,
    }
