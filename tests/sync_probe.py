"""Run by tests/test_host_syncs.py in a fresh process (it initialises torch.distributed): real DeepSpeed steps
of every step configuration the shipped configs train, counting host synchronisations (launch/bench/syncs.py);
prints the result as JSON on a line starting with RESULT."""

import json
import sys

if __name__ == "__main__":
    from launch.bench.syncs import run_bench

    naive = "--naive" in sys.argv
    print("RESULT " + json.dumps(run_bench(steps=2, naive=naive, log=lambda line: print(line, file=sys.stderr))))
