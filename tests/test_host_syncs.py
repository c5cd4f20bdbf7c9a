"""No host synchronisation inside a training step: terms stay on the device until a log step."""

import json
import subprocess
import sys
from pathlib import Path

import torch

from facesr.syncs import SyncCounter

ROOT = Path(__file__).resolve().parents[1]


def test_counter_sees_the_calls_that_wait_for_the_device():
    """float(), .item(), bool() and .tolist() of a tensor are each counted once; pure tensor maths is not."""
    x = torch.ones(3)
    with SyncCounter() as c:
        y = (x * 2).sum()
        assert c.total == 0
        float(y), y.item(), bool(y > 0), x.tolist()
    assert c.by_kind == {"__float__": 1, "item": 1, "__bool__": 1, "tolist": 1}
    assert float(y) == 6.0  # restored on exit: no counting, no recursion
    assert c.total == 4


def test_training_steps_of_both_stages_make_no_host_sync_outside_log_steps():
    """Three optimizer steps (2 micro-batches each) of each stage through DeepSpeed ZeRO-0 — uint8 batches
    converted on the device, the priors' flips and crops drawn on the device, eq. (4), backward, fused Adam —
    make no host synchronisation; the log step's one transfer brings every term over."""
    res = subprocess.run([sys.executable, str(ROOT / "tests" / "sync_probe.py"), "0"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    line = next((l for l in res.stdout.splitlines() if l.startswith("RESULT ")), None)
    assert res.returncode == 0 and line, res.stdout[-2000:] + res.stderr[-2000:]
    out = json.loads(line[len("RESULT "):])
    for stage, want in (("stage1", {"loss", "ce/x8", "acc/x8"}), ("stage2", {"loss", "ssim/x8", "ce/x8"})):
        r = out[stage]
        assert r["accumulation"] == 2
        assert r["step_syncs"] == [], r["step_syncs"]
        assert r["log_syncs"] == 1 and want <= set(r["terms"])
