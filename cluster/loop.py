"""The per-worker training function that Ray Train runs on every rank, for either stage.

Body of a step (BasicSR-style, the engine's backward/step are the only
DeepSpeed lines): group ``accumulation`` micro-batches, forward each through
the stage, ``engine.backward``, ``engine.step``; then log and maybe checkpoint.

Resume: the checkpoint's client state holds (epoch, step in epoch, global
step). The loader of an epoch is a function of the epoch number, so resuming
replays the same data epoch and skips the micro-batches already consumed; the
LR is recomputed from the epoch, so it is the one the uninterrupted run had.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from itertools import islice

import torch
import torch.distributed as dist

from .config import TrainConfig, from_dict
from .data import build_loader, read_classes
from .engine import average_buffers, get_lr, initialize, load, save, set_accelerator_env, set_lr
from .runlog import RunLog


@dataclass
class TrainState:
    epoch: int = 0  # current 0-based epoch (the data epoch the loader replays)
    step_in_epoch: int = 0  # optimizer steps already taken in this epoch
    global_step: int = 0  # optimizer steps since the stage began


def worker_main(config: dict) -> None:
    """Ray Train entry: ``config = {"cfg": TrainConfig as dict, "stage": 1 | 2}``."""
    import ray.train

    cfg: TrainConfig = from_dict(TrainConfig, config["cfg"])
    number = int(config["stage"])
    ctx = ray.train.get_context()
    rank, world, local_rank = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank()

    t_start = time.perf_counter()
    set_accelerator_env(cfg.cluster.use_gpu)
    from .stages import STAGES, mean_terms

    log = RunLog(cfg, number, STAGES[number].telemetry_name, rank, local_rank, world, socket.gethostname())
    if cfg.cluster.use_gpu:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, int(cfg.cluster.cpus_per_worker)))

    from facesr.step import Precision, to_device

    precision = Precision(bf16=cfg.engine.bf16, channels_last=cfg.engine.channels_last)
    classes = read_classes(cfg)
    stage = STAGES[number](cfg, classes, device, precision)
    st = stage.stage
    torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
    # Weights stay NCHW: ZeRO 1-2 keep them as views of one flat buffer, which a channels_last copy would
    # detach from the optimizer. channels_last applies to the activations (inputs are NHWC), which is what
    # cuDNN/oneDNN key their kernel choice on; weights are re-laid per call (they are small).
    model = stage.build_model().to(device)
    t_built = time.perf_counter()
    eng, b = initialize(model, st, cfg.engine, world)
    log.ready(t_built - t_start, time.perf_counter() - t_built, b)

    state = TrainState()
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as folder:
            client = load(eng, folder)
        state = TrainState(**client["train_state"])
        log.resumed(state, folder)

    decode_errors = 0  # this process's cumulative count, over finished epochs
    try:
        for epoch in range(state.epoch, st.epochs):
            lr = st.lr_at(epoch)
            set_lr(eng, lr)
            eng.train()
            skip = state.step_in_epoch * b.accumulation
            loader = build_loader(cfg, number, "train", b.micro_batch, rank, world, epoch)
            steps = len(loader) // b.accumulation  # optimizer steps this epoch (same on every rank)
            if cfg.data.steps_per_epoch:
                steps = min(steps, cfg.data.steps_per_epoch)
            batches = iter(loader)
            if skip:
                for _ in islice(batches, skip):  # replay the data epoch up to where the checkpoint left it
                    pass
            acc: dict[str, float] = {}
            n_acc, t_last, samples, wait = 0, time.perf_counter(), 0, 0.0
            while state.step_in_epoch < steps:
                t0 = time.perf_counter()
                group = list(islice(batches, b.accumulation))  # the epoch's tail that cannot fill a step is dropped
                wait += time.perf_counter() - t0
                for micro in group:
                    batch = to_device(micro, device, precision)
                    terms = stage.forward(eng.module, batch)  # ZeRO ≤ 2 needs no forward hooks
                    eng.backward(terms["loss"])
                    eng.step()
                    for k, v in terms.items():
                        acc[k] = acc.get(k, 0.0) + float(v.detach())
                    n_acc += 1
                    samples += batch["cls"].shape[0]
                state.step_in_epoch += 1
                state.global_step += 1
                if state.global_step % cfg.run.log_every == 0:
                    dt = time.perf_counter() - t_last
                    extra = {"lr": get_lr(eng), "samples_per_s": samples / dt, "step_time_s": dt / cfg.run.log_every,
                             "data_wait_s": wait / cfg.run.log_every,
                             "decode_errors": decode_errors + loader.decode_errors}
                    log.train(mean_terms(acc, n_acc), extra, epoch, state.global_step)
                    acc, n_acc, t_last, samples, wait = {}, 0, time.perf_counter(), 0, 0.0
                mid_epoch = state.step_in_epoch < steps  # the epoch's last step is checkpointed after validation
                if cfg.run.checkpoint_every and state.global_step % cfg.run.checkpoint_every == 0 and mid_epoch:
                    _checkpoint(eng, state, log, {"epoch": epoch, "step": state.global_step, "lr": get_lr(eng)})
            decode_errors += loader.decode_errors
            average_buffers(eng.module)  # BatchNorm running stats: one model on every rank (see engine.py)
            val = _validate(stage, eng, cfg, b.micro_batch, rank, world, epoch, device, precision)
            log.val(val, {"lr": get_lr(eng)}, epoch, state.global_step)
            state = TrainState(epoch=epoch + 1, step_in_epoch=0, global_step=state.global_step)
            _checkpoint(eng, state, log, {"epoch": epoch, "step": state.global_step, "lr": get_lr(eng), **val})
        log.finish(stage, eng.module, state, get_lr(eng))
    finally:
        log.close()


def _checkpoint(eng, state: TrainState, log: RunLog, metrics: dict) -> None:
    """Collective: every rank saves its DeepSpeed part and reports it; Ray merges the parts into one folder."""
    import ray.train

    folder = tempfile.mkdtemp(prefix=f"facesr-ckpt-r{log.rank}-")
    try:
        save(eng, folder, {"train_state": dataclasses.asdict(state)})
        log.checkpoint_written(folder, state)
        name = f"checkpoint_s{state.global_step:08d}_e{state.epoch:04d}"
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder), checkpoint_dir_name=name)
        log.checkpoint_saved()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@torch.no_grad()
def _validate(stage, eng, cfg: TrainConfig, micro: int, rank: int, world: int, epoch: int, device, precision) -> dict:
    """Mean of the stage's validation terms over all batches of all ranks (same count per rank)."""
    from facesr.step import to_device

    eng.eval()
    sums: dict[str, torch.Tensor] = {}
    n = 0
    loader = build_loader(cfg, stage.number, "val", micro, rank, world, 0)
    for i, batch in enumerate(loader):
        if cfg.data.val_batches and i >= cfg.data.val_batches:
            break
        terms = stage.validate_batch(eng.module, to_device(batch, device, precision))
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
