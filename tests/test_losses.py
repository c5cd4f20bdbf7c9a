"""SSIM loss against torchmetrics, CE on residuals, the eq. (4) objective and its named terms."""

import pytest
import torch
import torch.nn.functional as F
from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim

from facesr.losses import C1, C2, CSRIPLoss, PriorLoss, ssim, ssim_loss
from facesr.models import PRESETS, FrozenPrior, SRNet, build_prior
from facesr.step import Precision, prior_forward, sr_forward, to_device
from facesr.vocab import SIZES, TARGETS


def test_paper_constants():
    """C1, C2 are (0.01·256)² ≈ 6.55 and (0.03·256)² ≈ 58.98."""
    assert C1 == pytest.approx(6.5536) and C2 == pytest.approx(58.9824)


@pytest.mark.parametrize("size", [48, 96, 192])
@pytest.mark.parametrize("noise", [0.02, 0.1, 0.3])
def test_ssim_matches_torchmetrics(size, noise):
    """Our SSIM equals torchmetrics' with the same Gaussian window and constants, within 1e-4."""
    g = torch.Generator().manual_seed(size)
    x = torch.rand(2, 3, size, size, generator=g)
    y = (x + noise * torch.randn(x.shape, generator=g)).clamp(0, 1)
    ref = tm_ssim(y * 255, x * 255, gaussian_kernel=True, sigma=1.5, kernel_size=11,
                  data_range=256.0, k1=0.01, k2=0.03)
    assert abs(ssim(y, x).item() - ref.item()) < 1e-4


def test_ssim_loss_bounds():
    """L_SSIM is 0 for identical images and grows with distortion."""
    x = torch.rand(1, 3, 48, 48)
    assert ssim_loss(x, x).item() == pytest.approx(0, abs=1e-6)
    assert ssim_loss(x, (x + 0.05).clamp(0, 1)) < ssim_loss(x, torch.rand_like(x))


