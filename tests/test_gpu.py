"""GPU-only checks (marker ``gpu``; skipped without CUDA): the fast path's promises where they matter.

`make gpu-check` runs these with the step benchmarks and a train -> kill -> resume on GPUs.
"""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _stage2(preset: str = "tiny", batch: int = 8):
    from facesr.losses import CSRIPLoss
    from facesr.models import FrozenPrior, SRNet, build_prior, get_preset
    from facesr.step import resolve_precision
    from facesr.vocab import TARGETS

    dev = torch.device("cuda")
    prec = resolve_precision("auto", dev)
    p = get_preset(preset)
    net = SRNet(p.sr).to(dev)
    priors = {k: FrozenPrior(prec.module(build_prior(p.prior, 100))) for k in TARGETS}
    loss_fn = CSRIPLoss(priors).to(dev)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, fused=True)
    return dev, prec, net, loss_fn, opt


def test_auto_precision_is_bf16_on_ampere_and_later():
    """precision auto picks bf16 + channels_last on compute capability >= 8.0, fp32 before."""
    from facesr.step import resolve_precision

    prec = resolve_precision("auto", "cuda")
    assert prec.bf16 == (torch.cuda.get_device_capability()[0] >= 8) and prec.channels_last


def test_training_step_makes_no_cuda_synchronisation():
    """Steps with uint8 pinned batches, device conversion, eq. (4), backward and fused Adam run under
    torch.cuda.set_sync_debug_mode("error"): any implicit or explicit device sync raises."""
    from facesr.step import TermSums, sr_forward, to_device
    from facesr.vocab import SIZES

    dev, prec, net, loss_fn, opt = _stage2()
    batch = {k: torch.randint(0, 256, (8, 3, s, s), dtype=torch.uint8).pin_memory() for k, s in SIZES.items()}
    batch["cls"] = torch.tensor([0, -1, 3, 9, 1, 2, 3, 4]).pin_memory()
    sums = TermSums()
    for _ in range(2):  # warm-up: cuDNN/cuBLAS handles, optimizer state
        terms = sr_forward(net, loss_fn, to_device(batch, dev, prec), prec)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        opt.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            terms = sr_forward(net, loss_fn, to_device(batch, dev, prec), prec)
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            opt.step()
            sums.add(terms)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert sums.mean()["loss"] > 0


def test_robust_degradation_makes_no_cuda_synchronisation_and_matches_the_cpu():
    """degrade_lr with the robust model on CUDA runs under set_sync_debug_mode("error"); its JPEG equals the
    CPU's bit for bit (the same integer arithmetic on both)."""
    from facesr.degradations import DEGRADATIONS, degrade_lr
    from facesr.jpeg import jpeg_round_trip

    hr = torch.randint(0, 256, (8, 3, 192, 192), dtype=torch.uint8).pin_memory().to("cuda", non_blocking=True)
    cfg = DEGRADATIONS["robust"]
    degrade_lr(hr, cfg, torch.Generator("cuda").manual_seed(0))  # warm-up: resampling matrices uploaded once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for seed in range(3):
            lr = degrade_lr(hr, cfg, torch.Generator("cuda").manual_seed(seed))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert lr.shape == (8, 3, 24, 24)
    u8 = torch.randint(0, 256, (6, 3, 24, 24), dtype=torch.uint8)
    qs = [10, 30, 50, 70, 90, 100]
    assert torch.equal(jpeg_round_trip(u8.cuda(), qs).cpu(), jpeg_round_trip(u8, qs))


def test_cuda_graph_step_matches_eager():
    """The step compiled with reduce-overhead (CUDA graphs) gives the eager step's loss on the same weights."""
    from facesr.step import TermSums, compile_forward, sr_forward, to_device
    from facesr.vocab import SIZES

    dev, prec, net, loss_fn, opt = _stage2()
    batch = {k: torch.randint(0, 256, (8, 3, s, s), dtype=torch.uint8) for k, s in SIZES.items()}
    batch["cls"] = torch.tensor([0, -1, 3, 9, 1, 2, 3, 4])
    b = to_device(batch, dev, prec)
    net.eval()  # BatchNorm from running statistics: both calls see the same function

    def forward(m, x):
        return sr_forward(m, loss_fn, x, prec)

    graphed = compile_forward(forward, "reduce-overhead")
    sums = TermSums()
    for _ in range(3):
        sums.add(graphed(net, b))
    eager = float(forward(net, b)["loss"])
    assert abs(sums.mean()["loss"] - eager) < 2e-2 * abs(eager)


def test_bench_step_times_convolutions_as_the_workers_pick_them():
    """`bench step` (and through it gpu_check's step stages) runs with cuDNN's autotuner on, as the worker loop
    does (facesr.hardware.use_device): its img/s and MFU are the training step's, not heuristics' algorithms."""
    from launch.bench.step import StepBench, run_bench

    torch.backends.cudnn.benchmark = False
    r = run_bench(StepBench(preset="tiny", device="cuda", seconds=0.2, peak_seconds=0.1, warmup=2, modes=("off",)),
                  log=lambda *_: None)
    assert torch.backends.cudnn.benchmark and r["variants"]
