"""The stages of ``python -m launch.gpu_check``, each run in a process of its own; each returns a JSON-able dict.

They import only what a bare GPU host has (torch, torchvision, numpy, PIL, safetensors, yaml, prometheus-client,
pyarrow) plus what ``make gpu-pack`` brought (DeepSpeed, WebDataset); a stage that needs more is skipped by
``launch.gpu_check`` before it starts.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def driver(device: str) -> dict:
    """nvidia-smi answers, torch is a CUDA build that sees the GPU and runs an op there, and the driver is new
    enough for torch's CUDA (CUDA 13: R580). On the CPU: the machine, as the figures depend on it."""
    from facesr.hardware import cuda_status, machine_info

    if device == "cpu":
        return {"machine": machine_info("cpu"), "torch": torch.__version__, "cuda": torch.version.cuda}
    from cluster.gpu_check import driver_problem

    status = cuda_status()
    smi = status["nvidia_smi"].splitlines()[0] if status["nvidia_smi"] else ""
    parts = [p.strip() for p in smi.split(",")]
    problems = list(status["problems"])
    if len(parts) >= 2 and (p := driver_problem(parts[1], torch.version.cuda)):
        problems.append(p)
    if problems:
        raise RuntimeError("; ".join(problems))
    props = torch.cuda.get_device_properties(0)
    return {"nvidia_smi": status["nvidia_smi"], "torch": torch.__version__, "cuda": torch.version.cuda,
            "devices": status["devices"], "gpu": props.name, "capability": f"{props.major}.{props.minor}",
            "memory_gib": props.total_memory / 2**30, "machine": machine_info("cuda")}


def step(device: str, preset: str, mode: str, batch: int, seconds: float) -> dict:
    """``facesr bench step`` of one preset in one engine.step_compile mode: img/s, MFU against the measured conv
    peak and the nominal bf16 peak, launches per step."""
    from launch.bench.step import StepBench, run_bench

    r = run_bench(StepBench(preset=preset, batch=batch, seconds=seconds, device=device, modes=(mode,),
                            peak_seconds=1.0, warmup=3))
    (name, v), = r["variants"].items()
    keep = ("images_per_s", "step_s", "gflops_per_s", "mfu", "mfu_nominal", "launches", "graph_launches",
            "kernels", "peak_memory_gib", "warmup_s", "steps")
    return {"variant": name, "batch": batch, "step_gflop": r["step_gflop"], "nominal_bf16_peak": r["nominal_bf16_peak"],
            "conv_peak_gflops": r["peaks"]["bf16"]["gflops_per_s"], "host_syncs_per_step": r["host_syncs_per_step"],
            **{k: v[k] for k in keep if k in v}}


def roofline(device: str, preset: str, batch: int) -> dict:
    """`facesr bench roofline` on this device: each op class's FLOPs, bytes, roofline bound and measured time, the
    step's MFU beside the most it could be with each op its own kernel and with the convolutions alone."""
    from launch.bench.roofline import roofline as run

    r = run(preset, batch, device, seconds=2.0)
    m, b = r["measured"], r["bound"]
    return {"preset": preset, "batch": batch, "target": r["target"], "mfu": m["mfu"], "step_ms": m["step_ms"],
            "mfu_max_every_op": b["mfu_max_every_op"], "mfu_max_conv_only": b["mfu_max_conv_only"],
            "of_every_op_bound": m["of_every_op_bound"], "classes": r["classes"]}


class PlainEngine:
    """What DeepSpeed ZeRO-0 does on one GPU, in plain PyTorch: loss scaled by 1/accumulation, the optimizer
    stepped at the accumulation boundary. The worker's ``train_step`` runs on it unchanged."""

    def __init__(self, module: torch.nn.Module, accumulation: int, lr: float):
        self.module, self.accumulation, self.micro = module, accumulation, 0
        self.optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=lr, fused=True)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation).backward()

    def step(self) -> None:
        self.micro += 1
        if self.micro % self.accumulation == 0:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)


def _priors(tmp: Path, preset: str, classes: list[str]) -> Path:
    from facesr.models import build_prior, get_preset
    from facesr.vocab import TARGETS
    from facesr.weights import save_priors

    prior = get_preset(preset).prior
    path = tmp / "priors.safetensors"
    save_priors(path, {k: build_prior(prior, len(classes)) for k in TARGETS}, prior, classes)
    return path


def _worker_setup(device: str, shards: str, tmp: Path, preset: str, batch: int, micro: int, extra=()):
    """The demo config's stage 2 (robust degradation, cascade + identity priors, precision auto) on ``device``."""
    from cluster.config import load_config
    from cluster.stages import SRStage
    from facesr.hardware import use_device
    from facesr.step import resolve_precision

    manifest = Path(shards) / "manifest.json" if shards else None
    classes = json.loads(manifest.read_text())["classes"] if manifest and manifest.is_file() else \
        [f"id{i}" for i in range(16)]
    over = [f"preset={preset}", "run.stages=[2]", f"stage2.batch_size={batch}", f"stage2.max_micro_batch={micro}",
            f"stage2.priors={_priors(tmp, preset, classes)}", f"cluster.use_gpu={str(device != 'cpu').lower()}",
            "cluster.num_workers=1", "data.loader_workers=1", "data.shuffle_buffer=64", *extra]
    if shards:
        over.append(f"data.shards={shards}")
    cfg = load_config(ROOT / "launch/configs/demo.yaml", over)
    dev = use_device(device)  # as the worker loop: cuDNN's autotuner on
    precision = resolve_precision(cfg.engine.precision, dev)
    torch.manual_seed(0)
    return cfg, classes, dev, precision, SRStage(cfg, classes, dev, precision)


