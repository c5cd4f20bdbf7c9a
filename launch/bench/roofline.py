"""Where a training step's time goes, and the most a device could make of it: each op's FLOPs and bytes, a roofline.

One stage-2 step of ``bench step`` (the cascade, the frozen priors, eq. (4), backward, fused Adam; bf16 autocast +
channels_last where a GPU is the target) is run once under a dispatch mode that records, for every aten op that
computes (views are free), its FLOPs (torch's own FLOP formulas, ``torch.utils.flop_counter``) and the bytes of
its distinct input and output tensors. Per op class (``conv``, ``norm``, ``activation``, ``matmul``, …) that gives a
roofline bound on a target: each op takes at least ``max(FLOPs / peak, bytes / bandwidth)``. Two bounds on the
step's MFU follow:

* **every op its own kernel**: the sum of those per-op times, each tensor read from and written to memory once
  per op (eager PyTorch, or a compiler that fuses nothing); a cache that keeps a tensor between two kernels (an
  H100/H200 has 50 MB of L2; a 192² map of 32 bf16 channels for 8 faces is 19 MB) can beat it somewhat;
* **convolutions only**: every other op fused into them (its FLOPs still done, its memory traffic gone): what
  the convolutions' own arithmetic intensity allows.

The target is a GPU from the datasheet tables (``--gpu H200``: its dense bf16 peak and its memory bandwidth), or
the device it runs on: on CUDA the same tables; on the CPU this machine's measured conv peak (for the precision
``auto`` picks) and measured copy bandwidth. Where the target is the device it runs on, one more step runs under
torch.profiler and each class's measured time (the ops' own device time; on the CPU their own CPU time) stands
beside its bound, with the step's wall time, its MFU and its share of the bound's speed: which classes are far from
their roofline is where a faster step has to come from.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from facesr.hardware import conv_peak, machine_info, memory_bandwidth, synchronize, use_device
from facesr.models import PRESETS
from facesr.step import Precision, TermSums, resolve_precision, to_device

from .step import NOMINAL_BF16_TFLOPS, StepBench, _batch, _setup, _step, lookup

# Memory bandwidth from the datasheets, TB/s; the most specific name first (as NOMINAL_BF16_TFLOPS).
NOMINAL_TBPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("gb200",), 8.0), (("b200",), 8.0), (("b100",), 8.0),
    (("h200",), 4.8), (("h100", "nvl"), 3.9), (("h100", "pcie"), 2.0), (("h100",), 3.35),  # H100 SXM
    (("a100", "40gb"), 1.555), (("a100",), 2.039), (("a10g",), 0.6), (("a10",), 0.6),
    (("l40s",), 0.864), (("l40",), 0.864), (("l4",), 0.3), (("a40",), 0.696), (("a30",), 0.933),
)
# aten ops that move nothing: besides views (``OpOverload.is_view``), these
FREE = {"aten::detach", "aten::lift_fresh", "aten::_unsafe_view", "aten::alias", "aten::empty", "aten::empty_strided",
        "aten::empty_like", "aten::zeros", "aten::ones"}
MATMUL = {"mm", "bmm", "addmm", "baddbmm", "matmul", "linear", "_scaled_mm"}
CLASSES = ("conv", "norm", "activation", "matmul", "pool/shuffle", "copy/cast", "optimizer", "elementwise/other")


def op_class(name: str) -> str:
    """The class of an aten op name (``aten::convolution_backward`` -> ``conv``)."""
    op = name.split("::")[-1].split(".")[0]
    if "convolution" in op:
        return "conv"
    if "norm" in op:
        return "norm"
    if op.strip("_") in MATMUL:
        return "matmul"
    if any(k in op for k in ("relu", "threshold", "prelu", "sigmoid", "gelu", "silu")):
        return "activation"
    if any(k in op for k in ("pool", "pixel_shuffle", "pixel_unshuffle")):
        return "pool/shuffle"
    if any(k in op for k in ("adam", "_foreach")):
        return "optimizer"
    if op.strip("_") in ("to_copy", "copy", "copy_", "cat", "clone", "contiguous", "stack"):
        return "copy/cast"
    return "elementwise/other"


def _nbytes(tensors) -> int:
    seen: dict[tuple, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            seen.setdefault((t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype),
                            t.numel() * t.element_size())
    return sum(seen.values())


class OpCosts(TorchDispatchMode):
    """Every computing aten op called inside: (name, FLOPs, bytes read + written)."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._schema.name
        if func.is_view or name in FREE:
            return out
        packet = func.overloadpacket
        flops = flop_registry[packet](*args, **kwargs, out_val=out) if packet in flop_registry else 0
        read, written = _nbytes(tree_flatten((args, kwargs))[0]), _nbytes(tree_flatten(out)[0])
        self.ops.append((name, int(flops), read + written))
        return out


