"""facesr.quality.image_scores computes torchmetrics' SSIM (both data ranges) from one separable pass: it must
give torchmetrics' own numbers on real faces at every scale."""

import pytest
import torch
from torchmetrics.functional.image import structural_similarity_index_measure

from facesr.degrade import crop_hr, degrade, quantize
from facesr.imageio import read_rgb
from facesr.quality import PAPER_DATA_RANGE, Reference, image_scores, upscale
from tests.conftest import LFW


@pytest.fixture(scope="module")
def faces():
    files = sorted(p for p in LFW.glob("A*/*.jpg"))[:6]
    hr = torch.stack([crop_hr(read_rgb(f)) for f in files])
    return {k: quantize(v) for k, v in degrade(hr).items()}


@pytest.mark.parametrize("key,size", [("x2", 48), ("x4", 96), ("hr", 192)])
@pytest.mark.parametrize("method", ["bicubic", "noisy"])
def test_ssim_equals_torchmetrics_on_real_faces(faces, key, size, method):
    """Per image, ssim and ssim_paper equal torchmetrics' structural_similarity_index_measure at data_range 1 and
    256/255, computed in float64 (within 5e-6; torchmetrics' own float32 result is off by up to 4e-5 on these
    faces, ours by under 2e-6), for bicubic outputs and for noisy copies of the targets."""
    target = faces[key]
    if method == "bicubic":
        pred = upscale(faces["lr"], size, "bicubic")
    else:
        pred = quantize(target + 0.05 * torch.randn(target.shape, generator=torch.Generator().manual_seed(0)))
    got = image_scores(pred, target)
    cached = image_scores(pred, Reference(target))  # the target's moments filtered once, as evaluation reuses them
    for m in got:
        assert torch.allclose(cached[m], got[m], rtol=0, atol=1e-6), (m, (cached[m] - got[m]).abs().max())
    for name, rng in (("ssim", 1.0), ("ssim_paper", PAPER_DATA_RANGE)):
        want = structural_similarity_index_measure(pred.double(), target.double(), data_range=rng, reduction="none")
        assert got[name].shape == want.shape == (len(target),) and got[name].dtype == torch.float32
        assert torch.allclose(got[name].double(), want, atol=5e-6), (name, (got[name] - want).abs().max())
    assert (got["ssim"] < 1).all() and (got["ssim_paper"] > got["ssim"]).all()  # larger L: larger constants


def test_ssim_loss_window_matches_reflect_padded_convolution():
    """The loss's matmul filter equals reflect padding + a 2-D Gaussian convolution, at a non-square size too."""
    from facesr.losses import ssim_moments

    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(2, 3, 24, 40, generator=g, dtype=torch.float64), torch.rand(2, 3, 24, 40, generator=g, dtype=torch.float64)
    t = torch.arange(11, dtype=torch.float64) - 5
    k = torch.exp(-0.5 * (t / 1.5) ** 2)
    k2 = torch.outer(k / k.sum(), k / k.sum()).expand(3, 1, 11, 11)
    mu = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (5, 5, 5, 5), mode="reflect"), k2, groups=3)
    assert torch.allclose(ssim_moments(x, y)[0], mu, atol=1e-12)


def test_bicubic_as_matmuls_is_torchs_bicubic():
    """facesr.resample.upsample_bicubic equals F.interpolate(bicubic, align_corners=False) to float rounding for
    every size the cascade and evaluation use (square and not), and stays fp32 inside a bf16 autocast region."""
    import torch.nn.functional as F

    from facesr.resample import upsample_bicubic

    g = torch.Generator().manual_seed(0)
    for shape in ((2, 3, 24, 24), (1, 3, 48, 48), (2, 3, 24, 30)):
        x = torch.rand(*shape, generator=g)
        for n in (48, 96, 192):
            want = F.interpolate(x, size=(n, n), mode="bicubic", align_corners=False)
            assert (upsample_bicubic(x, n) - want).abs().max() < 1e-6, (shape, n)
    x = torch.rand(2, 3, 24, 24, generator=g).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = upsample_bicubic(x, 192)
    assert y.dtype == torch.float32
    assert (y - F.interpolate(x, size=(192, 192), mode="bicubic", align_corners=False)).abs().max() < 1e-6
