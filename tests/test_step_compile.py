"""``engine.step_compile`` through a real DeepSpeed engine: the compiled step is traced once, not again every step.

DeepSpeed (0.19) hooks the module it wraps with a forward pre-hook that reads its step counters; Dynamo guards
on them, so a compiled step that calls the module recompiled as they counted (each ~140 s for the paper preset on
an H200). `cluster.engine.initialize` drops those hooks when the step is compiled. Dynamo's ``eager`` backend
traces and guards as inductor's would, without inductor's minutes of code generation.
"""

import subprocess
import sys

from tests.conftest import ROOT

PROBE = r'''
import sys
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from cluster.gpu_check import init_one_rank
init_one_rank("gloo")
from cluster.config import load_config
from cluster.engine import initialize


def run(mode: str) -> str:
    torch._dynamo.reset()
    counters.clear()
    cfg = load_config("launch/configs/cpu.yaml", [f"engine.step_compile={mode}", "engine.zero_stage=0",
                                                  "stage2.batch_size=2", "stage2.max_micro_batch=1"])  # accumulation 2
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    eng, b = initialize(net, cfg.stage2, cfg.engine, 1)
    assert b.accumulation == 2

    def forward(model, x):
        return model(x).square().mean()

    step = torch.compile(forward, backend="eager", dynamic=False)
    x = torch.randn(1, 3, 8, 8)
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            for _ in range(6):  # three optimizer steps of two micro-batches
                eng.backward(step(eng.module, x))
                eng.step()
        return f"OK {sum(counters['graph_break'].values())}"
    except Exception as e:
        return f"RECOMPILED {type(e).__name__} {str(e).splitlines()[0][:200]}"


for mode in sys.argv[1:]:
    print(mode, run(mode))
'''


def test_a_compiled_step_through_deepspeed_is_traced_once_without_graph_breaks():
    """With the step compiled (hooks dropped): six micro-steps, one trace, no graph break. With the step eager
    (DeepSpeed's hooks kept, as they are for an eager step), the same compiled function recompiles: the hooks'
    counters are what made it."""
    res = subprocess.run([sys.executable, "-c", PROBE, "default", "off"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    out = dict(line.split(" ", 1) for line in res.stdout.splitlines() if line.startswith(("default ", "off ")))
    assert out["default"] == "OK 0", out
    assert out["off"].startswith("RECOMPILED"), out
