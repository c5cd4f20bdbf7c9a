"""`facesr train --config FILE [key=value ...]`: priors (stage 1) then the SR cascade (stage 2) on Ray + DeepSpeed.

Also ``python -m launch.train ...``, e.g. under
``ray job submit --working-dir . -- python -m launch.train --config launch/configs/paper.yaml``.
A run started again with the same ``run.name`` resumes where it stopped.
"""

from __future__ import annotations

import argparse
import sys


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True,
                        help="run config: a YAML file, or a packaged one by name (cpu, demo, paper, scale, ...)")
    parser.add_argument("--run-dir", default=None, help="run folder (default <cluster.storage_path>/<run.name>)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. stage2.epochs=3")


def run(args: argparse.Namespace) -> int:
    from cluster.config import ConfigError, load_config

    overrides = list(args.overrides) + ([f"run.run_dir={args.run_dir}"] if args.run_dir else [])
    try:
        cfg = load_config(args.config, overrides)
        from cluster.trainer import train

        run_dir = train(cfg)
    except ConfigError as e:
        print(f"facesr train: config error: {e}", file=sys.stderr)
        return 2
    print(f"run folder: {run_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m launch.train`` (what `ray job submit` runs): `facesr train`, with its one-line errors."""
    from launch.cli import main as facesr

    return facesr(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    from launch.cli import exit_now

    exit_now(main())
