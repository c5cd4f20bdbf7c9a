"""DeepSpeed wrapping of a module for one worker: config, initialize, checkpoints, per-epoch LR, BatchNorm.

Decisions made here, and why:

* **Optimizer**: ``torch.optim.Adam(fused=True)`` handed to DeepSpeed (DeepSpeed's
  FusedAdam needs CUDA; torch's fused Adam runs on CPU and CUDA and keeps its step
  counter on the device, so the step never waits for the host); ZeRO stages 1-2
  shard its state over the data-parallel ranks.
* **bf16** is autocast (``facesr.step.Precision``) over fp32 weights, not
  DeepSpeed's bf16 mode: BatchNorm statistics, the SSIM loss and Adam's state
  stay fp32, and the same switch works in the plain-PyTorch baseline.
* **Learning rate** is written into the optimizer once per epoch from
  ``StageConfig.lr_at`` (the paper's schedule is in epochs); DeepSpeed gets no
  scheduler, so its step counter never moves the LR.
* **BatchNorm across workers** (``engine.batchnorm``): ``local`` (default)
  normalises with each worker's own micro-batch statistics, like DDP without
  SyncBatchNorm: no extra all-reduce per BN layer per forward (51 of them in the
  paper cascade), and even a micro-batch of one still has ≥ 48² positions per
  channel. DeepSpeed does not broadcast buffers, so running statistics would
  drift apart per rank; ``average_buffers`` all-reduces them at the end of every
  epoch, before validation and checkpoints, so every rank validates and saves
  the same model. ``sync`` normalises over every rank's micro-batch with
  ``cluster.batchnorm.SyncBatchNorm``: torch's SyncBatchNorm waits for the device in
  every BN layer (a boolean mask on the gathered counts); ours gathers each rank's
  mean and variance with equal, host-known counts, reads nothing back, and runs on
  gloo as well.
* **channels_last** lays out activations (the inputs), not weights: ZeRO 1-2
  make every parameter a view of one flat fp32 buffer, and DeepSpeed's
  initial broadcast views parameters as bytes, so NHWC weights are refused;
  convolutions take their layout from the input, so the kernels are the same.
* **Checkpoints** are DeepSpeed's own: every rank writes its ZeRO optimizer
  partition, rank 0 the module; ``SafeCheckpointEngine`` loads them with
  ``torch.load(weights_only=True)`` with only DeepSpeed's three plain record
  types allowed, so a checkpoint can never run code.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from .batchnorm import convert_sync_batchnorm
from .config import EngineConfig, StageConfig, accumulation

TAG = "state"  # DeepSpeed checkpoint tag inside every checkpoint folder


@dataclass(frozen=True)
class Batching:
    global_batch: int  # samples per optimizer step over all workers (the config's batch_size)
    micro_batch: int  # samples per forward on one worker
    accumulation: int  # micro-batches per optimizer step on one worker


def batching(stage_cfg: StageConfig, world_size: int) -> Batching:
    micro, accum = accumulation(stage_cfg.batch_size, world_size, stage_cfg.max_micro_batch)
    return Batching(stage_cfg.batch_size, micro, accum)


def ds_config(engine: EngineConfig, b: Batching) -> dict:
    bucket = int(engine.bucket_mb * 2**20 / 4)  # elements of fp32
    zero = {"stage": engine.zero_stage}
    if engine.zero_stage >= 1:
        # ZeRO-2 reduce-scatters each bucket from backward hooks as soon as it fills (overlap_comm);
        # contiguous gradients avoid fragmentation; the same size bounds the all-gather of ZeRO-1/2.
        zero.update({"reduce_bucket_size": bucket, "allgather_bucket_size": bucket, "reduce_scatter": True,
                     "overlap_comm": engine.overlap_comm and engine.zero_stage == 2, "contiguous_gradients": True})
    cfg = {
        "train_batch_size": b.global_batch,
        "train_micro_batch_size_per_gpu": b.micro_batch,
        "gradient_accumulation_steps": b.accumulation,
        "zero_optimization": zero,
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if engine.grad_clip > 0:
        cfg["gradient_clipping"] = engine.grad_clip
    return cfg


def set_accelerator_env(use_gpu: bool) -> None:
    """Before deepspeed is imported: CPU workers use DeepSpeed's CPU accelerator (gloo).

    On a CPU worker torch's extension builder warns "No CUDA runtime is found" when DeepSpeed loads its CPU
    ops: true and expected there, so that logger speaks only of errors on CPU workers.
    """
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", extensions_dir())


def extensions_dir() -> str:
    """Where DeepSpeed's JIT-built ops live: inside the venv that runs (``<venv>/torch_extensions``), built with
    it by ``make venv`` (``python -m launch.build_ops``) and removed with it. torch's default, one folder per
    user and Python, is shared by every venv of that user: two checkouts' venvs (a second clone, CI's) would
    each find the other's build stale and rebuild it, 20-60 s, at their next start. Outside a venv, torch's
    default."""
    if sys.prefix != sys.base_prefix:
        return str(Path(sys.prefix) / "torch_extensions")
    from torch.utils.cpp_extension import get_default_build_root

    acc = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    return os.path.join(get_default_build_root(), f"py{sys.version_info.major}{sys.version_info.minor}_{acc}")


def build_ops() -> list[str]:
    """Build now the ops ``deepspeed.initialize`` would JIT-build at a run's first start (on the CPU accelerator
    the shared-memory comm op), so a newcomer's first run does not spend its first minute compiling. Returns
    what it built. Built with this environment's ``ninja``, as runs are (cluster.ray_connect puts the
    interpreter's bin folder first on workers' PATH): each ninja version finds the other's build log stale."""
    os.environ["PATH"] = os.pathsep.join(p for p in (str(Path(sys.executable).parent), os.environ.get("PATH")) if p)
    set_accelerator_env(use_gpu=False)
    from deepspeed.accelerator import get_accelerator

    ops, _ = ops_to_build()
    if ops:
        get_accelerator().create_op_builder("ShareMemCommBuilder").load(verbose=False)
    return ops


