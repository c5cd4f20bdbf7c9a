"""Degradation model: shapes, determinism, anti-aliasing, phase, residuals, crop rules."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from facesr.degrade import (
    DEFAULT, TooSmallError, crop_hr, degrade, downsample2x, gaussian_kernel1d, quadruplet, residual,
)
from facesr.vocab import LEVELS, SIZES

from .conftest import LFW


def _face(path=None):
    path = path or next(p for p in sorted((LFW / "Aaron_Eckhart").glob("*.jpg")))
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)


def test_quadruplet_shapes_and_range():
    """A 250x250 face gives lr/x2/x4/hr of 24/48/96/192 in [0, 1] on the 8-bit grid."""
    q = quadruplet(_face())
    for k in LEVELS:
        assert q[k].shape == (3, SIZES[k], SIZES[k])
        assert 0 <= q[k].min() and q[k].max() <= 1
        assert torch.equal(q[k], (q[k] * 255).round() / 255)


def test_hr_is_the_central_crop_without_resampling():
    """hr of a 250x250 source is exactly its central 192x192 pixels."""
    img = _face()
    hr = crop_hr(img)
    assert torch.equal((hr * 255).round().to(torch.uint8), img[:, 29:221, 29:221])


def test_batched_equals_single_and_is_deterministic():
    """Batch-first functions give each image of a batch of three different faces what it gets alone (a batch
    that mixed images, or used the first one's for all, would differ), and the same on every call."""
    people = ("Aaron_Eckhart", "Colin_Powell", "George_W_Bush")
    imgs = torch.stack([_face(sorted((LFW / p).glob("*.jpg"))[0]) for p in people])
    a, b = quadruplet(imgs), quadruplet(imgs)
    for i in range(len(people)):
        single = quadruplet(imgs[i])
        for k in LEVELS:
            assert torch.equal(a[k], b[k])
            assert torch.equal(a[k][i], single[k]), (people[i], k)
    assert not torch.equal(a["lr"][0], a["lr"][1]) and not torch.equal(a["lr"][1], a["lr"][2])


def test_kernels_are_normalised():
    """Blur kernels sum to one, odd ones centred, even ones symmetric around a half pixel."""
    for s in (1 / 3, 1.0, 7 / 3):
        k = gaussian_kernel1d(s)
        assert k.numel() % 2 == 1 and math.isclose(k.sum().item(), 1, rel_tol=1e-6)
        assert torch.allclose(k, k.flip(0))
    ke = gaussian_kernel1d(1.0, even=True)
    assert ke.numel() % 2 == 0 and torch.allclose(ke, ke.flip(0))


def test_constant_image_is_preserved():
    """Blur and decimation keep a flat image flat (no border darkening)."""
    x = torch.full((2, 3, 192, 192), 0.4)
    for v in degrade(x).values():
        assert torch.allclose(v, torch.full_like(v, 0.4), atol=1e-6)
    assert residual(x[:, :, :96, :96], "x4").abs().max() < 1e-6


def test_downsampling_suppresses_aliasing():
    """A stripe pattern at the fine Nyquist frequency nearly vanishes after one 2x step."""
    x = torch.zeros(1, 3, 96, 96)
    x[..., ::2] = 1.0  # period-2 stripes
    y = downsample2x(x)
    assert (y.max() - y.min()) < 0.05
    naive = x[..., ::2, ::2]
    assert (naive.max() - naive.min()) == 0  # naive decimation aliases it to a flat field of 1s
    assert abs(y.mean().item() - 0.5) < 0.01  # ...while blurring keeps the true mean


def test_phase_matches_align_corners_false():
    """A linear ramp decimates to the values at pixel-pair centres (2i + 0.5)."""
    ramp = torch.arange(96, dtype=torch.float64).view(1, 1, 1, 96).expand(1, 3, 96, 96).contiguous()
    y = downsample2x(ramp)
    centres = torch.arange(48, dtype=torch.float64) * 2 + 0.5
    assert torch.allclose(y[0, 0, 40, 8:40], centres[8:40], atol=1e-6)  # away from reflected borders


def test_residual_is_high_pass():
    """Δx is zero-mean and non-trivial; σ=1/3 at x2 keeps only a faint high-pass (as the paper sets it)."""
    q = quadruplet(_face())
    for k in ("x2", "x4", "hr"):
        d = residual(q[k][None], k)
        assert d.shape == q[k][None].shape
        assert abs(d.mean().item()) < 1e-3
        assert d.abs().mean() > 1e-4


@pytest.mark.parametrize("size,ok", [(250, True), (500, True), (200, True), (191, False), (120, False)])
def test_crop_rules(size, ok):
    """Sources are normalised to 250px framing; under 192px they are refused as too small."""
    img = F.interpolate(_face()[None].float(), size=(size, size), mode="bilinear").round().to(torch.uint8)[0]
    if ok:
        assert crop_hr(img).shape == (3, 192, 192)
    else:
        with pytest.raises(TooSmallError, match="smaller than the 192px crop"):
            crop_hr(img)


def test_rejects_wrong_channel_count():
    """Greyscale tensors are refused with a message naming the channel count."""
    with pytest.raises(ValueError, match="3 colour channels"):
        crop_hr(torch.zeros(1, 250, 250, dtype=torch.uint8))


def test_config_is_documented():
    """The degradation parameters serialise for the shard manifest."""
    d = DEFAULT.to_dict()
    assert d["crop"] == 192 and d["blur_sigma"] == 1.0 and d["residual_sigma"]["hr"] == pytest.approx(7 / 3)


@pytest.mark.parametrize("shape,sigma,even,stride", [((2, 3, 48, 48), 1 / 3, False, 1), ((2, 3, 96, 80), 1.0, False, 1),
                                                     ((1, 3, 192, 192), 7 / 3, False, 1), ((2, 3, 64, 96), 1.0, True, 2)])
def test_matmul_filter_equals_reflect_padded_convolution(shape, sigma, even, stride):
    """The banded matrices (facesr.degrade's docstring) compute what F.pad(reflect) + a depthwise conv2d does, on
    square and non-square images, blur and blur-and-decimate; a padding the side cannot reflect is refused."""
    from facesr.degrade import _separable, gaussian_kernel1d

    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    k = gaussian_kernel1d(sigma, even)
    pad = (k.numel() // 2 - 1, k.numel() // 2) if even else ((k.numel() - 1) // 2,) * 2
    c = shape[1]
    want = F.conv2d(F.pad(x, (0, 0, *pad), mode="reflect"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1),
                    stride=(stride, 1), groups=c)
    want = F.conv2d(F.pad(want, (*pad, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1),
                    stride=(1, stride), groups=c)
    got = _separable(x, sigma, even, stride, pad)
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-6)
    with pytest.raises(ValueError, match="reflect padding of"):
        _separable(x[..., :pad[1], :pad[1]], sigma, even, stride, pad)
