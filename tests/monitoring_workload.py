"""Stand-in for a short facesr training run, for the monitoring tests.

Same command line as ``python -m launch.train`` (``--config FILE --run-dir DIR key=value...``;
it reads the overrides ``run.name``, ``run.telemetry_port``, ``run.telemetry_sd_dir``,
``cluster.num_workers`` and ignores the rest), so tests/test_monitoring_prometheus.py can swap
it for the real run by changing WORKLOAD. In ``cluster.num_workers`` processes it feeds real
``cluster.telemetry.Telemetry`` exporters realistic values for both stages and all scales,
as cluster/runlog.py does: stage 1 ``prior`` (loss, ce/*, acc/*), then stage 2 ``sr`` (loss,
ssim/*, ce/*, psnr/* on val), plus throughput, lr, step/data time, epoch/step, decode errors
and checkpoints, one exporter per stage and worker. Rank 0 writes ``<run-dir>/metrics.jsonl``
(docs/INTERFACES.md).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import random
import socket
import time

from cluster.telemetry import Telemetry, node_ip
from facesr.vocab import SCALES

STAGES = {1: "prior", 2: "sr"}  # stage number (metrics.jsonl) -> telemetry stage label
QUALITY = {"x2": 0.93, "x4": 0.82, "x8": 0.64}  # SSIM each scale tends to, coarse scales easier


def stage_metrics(stage: str, split: str, progress: float, rng: random.Random) -> dict[str, float]:
    """Loss-dict-like values for one step: improving with ``progress`` in [0, 1], noisy."""
    m: dict[str, float] = {}
    for i, scale in enumerate(SCALES):
        noise = rng.gauss(0, 0.01)
        ce = (5.0 + i) * math.exp(-2.5 * progress) + 0.3 + abs(noise)
        m[f"ce/{scale}"] = ce
        if stage == "prior":
            m[f"acc/{scale}"] = min(1.0, (0.95 - 0.1 * i) * (1 - math.exp(-3 * progress)) + noise)
        else:
            ssim = QUALITY[scale] * (1 - 0.5 * math.exp(-3 * progress)) + noise
            m[f"ssim/{scale}"] = ssim
            if split == "val":
                m[f"psnr/{scale}"] = 20 + 12 * ssim
    if stage == "prior":
        m["loss"] = sum(m[f"ce/{s}"] for s in SCALES)
    else:
        m["loss"] = sum(1 - m[f"ssim/{s}"] + 0.05 * m[f"ce/{s}"] for s in SCALES)
    return m


def worker(rank: int, args: argparse.Namespace) -> None:
    rng = random.Random(rank)
    jsonl = None
    if rank == 0:
        os.makedirs(args.run_dir, exist_ok=True)
        jsonl = open(os.path.join(args.run_dir, "metrics.jsonl"), "a")
    decode_errors, batch = 0, 16
    try:
        for number, stage in STAGES.items():  # each stage is its own set of worker processes
            tel = Telemetry(run=args.name, stage=stage, rank=rank, node=socket.gethostname(),
                            port=None if args.port is None else args.port + rank,  # + local rank
                            host=node_ip(), sd_dir=args.sd_dir)
            try:
                decode_errors = run_stage(tel, number, stage, rank, args, rng, jsonl, batch,
                                          decode_errors)
            finally:
                tel.close()
    finally:
        if jsonl:
            jsonl.close()


def run_stage(tel, number, stage, rank, args, rng, jsonl, batch, decode_errors) -> int:
    time.sleep(args.setup_s)  # like building the model and opening shards: exporter up, no logs
    start = last_val = last_ckpt = time.monotonic()
    step = 0
    while (elapsed := time.monotonic() - start) < args.seconds_per_stage:
        progress = elapsed / args.seconds_per_stage
        wait = rng.uniform(0.002, 0.01)
        time.sleep(args.step_s)
        step += 1
        decode_errors += rng.random() < 0.05
        epoch = step // 20
        train = stage_metrics(stage, "train", progress, rng)
        extra = {"lr": 1e-3 * 0.5 * (1 + math.cos(math.pi * progress)),
                 "samples_per_s": batch / args.step_s, "step_time_s": args.step_s + wait,
                 "data_wait_s": wait, "decode_errors": decode_errors}
        tel.log(train | extra | {"epoch": epoch, "step": step}, split="train")
        rows = [{"stage": number, "split": "train", "epoch": epoch, "step": step,
                 "time": time.time(), **train, **extra}]
        now = time.monotonic()
        if now - last_val >= args.val_every_s:
            val = stage_metrics(stage, "val", progress, rng)
            tel.log(val | {"epoch": epoch, "step": step}, split="val")
            rows.append({"stage": number, "split": "val", "epoch": epoch, "step": step,
                         "time": time.time(), **val})
            last_val = now
        if now - last_ckpt >= args.checkpoint_every_s:
            tel.checkpoint_saved()
            last_ckpt = now
        if jsonl:
            jsonl.writelines(json.dumps(r) + "\n" for r in rows)
            jsonl.flush()
    return decode_errors


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", help="ignored: accepted for launch.train's command line")
    p.add_argument("--run-dir", required=True)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--setup-s", type=float, default=4.0, help="exporter up before the first log")
    p.add_argument("--seconds-per-stage", type=float, default=6.0)
    p.add_argument("--step-s", type=float, default=0.05)
    p.add_argument("--val-every-s", type=float, default=0.5)
    p.add_argument("--checkpoint-every-s", type=float, default=2.0)
    args = p.parse_args(argv)
    kv = dict(o.split("=", 1) for o in args.overrides)
    args.name = kv.get("run.name", os.path.basename(os.path.abspath(args.run_dir)))
    port = kv.get("run.telemetry_port", "null")
    args.port = None if port in ("null", "None", "") else int(port)
    args.sd_dir = kv.get("run.telemetry_sd_dir") or os.path.join(args.run_dir, "prometheus_sd")
    workers = int(kv.get("cluster.num_workers", 2))
    procs = [mp.Process(target=worker, args=(r, args)) for r in range(workers)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    if any(proc.exitcode for proc in procs):
        raise SystemExit(f"worker failed: {[proc.exitcode for proc in procs]}")


if __name__ == "__main__":
    main()
