"""Training step: fp32 NCHW against bf16 autocast + channels_last, MFU against the machine's conv peak.

A step is what stage 2 does per batch: SR forward, three frozen priors on the
SR residuals, the loss of eq. (4), backward, Adam step. FLOPs per step are
counted by PyTorch's FlopCounterMode over a real step (forward + backward),
so achieved GFLOP/s and MFU use the same work definition.

The issue's targets (bf16 + channels_last ≥ 5× the fp32 NCHW step, ≥ 40 % of
the bf16 conv peak) depend on the machine: with AMX tiles bf16 convolutions run
several times faster than fp32; with AVX512-BF16 alone at most about twice as
fast. So the JSON records the CPU and its ISA, both conv peaks, and the highest
speed-up this machine permits (bf16 peak over the fp32 step's achieved rate):
a target above that bound cannot be met by any tuning of the bf16 step.

On a GPU two more figures matter (issue 24). MFU against the device's **nominal** dense bf16 peak (its
datasheet, ``NOMINAL_BF16_TFLOPS``) beside the measured-conv one, which a launch-bound step would flatter.
And the **launches** a step makes: ``--compile`` adds the step compiled by inductor (``compiled``) and, on
CUDA, in CUDA graphs (``cudagraph``), and every variant reports its launches per step, counted by
torch.profiler: on CUDA the kernel and copy launches and graph replays the host issues; on a CPU the ops
that compute (aten ops with no computing op inside, views and allocations left out, and inductor's fused
kernels), so the gain from fusion shows without a GPU.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from facesr.hardware import conv_peak, machine_info, synchronize, use_device
from facesr.losses import CSRIPLoss
from facesr.models import PRESETS, FrozenPrior, SRNet, build_prior, get_preset
from facesr.step import Precision, TermSums, compile_forward, resolve_precision, sr_forward, to_device
from facesr.syncs import SyncCounter
from facesr.vocab import SIZES, TARGETS


@dataclass
class StepBench:
    preset: str = "tiny"
    batch: int = 8  # the paper's stage-2 batch
    classes: int = 1000  # prior classes (head size only changes a 1×1 conv)
    seconds: float = 10.0  # measuring time per variant, after warm-up
    warmup: int = 2
    compile: bool = False  # also the auto variant's step compiled (inductor), and on CUDA in CUDA graphs
    threads: int = 0  # torch threads; 0 = PyTorch's default
    device: str = "cpu"  # "cuda" where a GPU is present: the same step, autocast on the GPU
    peak_seconds: float = 3.0  # measuring time per conv peak
    auto_only: bool = False  # only the precision auto picks here (and its compiled forms), not the fp32 baselines
    modes: tuple[str, ...] = ()  # only auto's step in these engine.step_compile modes (gpu_check: one per process)


TARGETS_PAPER = {"speedup_min": 5.0, "mfu_min": 0.40}  # issue 2, for the paper preset (AMX-class CPUs)
TARGET_OWN_PEAK = 0.60  # issue 13: the paper step's share of the chosen dtype's conv peak
TARGET_NOMINAL_GPU = 0.40  # issue 24: the paper step's share of an H100/H200's nominal bf16 peak

# Dense bf16 tensor throughput from the datasheets, TFLOP/s (sparsity halved away); the most specific name first.
NOMINAL_BF16_TFLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("gb200",), 2500.0), (("b200",), 2250.0), (("b100",), 1800.0),
    (("h200", "nvl"), 836.0), (("h200",), 989.4),  # H200 SXM
    (("h100", "nvl"), 835.0), (("h100", "pcie"), 756.0), (("h100",), 989.4),  # H100 SXM
    (("a100",), 312.0), (("a10g",), 125.0), (("a10",), 125.0),  # A10G: AWS's A10; NVIDIA gives the A10's figure only
    (("l40s",), 362.0), (("l40",), 181.0), (("l4",), 121.0), (("a40",), 149.7), (("a30",), 165.0),
)
# aten ops that launch no kernel: views, metadata, allocation, no-op conversions
NO_KERNEL = {"aten::view", "aten::_unsafe_view", "aten::reshape", "aten::_reshape_alias", "aten::as_strided",
             "aten::detach", "aten::detach_", "aten::t", "aten::transpose", "aten::permute", "aten::expand",
             "aten::expand_as", "aten::unsqueeze", "aten::squeeze", "aten::select", "aten::slice", "aten::narrow",
             "aten::split", "aten::chunk", "aten::unbind", "aten::alias", "aten::lift_fresh", "aten::to",
             "aten::contiguous", "aten::flatten", "aten::view_as", "aten::type_as", "aten::resize_",
             "aten::result_type", "aten::set_", "aten::split_with_sizes", "aten::numpy_T", "aten::is_nonzero"}
CUDA_LAUNCHES = {"cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
                 "cudaGraphLaunch", "cudaMemcpyAsync", "cudaMemsetAsync"}


def nominal_bf16_peak(device: str | torch.device) -> tuple[str, float] | None:
    """(device name, dense bf16 FLOP/s) from the datasheet table, or None (a CPU, or a GPU not in the table)."""
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    tf = lookup(NOMINAL_BF16_TFLOPS, name)
    return None if tf is None else (name, tf * 1e12)


def lookup(table: tuple[tuple[tuple[str, ...], float], ...], name: str) -> float | None:
    """The value of the first row of a datasheet table whose keys all occur in ``name`` (any case), or None."""
    low = name.lower()
    return next((v for keys, v in table if all(k in low for k in keys)), None)


def _computing(e) -> bool:
    if e.name.startswith(("cpp_fused", "triton_", "cpp_kernel")):
        return True
    return e.name.startswith("aten::") and e.name not in NO_KERNEL and not e.name.startswith("aten::empty")


def launches_per_step(step, device: str | torch.device) -> dict:
    """What one call of ``step`` launches, counted by torch.profiler (see the module doc)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(device).type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        step()
        synchronize(device)
    events = prof.events()
    if cuda:
        names = [e.name for e in events]
        return {"launches": sum(n in CUDA_LAUNCHES for n in names),
                "graph_launches": names.count("cudaGraphLaunch"),
                "kernels": sum(e.device_type == torch.autograd.DeviceType.CUDA for e in events)}
    counted: dict[int, bool] = {}

    def visit(e) -> bool:  # e computes and nothing inside it does: one kernel; returns whether e's tree has one
        inner = [visit(c) for c in e.cpu_children]
        counted[e.id] = _computing(e) and not any(inner)
        return counted[e.id] or any(inner)

    for e in events:
        if e.cpu_parent is None:
            visit(e)
    return {"launches": sum(counted.values())}


