"""Stand-in for a short facesr training run, for the monitoring tests.

Takes the telemetry/run arguments the real launcher takes (see WORKLOAD in
tests/test_monitoring_prometheus.py) and, in ``--workers`` processes, feeds real
``cluster.telemetry.Telemetry`` exporters realistic values for both stages and all scales:
stage ``prior`` (loss, ce/*, acc/*) then stage ``sr`` (loss, ssim/*, ce/*, psnr/* on val),
plus throughput, lr, step/data time, epoch/step, decode errors and checkpoints. Rank 0 also
writes ``<runs-dir>/<run>/metrics.jsonl`` in the format of docs/INTERFACES.md.
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

from cluster.telemetry import Telemetry
from facesr.vocab import SCALES

STAGES = ("prior", "sr")
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
    tel = Telemetry(run=args.run, stage=STAGES[0], rank=rank, node=socket.gethostname(),
                    port=None if args.telemetry_port is None else args.telemetry_port + rank,
                    host=args.telemetry_host, sd_dir=args.telemetry_sd_dir, restarts=args.restarts)
    jsonl = None
    if rank == 0:
        run_dir = os.path.join(args.runs_dir, args.run)
        os.makedirs(run_dir, exist_ok=True)
        jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a")
    step, decode_errors, batch = 0, 0, 16
    try:
        time.sleep(args.setup_s)  # like building the model and opening shards: exporter up, no logs
        for stage in STAGES:
            tel.set_stage(stage)
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
                         "data_wait_s": wait, "epoch": epoch, "step": step,
                         "decode_errors": decode_errors}
                tel.log(train | extra, split="train")
                rows = [{"stage": stage, "split": "train", "time": time.time(), **train, **extra}]
                now = time.monotonic()
                if now - last_val >= args.val_every_s:
                    val = stage_metrics(stage, "val", progress, rng)
                    tel.log(val | {"epoch": epoch, "step": step}, split="val")
                    rows.append({"stage": stage, "split": "val", "epoch": epoch, "step": step,
                                 "time": time.time(), **val})
                    last_val = now
                if now - last_ckpt >= args.checkpoint_every_s:
                    tel.checkpoint_saved()
                    last_ckpt = now
                if jsonl:
                    jsonl.writelines(json.dumps(r) + "\n" for r in rows)
                    jsonl.flush()
    finally:
        tel.close()
        if jsonl:
            jsonl.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--telemetry-host", default="127.0.0.1")
    p.add_argument("--telemetry-port", type=int, default=None, help="base port; rank r uses base+r")
    p.add_argument("--telemetry-sd-dir", default=None)
    p.add_argument("--restarts", type=int, default=0)
    p.add_argument("--setup-s", type=float, default=4.0)
    p.add_argument("--seconds-per-stage", type=float, default=6.0)
    p.add_argument("--step-s", type=float, default=0.05)
    p.add_argument("--val-every-s", type=float, default=0.5)
    p.add_argument("--checkpoint-every-s", type=float, default=2.0)
    args = p.parse_args(argv)
    procs = [mp.Process(target=worker, args=(r, args)) for r in range(args.workers)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    if any(proc.exitcode for proc in procs):
        raise SystemExit(f"worker failed: {[proc.exitcode for proc in procs]}")


if __name__ == "__main__":
    main()