def _batches(cfg, micro: int, device: str, n: int, have_loader: bool):
    """``n`` micro-batches as the worker gets them: the real loader over the packed shards (pinned uint8 on CUDA),
    or, without WebDataset, uint8 batches made here and pinned the same way."""
    if have_loader:
        from cluster.data import build_loader

        it = iter(build_loader(cfg, 2, "train", micro, 0, 1, 0))
        out = [next(it) for _ in range(n)]
        return out, "shards.stream loader over the packed shards"
    from facesr.vocab import SIZES

    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        b = {k: torch.randint(0, 256, (micro, 3, SIZES[k], SIZES[k]), dtype=torch.uint8, generator=g)
             for k in ("x2", "x4", "hr")}
        b["cls"] = torch.randint(-1, 8, (micro,), generator=g)
        out.append({k: v.pin_memory() for k, v in b.items()} if device != "cpu" else b)
    return out, "uint8 batches made here and pinned (WebDataset or the packed shards absent)"


def worker_step(device: str, shards: str, steps: int, preset: str, batch: int, micro: int, loader: bool,
                compile_mode: str = "off") -> dict:
    """The worker's ``train_step`` (robust degradation on the device, precision auto, cascade + frozen priors,
    accumulation) on the loader's pinned uint8 batches: on CUDA under ``torch.cuda.set_sync_debug_mode("error")``
    (any device sync raises), on the CPU counted by ``facesr.syncs.SyncCounter``. ``compile_mode``: the
    stage's forward as ``engine.step_compile`` would compile it (the worker loop's path to CUDA graphs)."""
    from cluster.loop import train_step
    from facesr.step import TermSums, compile_forward
    from facesr.syncs import SyncCounter

    with tempfile.TemporaryDirectory() as tmp:
        cfg, _, dev, precision, stage = _worker_setup(device, shards, Path(tmp), preset, batch, micro)
        model = stage.build_model().to(dev)
        accum = batch // micro
        eng = PlainEngine(model, accum, stage.stage_cfg.lr)
        groups = steps + 2
        data, source = _batches(cfg, micro, device, groups * accum, loader)
        sums = TermSums()
        forward = compile_forward(stage.forward, compile_mode) if compile_mode != "off" else None
        t_warm = time.perf_counter()
        for i in range(2):  # warm-up: cuDNN autotuning, optimizer state, cached kernels and matrices, compiling
            train_step(eng, stage, data[i * accum:(i + 1) * accum], sums, dev, precision, (0, 0, 0, i * accum),
                       forward=forward)
        sums.mean()
        if device != "cpu":
            torch.cuda.synchronize()
        warm_s = time.perf_counter() - t_warm
        counter = SyncCounter() if device == "cpu" else None
        t0 = time.perf_counter()
        if device == "cpu":
            counter.__enter__()
        else:
            torch.cuda.set_sync_debug_mode("error")
        try:
            for i in range(2, groups):
                train_step(eng, stage, data[i * accum:(i + 1) * accum], sums, dev, precision, (0, 0, 0, i * accum),
                           forward=forward)
        finally:
            if device == "cpu":
                counter.__exit__(None, None, None)
            else:
                torch.cuda.set_sync_debug_mode("default")
        terms = sums.mean()  # the log step's one transfer, after the checked steps
        dt = time.perf_counter() - t0
    if counter is not None and counter.total:
        raise RuntimeError(f"{counter.total} host syncs in {steps} steps: {sorted(set(counter.where))[:10]}")
    return {"steps": steps, "batch": batch, "micro_batch": micro, "preset": preset, "precision": precision.name,
            "degradation": "robust", "batches": source, "host_syncs": 0, "images_per_s": steps * batch / dt,
            "loss": terms["loss"], "compile": compile_mode, "warmup_s": warm_s}


def deepspeed_engine(device: str, shards: str) -> dict:
    """A one-process DeepSpeed engine (NCCL on CUDA, gloo on the CPU) around the cascade: two steps, save, a
    second engine from other weights loads the checkpoint and holds the same weights and optimizer state; one
    more step on each gives the same weights again."""
    from cluster.engine import initialize, load, save
    from cluster.gpu_check import init_one_rank
    from cluster.loop import train_step
    from facesr.step import TermSums

    version = init_one_rank("nccl" if device != "cpu" else "gloo")
    with tempfile.TemporaryDirectory() as tmp:
        cfg, _, dev, precision, stage = _worker_setup(device, shards, Path(tmp), "tiny", 8, 4)
        data, _ = _batches(cfg, 4, device, 6, False)

        def engine(seed: int):
            torch.manual_seed(seed)
            return initialize(stage.build_model().to(dev), stage.stage_cfg, cfg.engine, 1)[0]

        a = engine(0)
        for i in range(2):
            train_step(a, stage, data[2 * i:2 * i + 2], TermSums(), dev, precision, (0, 0, 0, 2 * i))
        save(a, f"{tmp}/ckpt", {"train_state": {"global_step": 2}})
        b = engine(1)
        client = load(b, f"{tmp}/ckpt")

        def same(x, y) -> bool:
            sx, sy = x.module.state_dict(), y.module.state_dict()
            return sx.keys() == sy.keys() and all(torch.equal(sx[k], sy[k]) for k in sx)

        loaded = same(a, b) and client["train_state"]["global_step"] == 2
        for e in (a, b):
            train_step(e, stage, data[4:6], TermSums(), dev, precision, (0, 0, 0, 4))
        resumed = same(a, b)
    if not (loaded and resumed):
        raise RuntimeError(f"checkpoint round trip: same weights after load {loaded}, after a step more {resumed}")
    return {"backend": "nccl" if device != "cpu" else "gloo", "deepspeed": version,
            "same_weights_after_load": loaded, "same_weights_after_a_step_more": resumed}
