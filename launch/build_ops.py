"""`python -m launch.build_ops` (run by `make venv`): build DeepSpeed's JIT ops into the venv now, not at a run's
first start (cluster.engine.build_ops)."""

from __future__ import annotations

import time


def main() -> None:
    from cluster.engine import build_ops, extensions_dir

    t = time.perf_counter()
    built = build_ops()
    what = ", ".join(built) if built else "nothing (already built)"
    print(f"DeepSpeed ops: built {what} in {time.perf_counter() - t:.0f} s, in {extensions_dir()}")


if __name__ == "__main__":
    main()
