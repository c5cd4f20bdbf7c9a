"""`facesr bench KIND`: benchmarks that print figures and write JSON under ``bench/`` (never timed unit tests).

Every benchmark lives in this package, one module per kind, each with ``configure(parser)`` and
``run(args) -> int`` and its module docstring's first line as help. They sit in ``launch/`` because
a benchmark times one layer against a naive baseline and often several layers together (the step
is facesr's, streaming is shards', throughput is cluster's Ray Train + DeepSpeed), and launch/ is
the folder that may import every layer; they reach ray and deepspeed only through ``cluster``
(tests/test_layout.py).
"""

from __future__ import annotations

import importlib

KINDS = {  # kind -> module; heavy imports (Ray, DeepSpeed) happen inside each module's run()
    "step": "launch.bench.step",
    "roofline": "launch.bench.roofline",
    "degrade": "launch.bench.degrade",
    "data": "launch.bench.data",
    "train": "launch.bench.train",
    "store": "launch.bench.store",
    "syncs": "launch.bench.syncs",
    "eval": "launch.bench.eval",
    "faces": "launch.bench.faces",
}


def configure(p) -> None:
    sub = p.add_subparsers(dest="kind", required=True)
    for kind, module in KINDS.items():
        mod = importlib.import_module(module)
        q = sub.add_parser(kind, help=(mod.__doc__ or "").strip().splitlines()[0])
        mod.configure(q)
        q.set_defaults(_bench=mod.run)


def run(args) -> int:
    return args._bench(args)
