"""Training throughput: images/s per worker through Ray Train + DeepSpeed, and the same work in a plain loop.

``facesr bench train``: tiny and paper presets, fp32 against precision auto, ZeRO 0/1/2, and the overhead of
Ray Train + DeepSpeed against a plain PyTorch loop; prints figures and writes JSON.

What is timed is stage 2 (the SR cascade with three frozen priors, eq. 4), the
stage that dominates training: the real ``cluster.trainer.train`` on real shards
for a few steps, per-worker images/s read from the run's ``metrics.jsonl``
(``samples_per_s`` of every logged step, averaged over ranks; the first
``warmup`` steps dropped, median of the rest). A step includes decoding its
micro-batches in the worker process (``data.loader_workers=0``), forward,
backward and the optimizer step, so the plain loop does exactly the same:
same loader, same micro-batch, same model and loss, ``torch.optim.Adam``,
one process with the worker's thread count. Priors are freshly initialised
(speed does not depend on their weights) and written with the shards' class map.

Overhead ratio = plain images/s ÷ Ray Train + DeepSpeed images/s of one worker
(1 worker, so no gradient all-reduce is involved: the cost of the framework alone).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class TrainBench:
    shards: str = "data/shards/demo"  # shards written by `facesr prep`
    presets: list[str] = field(default_factory=lambda: ["tiny", "paper"])  # model presets to time
    workers: int = 2  # Ray Train workers for the per-preset figures
    steps: int = 8  # optimizer steps timed per variant (after warm-up)
    warmup: int = 2  # first steps dropped (allocation, oneDNN primitive creation)
    batch_size: int = 8  # global batch (the paper's stage-2 batch); micro-batch = batch / workers
    threads: int = 1  # torch threads per worker and in the plain loop (cluster.cpus_per_worker)
    paper_steps: int = 4  # fewer steps for the paper preset on CPU (seconds per step)
    precisions: list[str] = field(default_factory=lambda: ["fp32", "auto"])  # engine.precision values timed
    zero_stages: list[int] = field(default_factory=lambda: [0, 1, 2])  # ZeRO stages compared (tiny, auto)
    degradation: str = "paper"  # data.degradation of the timed runs (robust degrades lr on the worker)


def _overrides(b: TrainBench, preset: str, workers: int, precision: str, priors: Path, storage: Path, steps: int,
               zero: int = 0) -> list[str]:
    return [
        f"preset={preset}", f"data.shards={b.shards}", f"cluster.storage_path={storage}",
        f"run.name={preset}-{precision}-z{zero}-w{workers}", "run.stages=[2]", "run.log_every=1",
        f"cluster.num_workers={workers}", f"cluster.cpus_per_worker={b.threads}", "cluster.max_failures=0",
        f"engine.precision={precision}", f"engine.zero_stage={zero}", f"data.degradation={b.degradation}",
        "data.loader_workers=0", f"data.steps_per_epoch={steps + b.warmup}", "data.val_batches=1",
        "stage2.epochs=1", f"stage2.batch_size={b.batch_size}", f"stage2.max_micro_batch={b.batch_size}",
        f"stage2.priors={priors}",
    ]


def random_priors(shards: str, preset: str, folder: Path) -> Path:
    from facesr.models import build_prior, get_preset
    from facesr.weights import save_priors
    from shards.manifest import read_manifest

    classes = list(read_manifest(shards)["classes"])
    prior = get_preset(preset).prior
    path = folder / f"priors-{preset}.safetensors"
    save_priors(path, {k: build_prior(prior, len(classes)) for k in ("x2", "x4", "hr")}, prior, classes)
    return path


def ray_images_per_s(b: TrainBench, preset: str, workers: int, precision: str, priors: Path, storage: Path,
                     steps: int, zero: int = 0) -> dict:
    """Median images/s per worker, step time and data-wait share of the logged steps after warm-up."""
    from cluster.config import load_config
    from cluster.trainer import train

    run_dir = train(load_config(None, _overrides(b, preset, workers, precision, priors, storage, steps, zero)))
    recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if r["split"] == "train"][b.warmup:]
    return {"images_per_s": statistics.median(r["samples_per_s"] for r in recs),
            "step_time_s": statistics.median(r["step_time_s"] for r in recs),
            "data_wait_fraction": statistics.median(r["data_wait_fraction"] for r in recs)}


def plain_images_per_s(b: TrainBench, preset: str, priors: Path, micro: int, steps: int) -> float:
    """The same stage-2 work with no Ray and no DeepSpeed: one process, torch Adam."""
    import torch

    from facesr.losses import CSRIPLoss
    from facesr.models import SRNet, get_preset
    from facesr.step import resolve_precision, sr_forward, to_device
    from facesr.weights import load_priors
    from shards.manifest import read_manifest

    from cluster.config import load_config, resolve
    from cluster.data import build_loader

    torch.set_num_threads(b.threads)
    cfg = resolve(load_config(None, [f"data.shards={b.shards}", "data.loader_workers=0"]))
    precision = resolve_precision("fp32", "cpu")
    classes = list(read_manifest(cfg.data.shards)["classes"])
    priors_ = {k: precision.module(p) for k, p in load_priors(priors, "cpu", classes=classes).items()}
    loss_fn = CSRIPLoss(priors_, alpha=0.001)
    torch.manual_seed(0)
    net = SRNet(get_preset(preset).sr)  # NCHW weights, NHWC activations with channels_last: as in the workers
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, fused=True)
    rates = []
    epoch = 0
    while len(rates) < steps + b.warmup:
        t0 = time.perf_counter()
        for raw in build_loader(cfg, 2, "train", micro, 0, 1, epoch):  # decoding is timed, as in the workers
            batch = to_device(raw, "cpu", precision)
            terms = sr_forward(net, loss_fn, batch, precision)
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            opt.step()
            now = time.perf_counter()
            rates.append(batch["cls"].shape[0] / (now - t0))
            t0 = now
            if len(rates) >= steps + b.warmup:
                break
        epoch += 1
    return statistics.median(rates[b.warmup:])


def measure(b: TrainBench) -> dict:
    from cluster.config import accumulation

    out: dict = {"config": dataclasses.asdict(b), "unit": "training images/s per worker (stage 2)", "results": []}
    with tempfile.TemporaryDirectory(prefix="facesr-bench-") as tmp:
        tmp = Path(tmp)
        b = dataclasses.replace(b, shards=str(Path(b.shards).resolve()))
        for preset in b.presets:
            priors = random_priors(b.shards, preset, tmp)
            steps = b.paper_steps if preset == "paper" else b.steps
            for precision in b.precisions:
                r = ray_images_per_s(b, preset, b.workers, precision, priors, tmp / "runs", steps)
                out["results"].append({"preset": preset, "precision": precision, "workers": b.workers,
                                       "zero_stage": 0, "ray_deepspeed": r["images_per_s"], **r})
        priors = random_priors(b.shards, "tiny", tmp)
        for zero in b.zero_stages:  # communication: plain data parallel against ZeRO-1/2, same work
            r = ray_images_per_s(b, "tiny", b.workers, "auto", priors, tmp / "runs", b.steps, zero)
            out.setdefault("zero", []).append({"zero_stage": zero, "workers": b.workers, **r})
        # framework overhead: tiny fp32, one worker against the plain loop, same micro-batch
        micro, _ = accumulation(b.batch_size, 1, b.batch_size)
        one = ray_images_per_s(b, "tiny", 1, "fp32", priors, tmp / "runs", b.steps)["images_per_s"]
        plain = plain_images_per_s(b, "tiny", priors, micro, b.steps)
        out["overhead"] = {"preset": "tiny", "precision": "fp32", "micro_batch": micro,
                           "ray_deepspeed_1_worker": one, "plain_pytorch": plain, "ratio_plain_over_ray": plain / one}
    return out


def report(res: dict) -> str:
    lines = [f"{res['unit']} (data.degradation={res['config']['degradation']}):"]
    for r in res["results"]:
        lines.append(f"  {r['preset']:6s} {r['precision']:6s} {r['workers']} workers  {r['images_per_s']:8.2f} img/s  "
                     f"step {r['step_time_s']:.3f}s  data wait {100 * r['data_wait_fraction']:.1f}% of the step")
    for z in res.get("zero", []):
        lines.append(f"  tiny auto ZeRO-{z['zero_stage']} {z['workers']} workers  {z['images_per_s']:8.2f} img/s  "
                     f"step {z['step_time_s']:.3f}s")
    o = res["overhead"]
    lines.append(f"overhead ({o['preset']} {o['precision']}, micro-batch {o['micro_batch']}): plain PyTorch "
                 f"{o['plain_pytorch']:.2f} img/s, Ray Train + DeepSpeed 1 worker {o['ray_deepspeed_1_worker']:.2f} "
                 f"img/s, ratio {o['ratio_plain_over_ray']:.2f}")
    return "\n".join(lines)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", default="data/shards/demo", help="shards written by `facesr prep`")
    parser.add_argument("--presets", nargs="+", default=["tiny", "paper"], help="model presets to time")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps per variant")
    parser.add_argument("--paper-steps", type=int, default=4, help="timed steps for the paper preset")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker and in the plain loop")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "auto"], help="engine.precision values to time")
    parser.add_argument("--zero-stages", nargs="+", type=int, default=[0, 1, 2], help="ZeRO stages to compare (tiny)")
    parser.add_argument("--degradation", default="paper", help="data.degradation: paper | robust")
    parser.add_argument("--out", default="bench/train.json", help="JSON results")


def run(args: argparse.Namespace) -> int:
    res = measure(TrainBench(shards=args.shards, presets=args.presets, workers=args.workers, steps=args.steps,
                             paper_steps=args.paper_steps, threads=args.threads,
                             precisions=args.precisions, zero_stages=args.zero_stages, degradation=args.degradation))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(report(res))
    print(f"wrote {out}")
    return 0
