"""Networks over every preset: shapes, no NaNs, depth, deploy parity, timm registry, frozen priors."""

import pytest
import timm
import torch

from facesr.models import PRESETS, FrozenPrior, SRNet, build_prior, conv_depth
from facesr.vocab import SIZES, TARGETS


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_srnet_shapes(preset):
    """Training forward gives images at 48/96/192, finite."""
    net = SRNet(PRESETS[preset].sr)
    out = net(torch.rand(2, 3, 24, 24))
    assert list(out) == list(TARGETS)
    for k, v in out.items():
        assert v.shape == (2, 3, SIZES[k], SIZES[k])
        assert torch.isfinite(v).all()


def test_paper_depth_is_53():
    """The paper preset has 53 conv layers from LR to the 8x output."""
    assert conv_depth(SRNet(PRESETS["paper"].sr)) == 53


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_deploy_keeps_8x_output(preset):
    """Dropping the training branches leaves the 8x output bit-identical and removes parameters."""
    torch.manual_seed(0)
    net = SRNet(PRESETS[preset].sr)
    for p in net.parameters():  # non-zero last convs so the branch actually contributes
        p.data.add_(0.01 * torch.randn_like(p))
    net.eval()
    deploy = net.deploy().eval()
    x = torch.rand(2, 3, 24, 24)
    with torch.no_grad():
        assert torch.equal(net(x)["hr"], deploy(x))
    assert sum(p.numel() for p in deploy.parameters()) < sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_inference_sums_in_place_give_the_training_graphs_numbers(mode):
    """Without autograd the residual and skip sums are taken in place (no fresh activation per sum): the same
    numbers as with a graph, in fp32 and under bf16 autocast, channels_last too, and the input left as it was."""
    torch.manual_seed(0)
    net = SRNet(PRESETS["tiny"].sr).eval()
    for p in net.parameters():
        p.data.add_(0.01 * torch.randn_like(p))
    for channels_last, bf16 in ((False, False), (True, False), (True, True)):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        net = net.to(memory_format=fmt)
        x = torch.rand(2, 3, 24, 24).contiguous(memory_format=fmt)
        kept = x.clone()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            graph = net(x)
            with getattr(torch, mode)():
                fast, fast_hr = net(x), net.deploy()(x)
        assert torch.equal(x, kept)
        for k in TARGETS:
            assert fast[k].dtype == graph[k].dtype and torch.equal(fast[k], graph[k].detach()), (k, channels_last, bf16)
        assert torch.equal(fast_hr, graph["hr"].detach())


def test_initial_output_is_bicubic_upsampling():
    """Zero-initialised branch outputs start the cascade at the bicubic image (stable early training)."""
    net = SRNet(PRESETS["tiny"].sr)
    x = torch.rand(1, 3, 24, 24)
    up = torch.nn.functional.interpolate(x, size=(192, 192), mode="bicubic", align_corners=False)
    assert torch.allclose(net(x)["hr"], up, atol=1e-6)


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("key", TARGETS)
def test_prior_from_timm_registry(preset, key):
    """timm.create_model builds the prior for every scale with the asked number of classes."""
    cfg = PRESETS[preset].prior
    m = timm.create_model(cfg.name, num_classes=7, width=cfg.width)
    out = m(torch.randn(2, 3, SIZES[key], SIZES[key]))
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    assert cfg.name in timm.list_models("squeezenet*")


def test_frozen_prior_stays_frozen_and_passes_gradients():
    """FrozenPrior: eval after .train(), no weight grads, gradient reaches the input."""
    prior = FrozenPrior(build_prior(PRESETS["tiny"].prior, 5))
    prior.train()
    assert not prior.training and not any(m.training for m in prior.modules())
    assert not any(p.requires_grad for p in prior.parameters())
    x = torch.randn(2, 3, 48, 48, requires_grad=True)
    before = {k: v.clone() for k, v in prior.state_dict().items()}
    prior(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(torch.equal(before[k], v) for k, v in prior.state_dict().items())  # BN stats unchanged
