"""The driver: check the config, prepare the run folder, run each stage as one Ray Train TorchTrainer.

Run folder (``run.run_dir``, default ``<cluster.storage_path>/<run.name>``)::

    config.yaml              the resolved config of the latest start
    logs/driver.log          this driver; logs/stage<N>-rank<R>.log per worker
    metrics.jsonl            one JSON object per train/val record (docs/INTERFACES.md)
    stage1/checkpoint_*/     Ray Train checkpoints of stage 1 (DeepSpeed folders, all ranks' parts)
    priors.safetensors       trained priors + class map and preset (frozen in stage 2)
    recognizer.safetensors   or, with stage1.model=recognizer, the face recognizer of the identity term
    stage1.done.json         final step, epoch, LR of stage 1
    stage2/checkpoint_*/     ... of stage 2
    srnet.safetensors        the trained cascade (stage 3 rewrites it with its detail gate)
    stage2.done.json
    stage3/checkpoint_*/     ... of stage 3, the detail gate (run.stages=[1, 2, 3])
    stage3.done.json

Resume: starting a run with a name whose folder exists skips the stages that
have a ``done`` marker; a stage that was interrupted is restored by Ray Train
from the latest checkpoint under ``stage<N>/`` (its run snapshot there), at the
same step, learning rate and data epoch. With a storage URI (``s3://bucket/prefix``) the
whole run folder is the prefix ``<storage_path>/<name>/`` (``shards.store``): Ray Train writes
checkpoints there through the same filesystem, and files written locally first (logs,
metrics.jsonl, weights) are uploaded whole.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import sys
import time
from pathlib import Path

from .config import (ConfigError, TrainConfig, _check_priors, _check_recognizer, _check_srnet, _is_uri, check, resolve,
                     to_yaml)
from .recorder import done_path

log = logging.getLogger("facesr.train")


def train(cfg: TrainConfig) -> Path:
    """Train the configured stages; returns the run folder. Raises ConfigError before any worker starts."""
    cfg = resolve(cfg)
    manifests = check(cfg)  # stage number -> the manifest of the shards it streams
    run_dir = cfg.run_path
    for number in cfg.run.stages:
        if not done_path(run_dir, number).exists():
            check_resume_world(run_dir / f"stage{number}", cfg)
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    _log_to(run_dir / "logs" / "driver.log")
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    for number, manifest in manifests.items():
        log.info("run %s in %s: stage %d on %s (%d classes)", cfg.run.name, run_dir, number, cfg.shards_of(number),
                 len(manifest["classes"]))
    for number in cfg.run.stages:
        if not done_path(run_dir, number).exists():
            repair_snapshot(run_dir / f"stage{number}")

    from .ray_connect import connect

    log.info("connecting to Ray (a new local Ray starts in 10-30 s)")
    log.info("on %s", connect(cfg.cluster.address, use_gpu=cfg.cluster.use_gpu))
    _discovery(cfg)
    from .gpu_check import check_gpus, check_placement

    if cfg.cluster.use_gpu:  # refused here, naming the node and what is missing, not later inside NCCL
        check_gpus(cfg)
    check_placement(cfg)  # too few CPUs or GPUs is refused here, naming the shortfall: Ray Train would wait forever
    for number in cfg.run.stages:
        done = done_path(run_dir, number)
        if done.exists():
            log.info("stage %d already done (%s); skipping", number, done)
            continue
        if number == 2 and 1 in cfg.run.stages:  # check() already read a stage-2-only run's priors/recognizer
            if cfg.stage2.uses_priors:
                _check_priors(cfg, manifests[2])  # stage 1 of this run must have produced them
            if cfg.stage2.uses_recognizer:
                _check_recognizer(cfg)
        if number == 3 and 2 in cfg.run.stages:
            _check_srnet(cfg)  # stage 2 of this run must have written the cascade the gate learns on
        _fit(cfg, number, manifests[number])
        log.info("stage %d finished: %s", number, json.dumps(json.loads(done.read_text())) if done.exists() else "no marker")
    _summarise(run_dir)
    _sync_logs()
    return run_dir


def _discovery(cfg: TrainConfig) -> None:
    """Start (or find) the cluster's Prometheus target registry, which the workers' exporters join."""
    if cfg.run.telemetry_port is None or cfg.run.telemetry_sd_port is None:
        return
    from .discovery import ensure_registry

    try:
        log.info("Prometheus discovery: %s (make monitor polls it)", ensure_registry(cfg.run.telemetry_sd_port))
    except Exception as e:  # monitoring never stops training
        log.warning("no Prometheus discovery registry (%s); exporters are found through file_sd only", e)


def _summarise(run_dir: Path) -> None:
    """summary.md + summary.png beside metrics.jsonl, for people without Grafana; never fails the run."""
    from .summary import write_summary

    try:
        md, png = write_summary(run_dir)
        log.info("summary: %s, %s", md, png)
    except Exception as e:  # a plotting problem must not turn a finished training into a failure
        log.warning("no summary written: %s", e)


def _fit(cfg: TrainConfig, number: int, manifest: dict) -> None:
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .loop import worker_main
    from .progress import StageProgress, planned_steps

    c = cfg.cluster
    resources = {"CPU": c.cpus_per_worker}
    if c.use_gpu:
        resources["GPU"] = c.gpus_per_worker
    storage, filesystem = cfg.run.run_dir, None
    if _is_uri(storage):  # Ray writes checkpoints through the same filesystem (endpoint, region) as everything else
        from shards.store import filesystem as store_filesystem

        filesystem, storage = store_filesystem(storage)
    workers = (c.min_workers, c.num_workers) if cfg.elastic else c.num_workers
    if cfg.elastic:  # the controller reads it from the driver's environment (Ray Train propagates it)
        os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(c.elastic_placement_s)
    trainer = TorchTrainer(
        worker_main,
        train_loop_config={"cfg": cfg.to_dict(), "stage": number},
        torch_config=TorchConfig(backend="nccl" if c.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=c.use_gpu, resources_per_worker=resources,
                                     elastic_resize_monitor_interval_s=c.elastic_resize_s),
        run_config=RunConfig(
            name=f"stage{number}",
            storage_path=storage,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=c.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            # Ray Train's own INFO lines (resources requested, worker group started, every checkpoint
            # reported) stay in its session log files; its warnings and errors still reach the console
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    steps = planned_steps(cfg, number, manifest)
    # a Table 1 peer says which network stage 2 trains (and SRGAN that a discriminator trains beside it)
    title = "stage 1 (recognizer)" if number == 1 and cfg.stage1.model == "recognizer" else \
        "stage 3 (detail gate)" if number == 3 else ""
    if number == 2 and (cfg.stage2.model != "cascade" or cfg.stage2.loss == "adversarial"):
        name = {"srresnet": "SRResNet"}.get(cfg.stage2.model, cfg.stage2.model.upper())
        title = f"stage 2 ({name}{' + discriminator' if cfg.stage2.loss == 'adversarial' else ''})"
    with StageProgress(cfg.run_path / "metrics.jsonl", number, steps, cfg.stage_cfg(number).epochs, title=title):
        trainer.fit()


SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's list of registered checkpoints, in each stage folder


def repair_snapshot(stage_dir: Path) -> str | None:
    """Rebuild a stage's Ray Train snapshot that a kill left unreadable; returns the checkpoint it now resumes from.

    Ray Train rewrites ``stage<N>/checkpoint_manager_snapshot.json`` in place after each checkpoint; a process
    killed during that write leaves it empty or cut, and Ray then refuses the whole run ("Expecting value: line 1
    column 1"). The checkpoints themselves are intact, so the snapshot is rebuilt from the complete checkpoint
    folders (DeepSpeed's ``latest`` tag and rank 0's model states present), in Ray's schema; the unreadable file
    is kept beside it. Local run folders only: a bucket stores the snapshot with one PUT, never half-written.
    """
    snap = stage_dir / SNAPSHOT
    if not isinstance(stage_dir, Path) or not snap.is_file():
        return None
    try:
        if json.loads(snap.read_text()):
            return None
    except ValueError:
        pass
    complete = [f for f in sorted(stage_dir.glob("checkpoint_s*_e*"))
                if (f / "latest").is_file() and (f / "state" / "mp_rank_00_model_states.pt").is_file()]
    aside = snap.with_name(f"{SNAPSHOT}.unreadable-{int(time.time())}")
    snap.rename(aside)
    if not complete:
        log.warning("%s was unreadable (kept as %s) and no complete checkpoint is beside it: this stage starts "
                    "from its beginning", snap, aside.name)
        return None
    results = [{"version": 0, "checkpoint_dir_name": f.name, "metrics": {"step": int(f.name.split("_")[1][1:])}}
               for f in complete]
    state = {
        "ray_version": importlib.metadata.version("ray"),
        "checkpoint_results": results,
        "checkpoint_report_indices": list(range(len(results))),
        "latest_checkpoint_result": results[-1],
        "pending_training_results": [],
        "pending_validation_specs": [],
        "current_report_index": len(results),
        "validated_checkpoint_dir_names": [],
        "timed_out_validation_checkpoint_dir_names": [],
        "failed_validation_checkpoint_dir_names": [],
    }
    tmp = snap.with_name(f".{SNAPSHOT}.tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, snap)
    log.warning("%s was unreadable (a process killed while Ray Train wrote it; kept as %s): rebuilt from %d "
                "complete checkpoint folders, resuming from %s", snap, aside.name, len(complete), complete[-1].name)
    return complete[-1].name


def check_resume_world(stage_dir: Path, cfg: TrainConfig) -> None:
    """Refuse, before any worker starts, to resume a ZeRO 1-2 checkpoint at another world size.

    Such a checkpoint holds one optimizer-state partition per worker (``zero_pp_rank_<r>_…``) and DeepSpeed
    loads it only at the world size that wrote it; ZeRO 0 checkpoints (one full state) load at any size.
    The newest checkpoint folder is the one Ray Train restores (or a newer one it had not yet registered,
    written by the same workers).
    """
    folders = sorted(stage_dir.glob("checkpoint_*"))
    if not folders:
        return
    parts = len(list((folders[-1] / "state").glob("zero_pp_rank_*_optim_states.pt")))
    if parts and parts not in cfg.world_sizes:
        raise ConfigError(
            "cluster.num_workers",
            f"{folders[-1]} was written by {parts} workers with ZeRO optimizer-state sharding and loads only at "
            f"world size {parts}; resume with cluster.num_workers={parts} (nothing of the run is lost), or start "
            f"a new run.name. Elastic runs (cluster.min_workers) use engine.zero_stage=0, which resumes at any size",
        )


def _sync_logs() -> None:
    """Upload the driver's log now (a run in an object store); it is uploaded again when the process ends."""
    for h in logging.getLogger("facesr").handlers:
        if hasattr(h, "mirror"):
            h.flush()
            h.mirror.sync(force=True)


def _log_to(path) -> None:
    from shards.store import MirrorHandler

    root = logging.getLogger("facesr")
    root.setLevel(logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    have = {getattr(h, "target", getattr(h, "baseFilename", None)) for h in root.handlers}
    if str(path) not in have:
        fh = MirrorHandler(path)
        fh.setFormatter(fmt)
        root.addHandler(fh)
    if not any(isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) is sys.stderr for h in root.handlers):
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(fmt)
        root.addHandler(sh)
