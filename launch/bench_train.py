"""`python -m launch.bench_train`: training images/s per worker (tiny, paper; fp32 vs precision auto; ZeRO 0/1/2)
and the overhead of Ray Train + DeepSpeed against a plain PyTorch loop; prints figures, writes JSON."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


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
    from cluster.bench_train import TrainBench, report, run as bench

    res = bench(TrainBench(shards=args.shards, presets=args.presets, workers=args.workers, steps=args.steps,
                           paper_steps=args.paper_steps, threads=args.threads,
                           precisions=args.precisions, zero_stages=args.zero_stages, degradation=args.degradation))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(report(res))
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.bench_train", description=__doc__.splitlines()[0])
    configure(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