def _batch(n: int, classes: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    b = {k: torch.rand(n, 3, s, s, generator=gen) for k, s in SIZES.items()}
    b["cls"] = torch.randint(0, classes, (n,), generator=gen)
    return b


def _setup(cfg: StepBench, precision: Precision):
    torch.manual_seed(0)
    p = get_preset(cfg.preset)
    net = precision.module(SRNet(p.sr).to(cfg.device))
    priors = {k: FrozenPrior(precision.module(build_prior(p.prior, cfg.classes))) for k in TARGETS}
    loss_fn = CSRIPLoss(priors, alpha=0.001).to(cfg.device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, fused=True)  # as the training engine builds it
    return net, net, loss_fn, opt


def _step(model, loss_fn, opt, batch, precision, sums: TermSums, forward=None) -> None:
    terms = forward(model, batch) if forward else sr_forward(model, loss_fn, batch, precision)
    opt.zero_grad(set_to_none=True)
    terms["loss"].backward()
    opt.step()
    sums.add(terms)  # on the device, as in training: no host sync per step


def _naive_step(model, loss_fn, opt, batch, precision) -> dict:
    """The step as it was written before: every term read to the host (float) every step."""
    terms = sr_forward(model, loss_fn, batch, precision)
    opt.zero_grad(set_to_none=True)
    terms["loss"].backward()
    opt.step()
    return {k: float(v.detach()) for k, v in terms.items()}


def host_syncs_per_step(cfg: "StepBench", steps: int = 2) -> dict:
    """Host synchronisations per step: this step, and the naive one (per-term float(), for-each Adam)."""
    prec = resolve_precision("fp32", cfg.device)
    out = {}
    for name, fused in (("naive", False), ("facesr", True)):
        net, model, loss_fn, opt = _setup(StepBench(**{**cfg.__dict__, "compile": False}), prec)
        if not fused:
            opt = torch.optim.Adam(net.parameters(), lr=1e-4, foreach=True)
        batch = to_device(_batch(cfg.batch, cfg.classes, torch.Generator().manual_seed(0)), cfg.device, prec)
        sums = TermSums()
        step = (lambda: _step(model, loss_fn, opt, batch, prec, sums)) if fused else \
            (lambda: _naive_step(model, loss_fn, opt, batch, prec))
        step()  # optimizer state is created on the first step
        with SyncCounter(keep_stacks=False) as c:
            for _ in range(steps):
                step()
        out[name] = c.total / steps
    return out


def step_flops(cfg: StepBench) -> int:
    """FLOPs of one training step (forward + backward, priors included) at batch ``cfg.batch``."""
    prec = Precision(bf16=False, channels_last=False)
    net, model, loss_fn, opt = _setup(StepBench(**{**cfg.__dict__, "compile": False}), prec)
    batch = to_device(_batch(cfg.batch, cfg.classes, torch.Generator().manual_seed(0)), cfg.device, prec)
    with FlopCounterMode(display=False) as fc:
        terms = sr_forward(model, loss_fn, batch, prec)
        terms["loss"].backward()
    return fc.get_total_flops()


def time_steps(cfg: StepBench, precision: Precision, mode: str = "off") -> dict:
    """A variant's steps: warm-up (compilation included), launches of one step, then timed steps."""
    net, model, loss_fn, opt = _setup(cfg, precision)
    batch = to_device(_batch(cfg.batch, cfg.classes, torch.Generator().manual_seed(0)), cfg.device, precision)
    sums = TermSums()

    def forward(m, b):
        return sr_forward(m, loss_fn, b, precision)

    if mode != "off" and torch.device(cfg.device).type == "cpu":
        import torch._inductor.config as inductor

        inductor.cpp.enable_kernel_profile = True  # each fused C++ kernel a profiler event, so launches count it
    forward = compile_forward(forward, mode) if mode != "off" else None
    t0 = time.perf_counter()
    for _ in range(cfg.warmup):
        _step(model, loss_fn, opt, batch, precision, sums, forward)
    synchronize(cfg.device)
    warm_s = time.perf_counter() - t0
    launches = launches_per_step(lambda: _step(model, loss_fn, opt, batch, precision, sums, forward), cfg.device)
    n, t0 = 0, time.perf_counter()
    while n < 2 or time.perf_counter() - t0 < cfg.seconds:
        _step(model, loss_fn, opt, batch, precision, sums, forward)
        n += 1
        if n % 10 == 0:
            sums.mean()  # a log step every 10, as in training
    synchronize(cfg.device)
    dt = (time.perf_counter() - t0) / n
    out = {"steps": n, "step_s": dt, "images_per_s": cfg.batch / dt, "warmup_s": warm_s, **launches}
    if torch.device(cfg.device).type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(cfg.device) / 2**30
    out["last_loss"] = sums.mean().get("loss", float("nan"))
    return out


def run_bench(cfg: StepBench, log=print) -> dict:
    use_device(cfg.device, cfg.threads)  # as a worker: cuDNN's autotuner on a GPU (facesr.hardware)
    machine = machine_info(cfg.device)
    log(f"machine: {machine.get('gpu', machine['cpu'])}; ISA {' '.join(machine['isa']) or '?'}; "
        f"{torch.get_num_threads()} threads")
    flops = step_flops(cfg)
    log(f"[{cfg.preset}] step FLOPs at batch {cfg.batch}: {flops / 1e9:.1f} GFLOP "
        f"({flops / cfg.batch / 1e9:.2f}/image)")
    peaks = {name: conv_peak(cfg.peak_seconds, bf16=name == "bf16", device=cfg.device) for name in ("bf16", "fp32")}
    log(f"conv peak: bf16 {peaks['bf16']['gflops_per_s']:.0f} GFLOP/s, fp32 {peaks['fp32']['gflops_per_s']:.0f} "
        f"GFLOP/s ({peaks['bf16']['shape']})")
    auto = resolve_precision("auto", cfg.device)
    nominal = nominal_bf16_peak(cfg.device)
    if torch.device(cfg.device).type == "cuda":
        log("nominal dense bf16 peak: " + (f"{nominal[1] / 1e12:.0f} TFLOP/s ({nominal[0]})" if nominal else
                                            f"{torch.cuda.get_device_name(cfg.device)} not in the table"))
    variants = {
        "fp32_nchw": Precision(bf16=False, channels_last=False),
        "fp32_channels_last": Precision(bf16=False, channels_last=True),
        "bf16_channels_last": Precision(bf16=True, channels_last=True),
    }
    auto_name = {v: k for k, v in variants.items()}[auto]
    suffix = {"off": "", "default": "_compiled", "reduce-overhead": "_cudagraph"}
    runs = [(name, prec, "off") for name, prec in variants.items() if not cfg.auto_only or name == auto_name]
    if cfg.compile:  # the step the workers would run with engine.step_compile
        runs.append((f"{auto_name}_compiled", auto, "default"))
        if torch.device(cfg.device).type == "cuda":
            runs.append((f"{auto_name}_cudagraph", auto, "reduce-overhead"))
    if cfg.modes:
        runs = [(auto_name + suffix[mode], auto, mode) for mode in cfg.modes]
    results = {}
    for name, prec, mode in runs:
        r = time_steps(cfg, prec, mode)
        r["compile"] = mode
        r["gflops_per_s"] = flops / r["step_s"] / 1e9
        # MFU against the peak of the dtype this variant computes in: never the other dtype's
        r["mfu"] = r["gflops_per_s"] / peaks["bf16" if prec.bf16 else "fp32"]["gflops_per_s"]
        if nominal and prec.bf16:
            r["mfu_nominal"] = r["gflops_per_s"] * 1e9 / nominal[1]
        results[name] = r
        log(f"  {name:>30}: {r['images_per_s']:8.2f} img/s  {r['gflops_per_s']:8.1f} GFLOP/s  "
            f"MFU {100 * r['mfu']:5.1f}% of measured {'bf16' if prec.bf16 else 'fp32'} conv peak"
            + (f", {100 * r['mfu_nominal']:5.1f}% of nominal" if "mfu_nominal" in r else "")
            + f"  {r['launches']} launches/step ({r['steps']} steps, warm-up {r['warmup_s']:.1f}s)")
    first = results[runs[0][0]]
    base = results.get("fp32_nchw", first)["images_per_s"]
    for name, r in results.items():
        r["speedup_over_fp32_nchw"] = r["images_per_s"] / base
    log(f"  precision auto on this machine: {auto.name} ({auto_name}), "
        f"{results.get(auto_name, first)['speedup_over_fp32_nchw']:.2f}x fp32 NCHW; fastest measured: "
        f"{max(results, key=lambda k: results[k]['images_per_s'])}")
    syncs = host_syncs_per_step(cfg)
    log(f"  host synchronisations per step: {syncs['naive']:.0f} naive (float per term, for-each Adam) -> "
        f"{syncs['facesr']:.0f} (terms on the device, fused Adam)")
    ratio = results.get("bf16_channels_last", first)["images_per_s"] / base
    bound = peaks["bf16"]["gflops_per_s"] / results.get("fp32_nchw", first)["gflops_per_s"]
    mfu_auto = results.get(auto_name, first)["mfu"]
    targets = None
    if cfg.preset == "paper" and nominal:
        best = max((r.get("mfu_nominal", 0.0), k) for k, r in results.items())
        targets = {"nominal_mfu_min": TARGET_NOMINAL_GPU, "best_variant": best[1], "nominal_mfu": best[0],
                   "nominal_mfu_met": best[0] >= TARGET_NOMINAL_GPU}
        log(f"  target: >= {100 * TARGET_NOMINAL_GPU:.0f}% of the nominal bf16 peak: {100 * best[0]:.1f}% "
            f"({best[1]}) {'met' if targets['nominal_mfu_met'] else 'NOT met'}")
    elif cfg.preset == "paper" and not (cfg.auto_only or cfg.modes):
        targets = {**TARGETS_PAPER, "own_peak_min": TARGET_OWN_PEAK,
                   "speedup_met": ratio >= TARGETS_PAPER["speedup_min"],
                   "speedup_attainable_here": bound >= TARGETS_PAPER["speedup_min"],
                   "mfu_met": results["bf16_channels_last"]["mfu"] >= TARGETS_PAPER["mfu_min"],
                   "auto_own_peak_met": mfu_auto >= TARGET_OWN_PEAK}
        log(f"  target: auto's share of its dtype's conv peak >= {100 * TARGET_OWN_PEAK:.0f}%: "
            f"{100 * mfu_auto:.1f}% {'met' if targets['auto_own_peak_met'] else 'NOT met'}")
    return {
        "bench": "step", "config": cfg.__dict__, "torch": torch.__version__, "machine": machine,
        "threads": torch.get_num_threads(), "step_gflop": flops / 1e9, "peaks": peaks,
        "nominal_bf16_peak": {"device": nominal[0], "tflops": nominal[1] / 1e12} if nominal else None,
        "variants": results, "auto": {"precision": auto.name, "variant": auto_name, "mfu": mfu_auto},
        "host_syncs_per_step": syncs, "speedup_bf16_cl_over_fp32": ratio, "speedup_bound_here": bound,
        "targets": targets,
    }


def configure(p) -> None:
    p.add_argument("--preset", default="paper", choices=sorted(PRESETS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seconds", type=float, default=10.0, help="measuring time per variant")
    p.add_argument("--compile", action="store_true",
                   help="also the step compiled (inductor) and, on CUDA, in CUDA graphs, as engine.step_compile")
    p.add_argument("--auto-only", action="store_true", help="only the precision auto picks (skip fp32 baselines)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, or cuda where a GPU is present")
    p.add_argument("--peak-seconds", type=float, default=3.0, help="measuring time per conv peak")
    p.add_argument("--out", default=None, help="JSON path (default bench/step-<preset>.json)")


def run(args) -> int:
    cfg = StepBench(preset=args.preset, batch=args.batch, seconds=args.seconds,
                    compile=args.compile, threads=args.threads, device=args.device,
                    peak_seconds=args.peak_seconds, auto_only=args.auto_only)
    result = run_bench(cfg)
    out = Path(args.out or f"bench/step-{args.preset}{'-compiled' if args.compile else ''}"
                                f"{'' if args.device == 'cpu' else '-' + args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0