def test_ssim_is_fp32_under_autocast():
    """Inside bf16 autocast the SSIM is still computed in fp32 (same value as outside)."""
    x, y = torch.rand(2, 3, 48, 48), torch.rand(2, 3, 48, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = ssim(x.bfloat16(), y.bfloat16())
    assert inside.dtype == torch.float32
    assert inside.item() == pytest.approx(ssim(x.bfloat16().float(), y.bfloat16().float()).item(), abs=1e-6)


def _batch(n=2, classes=5):
    g = torch.Generator().manual_seed(0)
    b = {k: torch.rand(n, 3, s, s, generator=g) for k, s in SIZES.items()}
    b["cls"] = torch.tensor([1, -1] * (n // 2))
    return b


def test_total_loss_terms_and_alpha():
    """Eq. (4): loss = Σ SSIM losses + α Σ CE, terms named per scale; α=0 drops CE."""
    tiny = PRESETS["tiny"]
    priors = {k: FrozenPrior(build_prior(tiny.prior, 5)) for k in TARGETS}
    net = SRNet(tiny.sr)
    batch = _batch()
    sr = net(batch["lr"])
    terms = CSRIPLoss(priors, alpha=0.001)(sr, batch)
    assert set(terms) == {"loss", "ssim/x2", "ssim/x4", "ssim/x8", "ce/x2", "ce/x4", "ce/x8"}
    expect = sum(0.5 * (1 - terms[f"ssim/{s}"]) + 0.001 * terms[f"ce/{s}"] for s in ("x2", "x4", "x8"))
    assert terms["loss"].item() == pytest.approx(expect.item(), rel=1e-5)
    ablation = CSRIPLoss(priors, alpha=0.0)(sr, batch)
    assert set(ablation) == {"loss", "ssim/x2", "ssim/x4", "ssim/x8"}


def test_identity_loss_reaches_sr_network_not_priors():
    """The CE gradient flows through the frozen priors into the SR network only."""
    tiny = PRESETS["tiny"]
    priors = {k: FrozenPrior(build_prior(tiny.prior, 5)) for k in TARGETS}
    net = SRNet(tiny.sr)
    batch = _batch()
    terms = CSRIPLoss(priors, alpha=1.0)(net(batch["lr"]), batch)
    assert not terms["ce/x8"].requires_grad  # reported terms are detached; only "loss" carries the graph
    terms["loss"].backward()
    with_ce = net.branches[-1].body[-1].weight.grad.clone()
    net.zero_grad()
    CSRIPLoss(priors, alpha=0.0)(net(batch["lr"]), batch)["loss"].backward()
    assert (with_ce - net.branches[-1].body[-1].weight.grad).abs().sum() > 0  # CE changed the SR gradient
    assert all(p.grad is None for pr in priors.values() for p in pr.parameters())


@pytest.mark.parametrize("precision", [Precision(False, False), Precision(True, True)], ids=["fp32", "bf16_cl"])
def test_steps_fall_with_training(precision):
    """A few Adam steps on one batch lower the stage-2 loss and the stage-1 loss, in both precisions."""
    torch.manual_seed(0)
    tiny = PRESETS["tiny"]
    batch = to_device(_batch(4), "cpu", precision)
    batch["cls"] = torch.tensor([0, 1, 2, 3])
    net = precision.module(SRNet(tiny.sr))
    priors = {k: FrozenPrior(precision.module(build_prior(tiny.prior, 5))) for k in TARGETS}
    loss_fn, opt = CSRIPLoss(priors), torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        t = sr_forward(net, loss_fn, batch, precision)
        opt.zero_grad()
        t["loss"].backward()
        opt.step()
        losses.append(t["loss"].item())
        assert t["loss"].dtype == torch.float32
    assert losses[-1] < losses[0]
    stage1 = torch.nn.ModuleDict({k: precision.module(build_prior(tiny.prior, 5)) for k in TARGETS})
    opt1 = torch.optim.Adam(stage1.parameters(), lr=1e-2)
    ce = []
    for _ in range(10):
        t = prior_forward(stage1, PriorLoss(), batch, precision)
        opt1.zero_grad()
        t["loss"].backward()
        opt1.step()
        ce.append(t["loss"].item())
    assert ce[-1] < ce[0] and set(t) == {"loss", "ce/x2", "ce/x4", "ce/x8", "acc/x2", "acc/x4", "acc/x8",
                                           "acc5/x2", "acc5/x4", "acc5/x8"}


def test_priors_on_whole_images_see_images_everywhere():
    """``stage1.input=image`` (ℓp's face SqueezeNets): stage 1 trains each prior on the whole images of its level,
    and whatever judges with such a prior feeds it the same: eq. (4)'s CE on the SR output itself and the priors'
    top-1/top-5 scoring; residual priors keep seeing the high-pass Δx (the paper's, and the default)."""
    from facesr.degrade import prior_view, residual
    from facesr.evaluate import score_priors
    from facesr.losses import identity_ce

    torch.manual_seed(3)
    tiny = PRESETS["tiny"]
    batch = _batch(4)
    batch["cls"] = torch.tensor([0, 1, 2, 3])
    nets = torch.nn.ModuleDict({k: build_prior(tiny.prior, 5).eval() for k in TARGETS})
    fp32 = Precision(False, False)
    for kind, see in (("image", lambda x, k: x), ("residual", residual)):
        t = prior_forward(nets, PriorLoss(), batch, fp32, kind)
        for key, scale in (("x2", "x2"), ("x4", "x4"), ("hr", "x8")):
            want = F.cross_entropy(nets[key](see(batch[key], key)), batch["cls"])
            assert t[f"ce/{scale}"].item() == pytest.approx(want.item(), rel=1e-5)
        frozen = {k: FrozenPrior(nets[k], input=kind) for k in TARGETS}
        sr = {k: batch[k].flip(-1) for k in TARGETS}
        terms = CSRIPLoss(frozen, alpha=1.0)(sr, batch)
        want = identity_ce(nets["hr"](see(sr["hr"], "hr")), batch["cls"])
        assert terms["ce/x8"].item() == pytest.approx(want.item(), rel=1e-5)
        scores = score_priors(frozen, [batch])
        hits = (nets["x4"](see(batch["x4"], "x4")).argmax(1) == batch["cls"]).float().mean().item()
        assert scores["images"] == 4 and scores["x4"]["top1"] == pytest.approx(hits)
    image = prior_forward(nets, PriorLoss(), batch, fp32, "image")["ce/x8"]
    assert image.item() != pytest.approx(prior_forward(nets, PriorLoss(), batch, fp32)["ce/x8"].item())
    with pytest.raises(ValueError, match="unknown prior input 'faces'"):
        prior_view(batch["hr"], "hr", "faces")


def test_prior_loss_top5_and_class_weights_match_torch():
    """Top-1/top-5 against a direct count; the class-weighted CE is torch's weighted mean, unlabelled ignored."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 9, generator=g)
    cls = torch.randint(0, 9, (12,), generator=g)
    cls[[2, 7]] = -1  # outside the class map
    weight = torch.rand(9, generator=g) + 0.1
    t = PriorLoss(weight)({"hr": logits}, cls)
    keep = cls >= 0
    want = F.cross_entropy(logits[keep], cls[keep], weight=weight)
    assert torch.allclose(t["ce/x8"], want, atol=1e-6)
    ranks = (logits > logits.gather(1, cls.clamp(min=0)[:, None])).sum(1)  # classes scored above the true one
    assert t["acc/x8"].item() == pytest.approx(((ranks == 0) & keep).sum().item() / keep.sum().item())
    assert t["acc5/x8"].item() == pytest.approx(((ranks < 5) & keep).sum().item() / keep.sum().item())
    plain = PriorLoss()({"hr": logits}, cls)
    assert torch.allclose(plain["ce/x8"], F.cross_entropy(logits[keep], cls[keep]), atol=1e-6)


def test_constants_cached_during_evaluation_still_serve_training():
    """A process that evaluates first fills the caches of constant tensors (SSIM's window matrices, the cascade's
    blur matrices, resize matrices) under torch.inference_mode; training after it must still backpropagate
    through them (an inference tensor cannot be saved for backward: the suite run in reverse order hit it)."""
    from facesr import degrade as dg
    from facesr import degradations as dgs
    from facesr import losses

    for cached in (losses.window_matrix, dg._band, dgs.resize_matrix, dgs._matrix64, dgs._paper64):
        cached.cache_clear()
    g = torch.Generator().manual_seed(0)
    hr = torch.rand(2, 3, 192, 192, generator=g)
    with torch.inference_mode():
        ssim(hr, hr.flip(-1))
        dg.degrade(hr)
        dgs.resample(hr, 24, "bicubic_aa")
        dgs.resample(hr, 24, "paper")
    x = hr.clone().requires_grad_(True)
    quad = dg.degrade(x)
    loss = ssim_loss(quad["x4"], quad["x4"].detach().flip(-1)) + dgs.resample(x, 24, "bicubic_aa").mean()
    loss = loss + dgs.resample(x, 24, "paper").mean()
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
