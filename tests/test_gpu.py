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
