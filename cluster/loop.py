"""The per-worker training function that Ray Train runs on every rank, for either stage.

Body of a step (BasicSR-style, the engine's backward/step are the only
DeepSpeed lines): group ``accumulation`` micro-batches, forward each through
the stage, ``engine.backward``, ``engine.step``; then log and maybe checkpoint.

Resume is exact (bitwise on the CPU; tests/test_resume_exact.py): the
checkpoint's client state holds (epoch, step in epoch, global step). The
loader of an epoch is a function of the epoch number, so resuming replays the
same data epoch and skips the ``step_in_epoch * accumulation`` micro-batches
already consumed; the LR is recomputed from the epoch, so it is the one the
uninterrupted run had. Every random draw of a micro-batch is a function of
(seed, epoch, rank, micro-batch index): augmentation and degradation from their
own generator, and torch's global generator (dropout in the priors) reseeded
before each forward, so a resumed process draws what the first one would have.
BatchNorm running statistics are averaged over the ranks before every
checkpoint, mid-epoch ones too: DeepSpeed saves rank 0's module only, which
would otherwise hand rank 0's statistics to every rank on resume.

With ``ema_decay`` the stage keeps an exponential moving average of the
weights (timm's ``ModelEmaV3``), updated after every optimizer step from the
global step, carried in the checkpoint's client state, validated and written
in place of the last iterate.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from itertools import islice

import torch
import torch.distributed as dist

from facesr.augment import step_generator, step_seed
from facesr.hardware import retain_freed_memory, use_device
from facesr.step import TermSums, build_ema, compile_forward, resolve_precision, to_device
from facesr.structured import build

from .config import TrainConfig
from .data import build_loader, read_classes
from .engine import average_buffers, get_lr, initialize, load, ops_to_build, save, set_accelerator_env, set_lr
from .recorder import Recorder

CRITIC = "critic"  # a checkpoint's subfolder holding the critic's engine (SRGAN's discriminator)


@dataclass
class TrainState:
    epoch: int = 0  # current 0-based epoch (the data epoch the loader replays)
    step_in_epoch: int = 0  # optimizer steps already taken in this epoch
    global_step: int = 0  # optimizer steps since the stage began
    restarts: int = 0  # times this stage resumed from a checkpoint (carried in checkpoints: counts across processes)


def worker_main(config: dict) -> None:
    """Ray Train entry: ``config = {"cfg": TrainConfig as dict, "stage": 1 | 2}``."""
    import ray.train

    cfg: TrainConfig = build(TrainConfig, config["cfg"])  # the driver's resolved config, as to_dict() gave it
    number = int(config["stage"])
    ctx = ray.train.get_context()
    rank, world, local_rank = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank()

    t_start = time.perf_counter()
    retain_freed_memory()  # activations reuse freed memory instead of faulting it in each step (hardware.py)
    _quiet_report_lines()
    set_accelerator_env(cfg.cluster.use_gpu)
    from shards.store import configure

    configure(cfg.cluster.s3_endpoint, cfg.cluster.s3_region)  # this node's credentials, the run's endpoint
    from .stages import STAGES

    recorder = Recorder(cfg, number, STAGES[number].telemetry_name, rank, local_rank, world, socket.gethostname())
    device = use_device(torch.device("cuda", local_rank) if cfg.cluster.use_gpu else "cpu",
                        threads=cfg.cluster.cpus_per_worker)  # cuDNN's autotuner on a GPU; threads on the CPU

    precision = resolve_precision(cfg.engine.precision, device, cfg.engine.channels_last)
    classes = read_classes(cfg, number)
    stage = STAGES[number](cfg, classes, device, precision)
    stage_cfg = stage.stage_cfg
    torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
    # Weights stay NCHW: ZeRO 1-2 keep them as views of one flat buffer, which a channels_last copy would
    # detach from the optimizer. channels_last applies to the activations (inputs are NHWC), which is what
    # cuDNN/oneDNN key their kernel choice on; weights are re-laid per call (they are small).
    model = stage.build_model().to(device)
    critic = stage.build_critic()  # SRGAN's discriminator, or None: a second engine, stepped after the model's
    flops = sample_flops(stage, model, device, precision)  # training FLOPs per sample, for MFU
    peak = peak_flops(device, precision)  # the device's conv peak in the dtype this run computes in
    t_built = time.perf_counter()
    ops, cache = ops_to_build()
    if ops:
        recorder.compiling(ops, cache)
    ema = build_ema(model, stage_cfg.ema_decay)  # the weights' moving average, or None (before DeepSpeed wraps it)
    eng, b = initialize(model, stage_cfg, cfg.engine, world)
    critic_eng = initialize(critic, stage_cfg, cfg.engine, world)[0] if critic is not None else None
    engines = [eng] + ([critic_eng] if critic_eng is not None else [])
    recorder.ready(t_built - t_start, time.perf_counter() - t_built, b, precision, device)
    forward = compile_forward(stage.forward, cfg.engine.step_compile)  # eager unless engine.step_compile

    state = TrainState()
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as folder:
            client = load(eng, folder)
            if critic_eng is not None:
                load(critic_eng, os.path.join(folder, CRITIC))
        restore_ema(ema, client, eng.module)
        state = TrainState(**client["train_state"])
        state.restarts += 1
        recorder.resumed(state, ckpt.path)  # where it is stored (as_directory's is a local download from a bucket)

    decode_errors = 0  # this process's cumulative count, over finished epochs
    finished = False
    try:
        for epoch in range(state.epoch, stage_cfg.epochs):
            lr = stage_cfg.lr_at(epoch)
            stage.begin_epoch(epoch)
            for e in engines:
                set_lr(e, lr)
                e.train()
            skip = state.step_in_epoch * b.accumulation
            loader = build_loader(cfg, number, "train", b.micro_batch, rank, world, epoch)
            steps = len(loader) // b.accumulation  # optimizer steps this epoch (same on every rank)
            if cfg.steps_cap(number):
                steps = min(steps, cfg.steps_cap(number))
            batches = iter(loader)
            if skip:
                for _ in islice(batches, skip):  # replay the data epoch up to where the checkpoint left it
                    pass
            sums = TermSums()
            t_last, samples, wait = time.perf_counter(), 0, 0.0
            while state.step_in_epoch < steps:
                t0 = time.perf_counter()
                group = list(islice(batches, b.accumulation))  # the epoch's tail that cannot fill a step is dropped
                wait += time.perf_counter() - t0
                if state.global_step <= stage_cfg.warmup_steps:  # the warm-up's per-step LR, then the epoch's again
                    for e in engines:
                        set_lr(e, stage_cfg.lr_at(epoch, state.global_step))
                first = state.step_in_epoch * b.accumulation  # micro-batch index in the epoch: seeds augmentation
                samples += train_step(eng, stage, group, sums, device, precision, (cfg.run.seed, epoch, rank, first),
                                      critic_eng, forward)
                state.step_in_epoch += 1
                state.global_step += 1
                if ema is not None:
                    ema.update(eng.module, step=state.global_step)  # on the device: no host sync
                if state.global_step % cfg.run.log_every == 0:
                    terms = sums.mean()  # the interval's one host synchronisation
                    dt = time.perf_counter() - t_last
                    extra = {"lr": get_lr(eng), "samples": samples, "samples_per_s": samples / dt,
                             "step_time_s": dt / cfg.run.log_every,
                             "data_wait_s": wait / cfg.run.log_every, "data_wait_fraction": wait / dt,
                             "mfu": samples / dt * flops / peak, "peak_memory_bytes": peak_memory(device),
                             "decode_errors": decode_errors + loader.decode_errors}
                    recorder.train(terms, extra, epoch, state.global_step)
                    t_last, samples, wait = time.perf_counter(), 0, 0.0
                mid_epoch = state.step_in_epoch < steps  # the epoch's last step is checkpointed after validation
                if cfg.run.checkpoint_every and state.global_step % cfg.run.checkpoint_every == 0 and mid_epoch:
                    for m in [e.module for e in engines] + ([ema.module] if ema is not None else []):
                        average_buffers(m)  # what rank 0 saves is every rank's model (see the docstring)
                    _checkpoint(eng, state, recorder, {"epoch": epoch, "step": state.global_step, "lr": get_lr(eng)},
                                critic_eng, ema)
            decode_errors += loader.decode_errors
            for m in [e.module for e in engines] + ([ema.module] if ema is not None else []):
                average_buffers(m)  # BatchNorm running stats: one model on every rank (see engine.py)
            val = {}
            if (epoch + 1) % cfg.run.val_every == 0 or epoch + 1 == stage_cfg.epochs:
                val = _validate(stage, eng, cfg, b.micro_batch, rank, world, epoch, device, precision,
                                ema.module if ema is not None else None)
                recorder.val(val, {"lr": get_lr(eng)}, epoch, state.global_step)
            state = TrainState(epoch=epoch + 1, step_in_epoch=0, global_step=state.global_step, restarts=state.restarts)
            _checkpoint(eng, state, recorder, {"epoch": epoch, "step": state.global_step, "lr": get_lr(eng), **val},
                        critic_eng, ema)
        recorder.finish(stage, ema.module if ema is not None else eng.module, state, get_lr(eng))
        finished = True
    finally:
        recorder.close(finished)


def _quiet_report_lines() -> None:
    """Ray Train logs "Reporting training result …" (the whole metrics dict) at INFO on every rank for every
    checkpoint, from a logger named by its file path rather than ``ray.train.…``, so ``RunConfig``'s
    ``LoggingConfig(log_level="WARNING")`` misses it and the worker's root logger prints it. Its warnings
    and errors still print."""
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def sample_flops(stage, model, device, precision) -> float:
    """FLOPs of one training sample (forward + backward, frozen priors included), counted once at start.

    Counted in eval mode on a 1-sample batch, before DeepSpeed wraps the model: BatchNorm statistics and
    the optimizer never see it.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from facesr.vocab import SIZES

    batch = {k: torch.zeros(1, 3, s, s, device=device) for k, s in SIZES.items()}
    batch["cls"] = torch.zeros(1, dtype=torch.long, device=device)
    model.eval()
    with FlopCounterMode(display=False) as fc:
        stage.forward(model, batch)["loss"].backward()
    model.zero_grad(set_to_none=True)
    model.train()
    return float(fc.get_total_flops())


