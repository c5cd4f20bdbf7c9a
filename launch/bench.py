"""`facesr bench KIND`: benchmarks that print figures and write JSON (never timed unit tests)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from facesr.models import PRESETS

# Other benchmarks live beside their subsystems; each module has configure(p) and run(args).
OTHERS = {"data": "launch.bench_data", "train": "launch.bench_train"}


def configure(p) -> None:
    sub = p.add_subparsers(dest="kind", required=True)
    s = sub.add_parser("step", help="training step: fp32 NCHW vs bf16 + channels_last, MFU vs conv peak")
    s.add_argument("--preset", default="paper", choices=sorted(PRESETS))
    s.add_argument("--batch", type=int, default=8)
    s.add_argument("--seconds", type=float, default=10.0, help="measuring time per variant")
    s.add_argument("--compile", action="store_true", help="torch.compile the SR network")
    s.add_argument("--threads", type=int, default=0)
    s.add_argument("--device", default="cpu", help="cpu, or cuda where a GPU is present")
    s.add_argument("--peak-seconds", type=float, default=3.0, help="measuring time per conv peak")
    s.add_argument("--out", default=None, help="JSON path (default bench/step-<preset>.json)")
    for kind, module in OTHERS.items():
        if importlib.util.find_spec(module) is not None:
            mod = importlib.import_module(module)
            q = sub.add_parser(kind, help=(mod.__doc__ or "").strip().splitlines()[0])
            mod.configure(q)
            q.set_defaults(_bench=mod.run)


def run(args) -> int:
    if getattr(args, "_bench", None):
        return args._bench(args)
    from facesr.bench_step import StepBench, run_bench

    cfg = StepBench(preset=args.preset, batch=args.batch, seconds=args.seconds,
                    compile=args.compile, threads=args.threads, device=args.device,
                    peak_seconds=args.peak_seconds)
    result = run_bench(cfg)
    out = Path(args.out or f"bench/step-{args.preset}{'-compiled' if args.compile else ''}"
                                f"{'' if args.device == 'cpu' else '-' + args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0
