"""The ``facesr`` console script: one subcommand per module in ``launch/``.

Each subcommand module defines ``configure(parser)`` and ``run(args) -> int``.
Modules are imported only when their subcommand runs, so ``facesr info`` never
pays for importing Ray or DeepSpeed.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util  # find_spec: the big venv imports it by chance, a bare install does not
import sys

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("launch.info", "shapes, layer counts, parameters and GFLOPs of a preset"),
    "bench": ("launch.bench", "benchmarks that print figures and write JSON"),
    "prep": ("launch.prep", "shard identity folders of faces into WebDataset tars (Ray job)"),
    "train": ("launch.train", "train priors (stage 1) and the SR cascade (stage 2) on Ray + DeepSpeed"),
    "eval": ("launch.eval", "PSNR/SSIM against bicubic, identity preservation, picture grids"),
    "sr": ("launch.sr", "super-resolve an image or a folder with a trained model"),
    "export": ("launch.export", "export the deploy network to TorchScript / ONNX"),
    "demo": ("launch.demo", "the whole pipeline on a face folder, on a local Ray cluster"),
}


def _available() -> dict[str, tuple[str, str]]:
    return {k: v for k, v in COMMANDS.items() if importlib.util.find_spec(v[0]) is not None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="facesr", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    argv = sys.argv[1:] if argv is None else argv
    commands = _available()
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_) in commands.items():
        p = sub.add_parser(name, help=help_)
        if name == chosen:  # import only the module that will run
            mod = importlib.import_module(module)
            mod.configure(p)
            p.set_defaults(_run=mod.run)
    args = parser.parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