def peak_flops(device, precision) -> float:
    """FLOP/s of a large 3x3 convolution in the run's dtype, measured on this worker (a second at most)."""
    from facesr.hardware import conv_peak

    return conv_peak(seconds=0.3, bf16=precision.bf16, device=str(device), batch=4)["gflops_per_s"] * 1e9


def peak_memory(device) -> float:
    """Peak accelerator memory (CUDA) or peak resident memory of this process (CPU), in bytes."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    import resource

    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux reports KiB


def train_step(eng, stage, group: list[dict], sums, device, precision, seed: tuple[int, int, int, int],
               critic_eng=None, forward=None) -> int:
    """One optimizer step over ``group``'s micro-batches; returns the samples seen.

    With a critic (SRGAN's discriminator), each micro-batch steps the model on ``loss`` first, then the critic
    on ``critic_loss``: the model's term read the critic's weights as constants, which the critic's step then
    changes in place (the other order would invalidate the model's graph).

    No host synchronisation: terms accumulate on the device in ``sums``; the batch's augmentation or
    degradation draws from a device generator seeded by (seed, epoch, rank, micro-batch index), so a
    resumed run draws the same again. ``forward``: the stage's forward, compiled (``facesr.step.compile_forward``)
    or not (default).
    """
    forward = forward or stage.forward
    run_seed, epoch, rank, first = seed
    samples = 0
    for j, micro in enumerate(group):
        torch.manual_seed(step_seed(run_seed, epoch, rank, first + j, "global"))  # dropout: the same draw on resume
        batch = to_device(micro, device, precision)
        batch = stage.train_batch(batch, step_generator(run_seed, epoch, rank, first + j, device))
        terms = forward(eng.module, batch)  # DeepSpeed's forward hooks: timers (dropped if compiled)
        critic_loss = terms.pop("critic_loss", None)
        eng.backward(terms["loss"])
        eng.step()
        if critic_eng is not None:
            critic_eng.backward(critic_loss)
            critic_eng.step()
        sums.add(terms)
        samples += batch["cls"].shape[0]
    return samples


def restore_ema(ema, client: dict, module: torch.nn.Module) -> None:
    """The checkpoint's moving average; a checkpoint written without one (ema_decay switched on for the
    resumed run) starts it from the restored weights."""
    if ema is None:
        return
    if "ema" in client:
        ema.load_state_dict(client["ema"])
    else:
        ema.set(module)
        logging.getLogger(__name__).warning("checkpoint has no weight average (ema_decay was 0): starting it here")


def _checkpoint(eng, state: TrainState, recorder: Recorder, metrics: dict, critic_eng=None, ema=None) -> None:
    """Collective: every rank saves its DeepSpeed part and reports it; Ray merges the parts into one folder
    (a critic's engine in its subfolder ``critic``; the weights' moving average in the client state)."""
    import ray.train

    folder = tempfile.mkdtemp(prefix=f"facesr-ckpt-r{recorder.rank}-")
    try:
        client = {"train_state": dataclasses.asdict(state)}
        if ema is not None:
            client["ema"] = ema.state_dict()
        save(eng, folder, client)
        if critic_eng is not None:
            save(critic_eng, os.path.join(folder, CRITIC), {})
        recorder.checkpoint_written(folder, state)
        name = f"checkpoint_s{state.global_step:08d}_e{state.epoch:04d}"
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder), checkpoint_dir_name=name)
        recorder.checkpoint_saved()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@torch.no_grad()
def _validate(stage, eng, cfg: TrainConfig, micro: int, rank: int, world: int, epoch: int, device, precision,
              model=None) -> dict:
    """Mean of the stage's validation terms over all batches of all ranks (same count per rank); of ``model``
    (the weights' moving average) where given, else of the engine's."""
    eng.eval()
    model = eng.module if model is None else model
    sums: dict[str, torch.Tensor] = {}
    n = 0
    loader = build_loader(cfg, stage.number, "val", micro, rank, world, 0)
    for i, batch in enumerate(loader):
        if cfg.data.val_batches and i >= cfg.data.val_batches:
            break
        batch = stage.val_batch(to_device(batch, device, precision), step_generator(cfg.run.seed, -1, rank, i, device))
        terms = stage.validate_batch(model, batch)
        for k, v in terms.items():
            sums[k] = sums.get(k, torch.zeros((), dtype=torch.float64, device=device)) + v.detach().double()
        n += 1
    keys = sorted(sums)
    vec = torch.stack([sums[k] for k in keys] + [torch.tensor(float(n), dtype=torch.float64, device=device)])
    if dist.is_initialized() and world > 1:
        dist.all_reduce(vec)
    total = max(float(vec[-1]), 1.0)
    eng.train()
    return {k: float(vec[i]) / total for i, k in enumerate(keys)}