def ops_to_build() -> tuple[list[str], str]:
    """DeepSpeed ops that ``deepspeed.initialize`` will compile here, and torch's extension cache folder. On the
    CPU accelerator that is the shared-memory comm op: 20-60 s when the cache lacks it (a machine's first
    start) or ninja finds it stale, else it loads at once. Call after ``set_accelerator_env``."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory  # torch's own rule for where it builds

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return [], ""
    folder = Path(_get_build_directory(builder.name, verbose=False))
    built = (folder / f"{builder.name}.so").exists() and _up_to_date(folder)
    return ([] if built else [builder.absolute_name()]), str(folder.parent)


def _up_to_date(folder: Path) -> bool:
    """Whether the ninja that torch will run (the first on PATH) has nothing to rebuild in ``folder``."""
    try:
        dry = subprocess.run(["ninja", "-C", str(folder), "-n"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "no work to do" in dry.stdout


def initialize(model: nn.Module, stage_cfg: StageConfig, engine: EngineConfig, world_size: int):
    """(DeepSpeed engine, Batching) for ``model`` with Adam at the stage's epoch-0 LR."""
    import deepspeed

    b = batching(stage_cfg, world_size)
    if engine.batchnorm == "sync":
        model = convert_sync_batchnorm(model)
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel for all parameters, and the step counter lives on the device (the for-each Adam
    # reads it back to the host with .item() every step); supported on CPU and CUDA.
    opt = torch.optim.Adam(params, lr=stage_cfg.lr, betas=tuple(stage_cfg.betas), weight_decay=stage_cfg.weight_decay,
                           fused=True)
    eng, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(engine, b))
    eng.checkpoint_engine = SafeCheckpointEngine(eng.checkpoint_engine)
    if engine.compile:
        eng.compile()  # compiles the wrapped module in place: parameter names and checkpoints unchanged
    if engine.step_compile != "off":
        drop_forward_hooks(eng)
    return eng, b


def drop_forward_hooks(eng) -> bool:
    """Remove the forward pre- and post-hooks DeepSpeed puts on the module it wraps, before a compiled step
    (``engine.step_compile``) calls that module. For facesr's engines (ZeRO 0-2, autocast its own) the hooks only
    time, profile and log, but under torch.compile they break the graph (``time.time``) and, worse, Dynamo
    guards on the counters they read (the engine's ``micro_steps``, its throughput timer's step count), so the
    step was compiled again as those counted: 4 recompilations in 8 tiny steps on the CPU, each ~140 s for the
    paper preset on an H200, and past Dynamo's limit of 8 the step would have run eagerly. DeepSpeed drops the
    same two hooks for its own compiler (DeepCompile). Kept where they do work: ZeRO-3 (parameter discovery) and
    fp16 auto-cast. Returns whether any hook was removed."""
    if eng.zero_optimization_partition_weights() or eng.fp16_auto_cast():
        return False
    dropped = False
    for name in ("module_forward_pre_hook", "module_forward_post_hook"):
        handle = getattr(eng, name, None)
        if handle is not None:
            handle.remove()
            setattr(eng, name, None)
            dropped = True
    return dropped


def set_lr(eng, lr: float) -> None:
    for group in eng.optimizer.param_groups:
        group["lr"] = lr


def get_lr(eng) -> float:
    return float(eng.optimizer.param_groups[0]["lr"])


@torch.no_grad()
def average_buffers(module: nn.Module) -> None:
    """All-reduce (mean) BatchNorm running statistics so every rank holds the same model."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    for name, buf in module.named_buffers():
        if buf.is_floating_point():  # running_mean / running_var; num_batches_tracked is equal anyway
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            buf.div_(world)


def _safe_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


class SafeCheckpointEngine:
    """DeepSpeed's torch checkpoint engine, loading with ``weights_only=True``."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):  # save, commit, makedirs … stay DeepSpeed's
        return getattr(self._inner, name)

    def load(self, path: str, map_location=None):
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)


def save(eng, folder: str, client_state: dict) -> None:
    """Collective: every rank writes its part of the checkpoint into ``folder`` (rank-local or shared)."""
    eng.save_checkpoint(folder, tag=TAG, client_state=client_state)


def load(eng, folder: str) -> dict:
    """Collective: restore module, optimizer partitions and step counters; returns the client state."""
    path, client = eng.load_checkpoint(folder, tag=TAG)
    if path is None:
        raise RuntimeError(f"no DeepSpeed checkpoint under {folder}")
    return client
