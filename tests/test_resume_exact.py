"""Exact resume through the real `facesr train` path: a Ray worker SIGKILLed mid-epoch in each stage, the run
resumed by Ray Train from its latest checkpoint, ends with the per-step losses and the weights of the run
that was never interrupted, bit for bit (CPU, fp32, one thread per worker: every kernel and the 2-rank gloo
sum are deterministic, so any difference is state the resume lost).

Both stages in one run, in the configuration the issue names: accumulation 2 (``skip = step_in_epoch *
accumulation`` exercised), stage 1 with its flips, crops and the tiny priors' dropout, stage 2 with
``data.degradation=robust`` (the demo's default, drawn on the worker), ZeRO-0, BatchNorm in both networks;
stage 2 keeps a moving average of its weights (``stage2.ema_decay``), which is what it writes, its corrections to
bicubic scaled (``stage2.detail``).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.test_train import CPU, done, env_with_venv, kill_tree, records, shards, scratch, start, train_cmd  # noqa: F401

pytestmark = pytest.mark.slow

# 2 workers x 2 micro-batches of 2: 8 optimizer steps an epoch on the 64 (labelled) training faces, two epochs
# in each stage (an LR drop at the boundary), a checkpoint every 2 steps: 2, 4, 6 mid-epoch, 8 at the epoch's end
EXACT = [
    "run.stages=[1,2]", "run.log_every=1", "run.checkpoint_every=2", "run.keep_checkpoints=3",
    "data.steps_per_epoch=8", "data.val_batches=1", "data.degradation=robust", "data.shuffle_buffer=16",
    "engine.precision=fp32", "engine.zero_stage=0", "cluster.max_failures=1",
    "stage1.epochs=2", "stage1.batch_size=8", "stage1.max_micro_batch=2", "stage1.augment=true",
    "stage1.lr_every=1",
    "stage2.epochs=2", "stage2.batch_size=8", "stage2.max_micro_batch=2", "stage2.lr_milestones=[1]",
    "stage2.ema_decay=0.9",  # stage 2 writes its weights' moving average: the resume must carry it (stage 1: none)
    "stage2.detail=0.5",  # ... with its corrections to bicubic halved (facesr.detail): folded in as it is written
]
# what a train record holds that is a measurement of this machine, not of the optimisation
TIMING = {"time", "samples_per_s", "step_time_s", "data_wait_s", "data_wait_fraction", "mfu", "peak_memory_bytes"}


def _pid(log: Path, after: int) -> int | None:
    """The pid a worker logged at its start (the latest start after byte ``after`` of its log)."""
    text = log.read_text()[after:] if log.exists() else ""
    pids = re.findall(r"rank \d+/\d+ on \S+, pid (\d+)", text)
    return int(pids[-1]) if pids else None


def _kill_rank1_after_first_checkpoint(run_dir: Path, stage: int, proc, log: Path) -> int:
    """Wait until Ray Train registered the stage's step-2 checkpoint, then SIGKILL rank 1's worker (by its pid);
    returns the pid killed. The next checkpoints (4, 6) are mid-epoch too, so the resume point is one."""
    import os
    import signal

    snapshot = run_dir / f"stage{stage}" / "checkpoint_manager_snapshot.json"
    worker_log = run_dir / "logs" / f"stage{stage}-rank1.log"
    deadline = time.time() + 400
    while "checkpoint_s00000002_" not in (snapshot.read_text() if snapshot.exists() else ""):
        assert proc.poll() is None, log.read_text()[-4000:]
        assert time.time() < deadline, f"stage {stage}: no checkpoint registered in time"
        time.sleep(0.1)
    pid = _pid(worker_log, 0)
    assert pid, worker_log.read_text()
    os.kill(pid, signal.SIGKILL)
    return pid


def _losses(run_dir: Path) -> dict[tuple, dict]:
    """(stage, split, step) -> the record's optimisation values (timings dropped)."""
    return {(r["stage"], r["split"], r["step"]): {k: v for k, v in r.items() if k not in TIMING}
            for r in records(run_dir)}


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.fixture(scope="module")
def exact_runs(shards, scratch) -> tuple[Path, Path, str]:  # noqa: F811 - the imported fixture
    """The same run twice: uninterrupted, and with rank 1 SIGKILLed in each stage after its step-2 checkpoint."""
    storage = scratch / "exact"
    base = [f"data.shards={shards}", f"cluster.storage_path={storage}", *EXACT]
    env = env_with_venv(RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.25")  # checkpoints registered within a step
    ref_log = storage / "ref.log"
    storage.mkdir(parents=True)
    ref = start(train_cmd(CPU, *base, "run.name=ref"), ref_log, env)
    assert ref.wait(timeout=900) == 0, ref_log.read_text()[-4000:]
    log = storage / "killed.log"
    proc = start(train_cmd(CPU, *base, "run.name=killed"), log, env)
    try:
        for stage in (1, 2):
            _kill_rank1_after_first_checkpoint(storage / "killed", stage, proc, log)
        assert proc.wait(timeout=900) == 0, log.read_text()[-4000:]
    finally:
        kill_tree(proc)
    return storage / "ref", storage / "killed", log.read_text()


@pytest.mark.parametrize("stage", [1, 2])
def test_worker_killed_mid_epoch_resumes_bit_exact(exact_runs, stage):
    """A stage whose rank-1 worker was SIGKILLed resumes from a mid-epoch checkpoint (micro-batches replayed
    and skipped) and ends with every per-step train record, every validation record and every weight
    (BatchNorm running statistics included) bitwise equal to the uninterrupted run's."""
    import torch

    ref, killed, _ = exact_runs
    logs = (killed / "logs" / f"stage{stage}-rank0.log").read_text()
    resumed = re.findall(r"resumed from .*checkpoint_s(\d+)_e\d+ at epoch (\d+), step (\d+) \((\d+) in epoch\)", logs)
    assert len(resumed) == 1, logs[-3000:]
    _, epoch, step, in_epoch = map(int, resumed[0])
    assert in_epoch > 0 and step == 8 * epoch + in_epoch  # mid-epoch: the skip of consumed micro-batches ran
    assert (done(ref, stage)["restarts"], done(killed, stage)["restarts"]) == (0, 1)
    want = {k: v for k, v in _losses(ref).items() if k[0] == stage}
    got = {k: v for k, v in _losses(killed).items() if k[0] == stage}
    differ = [(k, got[k], want[k]) for k in sorted(want) if k in got and got[k] != want[k]]  # JSON floats: bitwise
    assert not differ, differ[:3]
    assert sorted(got) == sorted(want) and len([k for k in want if k[1] == "train"]) == 16, (sorted(got), sorted(want))
    weights = {1: "priors.safetensors", 2: "srnet.safetensors"}[stage]
    a, b = _tensors(ref / weights), _tensors(killed / weights)
    assert sorted(a) == sorted(b) and any("running_var" in k for k in a)
    unequal = [k for k in a if not torch.equal(a[k], b[k])]
    assert not unequal, unequal
    if stage == 2:  # what it wrote is the moving average the last checkpoint carries, not the last iterate,
        # with the branches' last convolutions halved (stage2.detail=0.5: x0.5 is exact in fp32) and saying so
        from facesr.weights import read_meta

        last = max((ref / "stage2").glob("checkpoint_s*"))
        state = torch.load(last / "state" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        ema = {k.removeprefix("module."): v for k, v in state["ema"].items()}
        heads = {k for k in a if re.fullmatch(r"branches\.\d\.body\.2\.(weight|bias)", k)}
        assert len(heads) == 6 and read_meta(ref / weights)["detail"] == 0.5
        assert all(torch.equal(a[k], ema[k] * 0.5 if k in heads else ema[k]) for k in a)
        assert not all(torch.equal(a[k], state["module"][k]) for k in a if "weight" in k)
