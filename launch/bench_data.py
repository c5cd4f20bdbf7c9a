"""Data pipeline: prep faces/s per core and streamed samples/s per worker, each against a naive baseline.

Prep runs three ways on the same faces: the naive single-process PIL script,
our prep in one process (code speed), and our prep as Ray tasks (what a run
gets, task overheads included). Streaming reads the Ray run's train shards in
one process and compares with a map-style dataset that decodes JPEGs and
degrades on the fly. Per-core figures extrapolate to CASIA-WebFace on a
64-core node; the streaming rate is compared with the training step of
``facesr bench step`` (``--step-json``). Keep ``--images`` small on shared machines.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path


def configure(p) -> None:
    p.add_argument("--faces", default="../shared/data/lfw", help="folder of identity folders")
    p.add_argument("--images", type=int, default=300, help="faces to use (first identities by name)")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray for the parallel prep")
    p.add_argument("--shard-size", type=int, default=50)
    p.add_argument("--batch", type=int, default=8, help="stream batch (the paper's stage 2)")
    p.add_argument("--batches", type=int, default=15, help="batches timed per streaming variant and round")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; each variant keeps its best")
    p.add_argument("--node-cores", type=int, default=64, help="cores of the node to extrapolate to")
    p.add_argument("--step-json", default="bench/step-paper.json", help="foundation step benchmark to compare with")
    p.add_argument("--out", default="bench/data.json")


def _faces(root: Path, n: int) -> list[Path]:
    files = []
    for ident in sorted(os.listdir(root)):
        files += sorted((root / ident).iterdir())
        if len(files) >= n:
            break
    return files[:n]


def _link_src(files: list[Path], src: Path) -> None:
    for f in files:
        (src / f.parent.name).mkdir(parents=True, exist_ok=True)
        (src / f.parent.name / f.name).symlink_to(f.resolve())


def run(args) -> int:
    from cluster import shard_prep
    from shards import bench
    from shards.manifest import read_manifest, shard_urls, split_samples
    from shards.plan import SplitConfig
    from shards.prep import PrepConfig, prepare, serial_map
    from shards.stream import StreamConfig, build_loader

    files = _faces(Path(args.faces), args.images)
    if not files:
        print(f"facesr bench data: error: no faces under {args.faces}")
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="facesr-bench-data-"))
    result = {"bench": "data", "config": {k: v for k, v in vars(args).items() if not k.startswith("_")},
              "load_average_start": os.getloadavg()}
    try:
        src = tmp / "src"
        _link_src(files, src)
        def ours(out, mapper, png_level=1, members="png"):
            cfg = PrepConfig(src=str(src), out=str(out), shard_size=args.shard_size, progress=False,
                             png_level=png_level, members=members, split=SplitConfig(val=0.05, test=0.05))
            return prepare(cfg, mapper)

        # naive script and our prep in one process, alternated; each keeps its best round
        naive_rounds, serial_rounds, check_rounds = [], [], []
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}: naive single-process PIL script, then our prep in one process ...")
            naive = bench.naive_prep(files, tmp / "naive.tar")
            naive_rounds.append(naive["images_per_s_per_core"])
            shutil.rmtree(tmp / "serial", ignore_errors=True)
            serial = ours(tmp / "serial", serial_map)
            serial_rounds.append(serial["images_written"] / serial["write_s"])
            check_rounds.append(serial["images_checked"] / serial["check_s"])
        print(f"our prep on Ray ({args.cpus} CPUs) ...")
        shard_prep.connect("local", args.cpus)
        try:
            parallel = ours(tmp / "ray", shard_prep.ray_map)
        finally:
            shard_prep.shutdown()
        bytes_per_image = sum(p.stat().st_size for p in (tmp / "ray").glob("*.tar")) / parallel["accepted"]
        best_naive = max(naive_rounds)
        prep = {
            "naive": {"images_per_s_per_core": best_naive, "rounds": naive_rounds,
                      "bytes_per_image": naive["bytes_per_image"]},
            "serial": {"write_per_core": max(serial_rounds), "rounds": serial_rounds,
                       "check_per_core": max(check_rounds)},
            "ray": {"cpus": args.cpus, "check_per_core": parallel["images_checked"] / parallel["check_s"] / args.cpus,
                    "write_per_core": parallel["images_written"] / parallel["write_s"] / args.cpus,
                    "total_s_with_ray_start": parallel["total_s"], "bytes_per_image": bytes_per_image},
        }
        prep["ratio_serial_vs_naive"] = prep["serial"]["write_per_core"] / best_naive
        prep["ratio_ray_vs_naive"] = prep["ray"]["write_per_core"] / best_naive
        result["prep"] = prep
        # check pass: the one-process rate (on a few hundred images the Ray figure is mostly worker start-up);
        # write pass: the Ray rate, task overheads and this machine's contention included (conservative)
        result["casia"] = bench.extrapolate(prep["serial"]["check_per_core"], prep["ray"]["write_per_core"],
                                            args.node_cores, 1000) | {
            "output_gb": bench.CASIA_IMAGES * bytes_per_image / 1e9,
            "total_min_at_one_process_rate": bench.extrapolate(
                prep["serial"]["check_per_core"], prep["serial"]["write_per_core"], args.node_cores, 1000)["total_min"]}

        print("streaming: shards vs naive map-style JPEG dataset, alternated ...")
        ours(tmp / "png0", serial_map, png_level=0)  # stored PNGs: cheaper to decode, ~2x the bytes
        ours(tmp / "raw", serial_map, members="raw")  # raw uint8 levels: no decoding at all
        m = read_manifest(tmp / "ray")
        cfg = StreamConfig(batch_size=args.batch, batches_per_epoch=10**9, workers=0, shuffle=200)
        streams = {
            "shards": build_loader(shard_urls(tmp / "ray", "train", manifest=m), cfg, rank=0, world_size=1, epoch=0),
            "naive": bench.naive_batches(files, args.batch),
            "shards_png_level0": build_loader(shard_urls(tmp / "png0", "train"), cfg, rank=0, world_size=1, epoch=0),
            "shards_raw": build_loader(shard_urls(tmp / "raw", "train"), cfg, rank=0, world_size=1, epoch=0),
        }
        rates = bench.interleaved_rates(streams, args.batch, args.batches, args.rounds)
        for name, folder in (("shards_png_level0", "png0"), ("shards_raw", "raw")):
            rates[name]["bytes_per_image"] = sum(p.stat().st_size for p in (tmp / folder).glob("*.tar")) / parallel["accepted"]
        naive_rate = rates["naive"]["samples_per_s_per_worker"]
        result["stream"] = rates | {
            "ratio": rates["shards"]["samples_per_s_per_worker"] / naive_rate,
            "ratio_png_level0": rates["shards_png_level0"]["samples_per_s_per_worker"] / naive_rate,
            "ratio_raw": rates["shards_raw"]["samples_per_s_per_worker"] / naive_rate,
            "train_samples": split_samples(m, "train")}
        stream = rates["shards"]
        step = Path(args.step_json)
        if step.exists():
            d = json.loads(step.read_text())
            best = max(v["images_per_s"] for v in d["variants"].values())
            result["stream"]["step"] = {"file": str(step), "preset": d["config"]["preset"], "images_per_s": best,
                                        "stream_over_step_per_worker": stream["samples_per_s_per_worker"] / best,
                                        "workers_to_keep_up": math.ceil(best / stream["samples_per_s_per_worker"])}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["load_average_end"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    _print(result)
    print(f"wrote {out}")
    return 0


def _print(r: dict) -> None:
    p, s, c = r["prep"], r["stream"], r["casia"]
    print(f"prep, faces/s per core: naive PIL script {p['naive']['images_per_s_per_core']:.1f}, "
          f"ours in one process {p['serial']['write_per_core']:.1f} (x{p['ratio_serial_vs_naive']:.2f}), "
          f"ours on Ray {p['ray']['write_per_core']:.1f} (x{p['ratio_ray_vs_naive']:.2f}); "
          f"check pass {p['serial']['check_per_core']:.0f}/s per core")
    print(f"CASIA-WebFace ({c['images']:,} images) on one {c['cores']}-core node: {c['total_min']:.1f} min at the "
          f"Ray rate, {c['total_min_at_one_process_rate']:.1f} min at the one-process rate "
          f"({c['shards']} shards in {c['waves']} waves, ~{c['output_gb']:.0f} GB)")
    print(f"stream, samples/s per worker: shards {s['shards']['samples_per_s_per_worker']:.0f}, "
          f"naive JPEG+degrade dataset {s['naive']['samples_per_s_per_worker']:.0f} (x{s['ratio']:.2f}); "
          f"--png-level 0 shards {s['shards_png_level0']['samples_per_s_per_worker']:.0f} "
          f"(x{s['ratio_png_level0']:.2f}, {s['shards_png_level0']['bytes_per_image'] / 1e3:.0f} kB/image vs "
          f"{p['ray']['bytes_per_image'] / 1e3:.0f}); --members raw shards "
          f"{s['shards_raw']['samples_per_s_per_worker']:.0f} (x{s['ratio_raw']:.2f}, "
          f"{s['shards_raw']['bytes_per_image'] / 1e3:.0f} kB/image)")
    if "step" in s:
        st = s["step"]
        print(f"training step ({st['file']}): {st['images_per_s']:.1f} images/s; one worker streams "
              f"x{st['stream_over_step_per_worker']:.0f} that; workers needed: {st['workers_to_keep_up']}")
    print(f"load average {r['load_average_start']} -> {r['load_average_end']} (shared machine: rates are lower bounds)")
