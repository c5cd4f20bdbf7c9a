"""No host synchronisation inside a training step of any shipped configuration: terms stay on the device until a
log step, the robust degradation reads nothing back, BatchNorm over workers gathers without a mask."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from facesr.degradations import DEGRADATIONS, degrade_lr
from facesr.syncs import SyncCounter

ROOT = Path(__file__).resolve().parents[1]


def test_counter_sees_the_calls_that_wait_for_the_device():
    """Each readback is counted once: values (float, item, bool, tolist, numpy), data-dependent shapes (nonzero,
    one-argument where, boolean-mask indexing and assignment), blocking copies (.cpu(), .to(device) from this
    repository's code); pure tensor maths, integer indexing and non-blocking copies are not."""
    x, m = torch.ones(3), torch.tensor([True, False, True])
    with SyncCounter() as c:
        y = (x * 2).sum()
        x[torch.tensor([0, 2])], x.to(torch.float64), x.to("cpu", non_blocking=True), torch.where(m, x, -x)
        assert c.total == 0, c.where
        float(y), y.item(), bool(y > 0), x.tolist(), x.numpy()
        x.nonzero(), torch.nonzero(x), torch.where(m)
        x[m], x.__setitem__(m, 0.0)
        x.cpu(), x.to("cpu")
    assert c.by_kind == {"__float__": 1, "item": 1, "__bool__": 1, "tolist": 1, "numpy": 1, "nonzero": 1,
                         "torch.nonzero": 1, "torch.where(cond)": 1, "mask indexing": 2, "cpu": 1,
                         "blocking .to()": 1}
    assert all("test_host_syncs.py" in w for w in c.where)
    assert float(y) == 6.0 and c.total == 12  # restored on exit: no counting, no recursion


def test_robust_degradation_reads_nothing_back_and_stays_reproducible():
    """degrade_lr with the robust model makes no counted sync; the same seed gives the same lr, and one generator
    used twice draws two different batches (it is re-seeded from the same stream), reproducibly."""
    hr = torch.randint(0, 256, (8, 3, 192, 192), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    cfg = DEGRADATIONS["robust"]
    degrade_lr(hr, cfg, torch.Generator().manual_seed(9))  # resampling matrices built once per size, outside
    with SyncCounter() as c:
        a = degrade_lr(hr, cfg, torch.Generator().manual_seed(1))
    assert c.total == 0, c.where
    g, h = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    first, second = degrade_lr(hr, cfg, g), degrade_lr(hr, cfg, g)
    assert torch.equal(first, a) and not torch.equal(first, second)
    assert torch.equal(degrade_lr(hr, cfg, h), first) and torch.equal(degrade_lr(hr, cfg, h), second)


def test_naive_degradation_is_what_the_probe_compares_against():
    """The benchmark's naive degradation (parameters drawn on the device, read back) makes host syncs: the probe's
    baseline is not zero by construction."""
    from launch.bench.syncs import naive_degrade_lr

    hr = torch.randint(0, 256, (8, 3, 192, 192), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with SyncCounter() as c:
        lr = naive_degrade_lr(hr, DEGRADATIONS["robust"], torch.Generator().manual_seed(1))
    assert c.total >= 8 and lr.shape == (8, 3, 24, 24) and np.isfinite(lr.numpy()).all()


@pytest.mark.slow  # 16 DeepSpeed engines: a few minutes on 2 quiet cores
def test_every_shipped_configuration_steps_without_host_syncs():
    """Every distinct step of launch/configs/*.yaml (all three stages; robust and paper degradation, the SRGAN critic,
    ℓp, MSE peers, class-balanced priors, the face recognizer and the identity term, the detail gate (stage 3, its
    frozen cascade inside the step), the weights' moving average,
    BatchNorm local and sync, bf16 and fp32, accumulation 2) runs three DeepSpeed optimizer steps with no host synchronisation; the log
    step's one transfer brings every term."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    res = subprocess.run([sys.executable, str(ROOT / "tests" / "sync_probe.py")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1800)
    line = next((l for l in res.stdout.splitlines() if l.startswith("RESULT ")), None)
    assert res.returncode == 0 and line, res.stdout[-2000:] + res.stderr[-3000:]
    rows = json.loads(line[len("RESULT "):])["rows"]
    from launch.bench.syncs import shipped

    covered = {n for r in rows for n in r["configs"]}
    assert {n for _, names in shipped() for n in names} <= covered
    assert any(r["signature"].get("degradation") == "robust" for r in rows)
    assert any(r["signature"].get("batchnorm") == "sync" for r in rows)
    assert any(r["signature"].get("precision") == "fp32" for r in rows)
    assert any(r["signature"].get("model") == "recognizer" for r in rows)  # identity-term.yaml's stage 1 (issue 25)
    assert any(r["signature"].get("identity") for r in rows)  # and its stage 2's identity term
    assert any(r["signature"].get("ema") for r in rows)  # demo.yaml's stage 2 writes its weights' moving average
    assert any(r["signature"].get("model") == "gate" for r in rows)  # identity-term.yaml's stage 3
    for r in rows:
        ours = r["ours"]
        assert ours["accumulation"] == 2
        assert ours["step_syncs"] == [] and ours["syncs_per_step"] == 0, (r["configs"], ours["step_syncs"])
        assert ours["log_syncs"] == 1 and "loss" in ours["terms"], r["configs"]