def measured_by_class(step, device: torch.device) -> dict[str, float]:
    """Seconds each op class spent in one ``step``: the aten ops' own device time on CUDA, own CPU time here."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        step()
        synchronize(device)
    out: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        if e.key.startswith("aten::"):
            us = e.self_device_time_total if cuda else e.self_cpu_time_total
            out[op_class(e.key)] += us / 1e6
    return dict(out)


def target_of(device: torch.device, gpu: str | None, precision: Precision, peak_seconds: float) -> dict:
    """Peak FLOP/s and bytes/s of the roofline's target (module docstring)."""
    name = gpu or (torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    if name:
        tf, tb = lookup(NOMINAL_BF16_TFLOPS, name), lookup(NOMINAL_TBPS, name)
        if tf is None or tb is None:
            raise ValueError(f"--gpu {name!r}: not in the datasheet tables (launch/bench/step.py, roofline.py); "
                             f"known: {', '.join(' '.join(k) for k, _ in NOMINAL_TBPS)}")
        return {"name": name, "flops_per_s": tf * 1e12, "bytes_per_s": tb * 1e12, "source": "datasheet, bf16 dense"}
    peak = conv_peak(peak_seconds, bf16=precision.bf16, device=str(device))
    bw = memory_bandwidth(peak_seconds, device=str(device))
    return {"name": machine_info(device)["cpu"], "flops_per_s": peak["gflops_per_s"] * 1e9,
            "bytes_per_s": bw["gbytes_per_s"] * 1e9,
            "source": f"measured here: {peak['dtype']} conv peak ({peak['shape']}), copy bandwidth"}


def roofline(preset: str = "paper", batch: int = 8, device: str = "cpu", gpu: str | None = None,
             seconds: float = 3.0, peak_seconds: float = 1.0, log=print) -> dict:
    dev = use_device(device)
    on_target = gpu is None  # the measured half applies only to the device this runs on
    precision = Precision(bf16=True, channels_last=True) if gpu or dev.type == "cuda" else \
        resolve_precision("auto", dev)
    target = target_of(dev, gpu, precision, peak_seconds)  # first: a GPU without a datasheet is refused at once
    cfg = StepBench(preset=preset, batch=batch, device=str(dev))
    net, model, loss_fn, opt = _setup(cfg, precision)
    data = to_device(_batch(batch, cfg.classes, torch.Generator().manual_seed(0)), dev, precision)
    sums = TermSums()

    def step():
        _step(model, loss_fn, opt, data, precision, sums)

    for _ in range(2):  # optimizer state, cuDNN's autotuning, allocator
        step()
    synchronize(dev)
    with OpCosts() as costs:
        step()
    P, B = target["flops_per_s"], target["bytes_per_s"]
    classes = {c: {"ops": 0, "gflop": 0.0, "gbytes": 0.0, "bound_ms": 0.0} for c in CLASSES}
    for name, flops, nbytes in costs.ops:
        c = classes[op_class(name)]
        c["ops"] += 1
        c["gflop"] += flops / 1e9
        c["gbytes"] += nbytes / 1e9
        c["bound_ms"] += max(flops / P, nbytes / B) * 1e3
    classes = {k: v for k, v in classes.items() if v["ops"]}
    flops = sum(f for _, f, _ in costs.ops)
    every_op = sum(c["bound_ms"] for c in classes.values())
    conv_flops = sum(f for name, f, _ in costs.ops if op_class(name) == "conv")
    conv_only = classes.get("conv", {}).get("bound_ms", 0.0) + (flops - conv_flops) / P * 1e3  # the rest: FLOPs only
    bound = {"every_op_ms": every_op, "mfu_max_every_op": flops / P / (every_op / 1e3),
             "conv_only_ms": conv_only, "mfu_max_conv_only": flops / P / (conv_only / 1e3),
             "flops_only_ms": flops / P * 1e3}
    measured = None
    if on_target:
        by_class = measured_by_class(step, dev)
        for k, c in classes.items():
            c["measured_ms"] = by_class.get(k, 0.0) * 1e3
            c["achieved_tflops"] = c["gflop"] / c["measured_ms"] if c["measured_ms"] else None
        n, t0 = 0, time.perf_counter()
        while n < 3 or time.perf_counter() - t0 < seconds:
            step()
            n += 1
        synchronize(dev)
        step_s = (time.perf_counter() - t0) / n
        measured = {"step_ms": step_s * 1e3, "ops_ms": sum(by_class.values()) * 1e3, "steps": n,
                    "mfu": flops / P / step_s, "of_every_op_bound": every_op / 1e3 / step_s}
    out = {"bench": "roofline", "preset": preset, "batch": batch, "precision": precision.name,
           "device": str(dev), "torch": torch.__version__, "target": target, "ops": len(costs.ops),
           "step_gflop": flops / 1e9, "step_gbytes": sum(b for *_, b in costs.ops) / 1e9, "classes": classes,
           "bound": bound, "measured": measured}
    _print(out, log)
    return out


def _print(r: dict, log) -> None:
    t = r["target"]
    log(f"[{r['preset']}] batch {r['batch']}, {r['precision']}: {r['ops']} ops, {r['step_gflop']:.1f} GFLOP, "
        f"{r['step_gbytes']:.2f} GB moved if each op is its own kernel ({r['step_gflop'] / r['step_gbytes']:.0f} "
        f"FLOP/byte); target {t['name']}: {t['flops_per_s'] / 1e12:.1f} TFLOP/s, {t['bytes_per_s'] / 1e12:.2f} "
        f"TB/s ({t['source']})")
    m = r["measured"]
    log(f"  {'class':>17} {'ops':>5} {'GFLOP':>8} {'GB':>7} {'bound ms':>9}"
        + (f" {'measured ms':>11} {'TFLOP/s':>8}" if m else ""))
    for k, c in sorted(r["classes"].items(), key=lambda kv: -kv[1].get("measured_ms", kv[1]["bound_ms"])):
        line = f"  {k:>17} {c['ops']:5d} {c['gflop']:8.1f} {c['gbytes']:7.3f} {c['bound_ms']:9.3f}"
        if m:
            ach = f"{c['achieved_tflops']:8.2f}" if c["achieved_tflops"] else f"{'-':>8}"
            line += f" {c['measured_ms']:11.3f} {ach}"
        log(line)
    b = r["bound"]
    log(f"  bound, every op its own kernel: {b['every_op_ms']:.3f} ms -> MFU at most "
        f"{100 * b['mfu_max_every_op']:.1f}%; convolutions only: {b['conv_only_ms']:.3f} ms -> at most "
        f"{100 * b['mfu_max_conv_only']:.1f}%")
    if m:
        log(f"  measured: {m['step_ms']:.2f} ms a step (ops {m['ops_ms']:.2f} ms in the profiled one), MFU "
            f"{100 * m['mfu']:.1f}%, {100 * m['of_every_op_bound']:.0f}% of the every-op bound's speed")


def configure(p) -> None:
    p.add_argument("--preset", default="paper", choices=sorted(PRESETS))
    p.add_argument("--batch", type=int, default=8, help="images a device per step (scale.yaml's: 8)")
    p.add_argument("--device", default="cpu", help="where the step runs: cpu, or cuda where a GPU is present")
    p.add_argument("--gpu", default=None, help="a GPU of the datasheet tables as the target (H200, H100, A100 …): "
                                               "its bounds from the step counted here, nothing measured")
    p.add_argument("--seconds", type=float, default=3.0, help="timed steps for the measured step time")
    p.add_argument("--out", default=None, help="JSON path (default bench/roofline-<preset>-<target>.json)")


def run(args) -> int:
    r = roofline(args.preset, args.batch, args.device, args.gpu, args.seconds)
    tag = (args.gpu or args.device).lower().replace(" ", "-")
    out = Path(args.out or f"bench/roofline-{args.preset}-{tag}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=2))
    print(f"wrote {out}")
    return 0
