"""Degradation models: sizes and 8-bit range, seeded determinism, the resampler against torch and PIL, config errors."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from launch.bench.degrade import bench_degradation
from facesr.degrade import crop_hr, degrade, quantize, to_uint8
from facesr.degradations import (
    DEGRADATIONS,
    EVAL_DEGRADATIONS,
    RESIZE_KINDS,
    Blur,
    DegradationError,
    Jpeg,
    Noise,
    Resize,
    RobustDegradation,
    blur_kernels,
    degrade_lr,
    describe,
    resample,
    resize_matrix,
    resolve,
    sample_params,
)

from .conftest import LFW

PEOPLE = ["Aaron_Eckhart", "Colin_Powell", "Serena_Williams", "Vladimir_Putin"]


@pytest.fixture(scope="module")
def hr() -> torch.Tensor:
    """Four real LFW faces as hr (4, 3, 192, 192) on the 8-bit grid."""
    imgs = [np.array(Image.open(sorted((LFW / p).glob("*.jpg"))[0]).convert("RGB")) for p in PEOPLE]
    return crop_hr(torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2))


def _on_8bit_grid(x: torch.Tensor) -> bool:
    return bool(x.min() >= 0 and x.max() <= 1 and torch.equal(x, (x * 255).round() / 255))


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _only(kind: str) -> RobustDegradation:
    return dataclasses.replace(DEGRADATIONS["robust"], resize=Resize(kinds=(kind,), weights=(1.0,)))


@pytest.mark.parametrize("kind", list(RESIZE_KINDS))
def test_each_resize_kind_gives_lr(hr, kind):
    """Every resize kind (with robust blur/noise/JPEG) gives (B, 3, 24, 24) on the 8-bit grid."""
    lr = degrade_lr(hr, _only(kind), _gen())
    assert lr.shape == (4, 3, 24, 24) and lr.dtype == torch.float32 and _on_8bit_grid(lr)


@pytest.mark.parametrize("name", list(EVAL_DEGRADATIONS))
def test_eval_degradations(hr, name):
    """Each fixed eval degradation gives 8-bit (B, 3, 24, 24), is deterministic and independent of batch position."""
    fn = EVAL_DEGRADATIONS[name]
    lr = fn(hr)
    assert lr.shape == (4, 3, 24, 24) and _on_8bit_grid(lr)
    assert torch.equal(lr, fn(hr))
    assert torch.equal(fn(hr.flip(0)), lr.flip(0))  # seeded per image, not per batch slot
    assert describe(name) and "\n" not in describe(name)


def test_seeded_and_reproducible(hr):
    """The same seed gives identical lr; another seed gives a different one; uint8 and float hr agree."""
    cfg = DEGRADATIONS["robust"]
    a, b, c = (degrade_lr(hr, cfg, _gen(s)) for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(degrade_lr(to_uint8(hr), cfg, _gen(0)), a)


def test_parameters_differ_per_sample(hr):
    """One face repeated 8 times in a batch gets 8 different degradations."""
    batch = hr[:1].expand(8, -1, -1, -1)
    lr = degrade_lr(batch, DEGRADATIONS["robust"], _gen(3))
    assert len({lr[i].numpy().tobytes() for i in range(8)}) == 8
    p = sample_params(64, DEGRADATIONS["robust"], _gen(3))
    assert len(p.resize.unique()) == len(DEGRADATIONS["robust"].resize.kinds)
    assert 0 < (p.blur_sigma[:, 0] > 0).float().mean() < 1 and len(p.jpeg.unique()) > 5


def test_paper_model_is_the_shards_lr(hr):
    """The `paper` model is the cascade of facesr.degrade, as one matrix (same lr as the shards within one level)."""
    assert torch.allclose(resample(hr, 24, "paper"), degrade(hr)["lr"], atol=1e-5)
    lr = degrade_lr(hr, DEGRADATIONS["paper"], _gen())
    ref = quantize(degrade(hr)["lr"])
    assert (lr - ref).abs().max() <= 1.01 / 255 and (lr == ref).float().mean() > 0.99


@pytest.mark.parametrize("kind,mode,aa", [
    ("bicubic", "bicubic", False), ("bicubic_aa", "bicubic", True),
    ("bilinear", "bilinear", False), ("bilinear_aa", "bilinear", True),
])
@pytest.mark.parametrize("size", [24, 48, 96])
def test_resampler_matches_torch(hr, kind, mode, aa, size):
    """The generic resampler equals torch's interpolate (align_corners=False, antialias on and off) on real faces."""
    ref = F.interpolate(hr, size=(size, size), mode=mode, align_corners=False, antialias=aa)
    assert torch.allclose(resample(hr, size, kind), ref, atol=2e-6)


@pytest.mark.parametrize("kind,pil", [
    ("lanczos3_aa", Image.Resampling.LANCZOS), ("area", Image.Resampling.BOX), ("bicubic_aa", Image.Resampling.BICUBIC),
])
def test_resampler_matches_pil(hr, kind, pil):
    """The resampler equals PIL's LANCZOS/BOX/BICUBIC up to PIL's 8-bit rounding after each of its two passes."""
    face = hr[0]
    small = Image.fromarray(to_uint8(face).permute(1, 2, 0).numpy()).resize((24, 24), pil)
    ref = torch.from_numpy(np.asarray(small).copy()).permute(2, 0, 1).double()
    m = resize_matrix(kind, 192, 24, torch.device("cpu"), torch.float64)
    x = face.double() * 255
    two_pass = m @ (x @ m.T).clamp(0, 255).round()  # PIL: columns, then an 8-bit image, then rows
    assert (two_pass.clamp(0, 255) - ref).abs().max() <= 0.6
    direct = resample(face[None].double(), 24, kind)[0] * 255
    assert (direct - ref).abs().mean() < 0.35  # one pass in float: differs only where PIL's middle image clipped


def test_decimation_phase(hr):
    """Decimation keeps hr pixel (8i + phase_row, 8j + phase_col) of each sample."""
    phase = torch.tensor([[0, 0], [3, 5], [7, 7], [4, 1]])
    lr = resample(hr, 24, "decimate", phase)
    for i, (py, px) in enumerate(phase.tolist()):
        assert torch.equal(lr[i], hr[i, :, py::8, px::8])


def test_blur_kernels():
    """Kernels sum to one; an anisotropic kernel at 0° spreads along x by σ_x and at 90° along y."""
    k = blur_kernels(torch.tensor([[2.0, 0.5], [2.0, 0.5]]), torch.deg2rad(torch.tensor([0.0, 90.0])), 21)
    assert torch.allclose(k.sum((-2, -1)), torch.ones(2))
    t = torch.arange(-10, 11, dtype=torch.float32)
    var_x, var_y = (k[0].sum(0) * t**2).sum(), (k[0].sum(1) * t**2).sum()
    assert var_x == pytest.approx(4.0, rel=0.02)
    assert var_y == pytest.approx(0.25, rel=0.2)  # sampled on the pixel grid: a little under σ²
    assert torch.allclose(k[1], k[0].T, atol=1e-6)


def test_blur_kernels_hold_no_subnormal_weights():
    """A narrow kernel in a wide window has tails of exp(-87..-104): subnormal floats, which a CPU multiplies ~100x
    slower (one made a batch's blur 10x slower). They are zeros instead, and dropping them changes nothing."""
    sigma = torch.tensor([[0.2, 0.2], [0.3, 3.0], [1.0, 1.0], [3.0, 3.0]])
    k = blur_kernels(sigma, torch.tensor([0.0, 0.7, 0.0, 0.0]), 19)
    assert not ((k > 0) & (k < torch.finfo(torch.float32).tiny)).any()
    r = torch.arange(-9, 10, dtype=torch.float64)
    exact = torch.exp(-0.5 * (r[:, None] ** 2 + r[None] ** 2) / 0.2**2)  # float64: its tails are normal there
    assert torch.allclose(k[0].double(), exact / exact.sum(), atol=2e-7, rtol=0)  # fp32 rounding
    assert torch.allclose(k.sum((-2, -1)), torch.ones(4))


def test_noise_has_the_configured_strength(hr):
    """Gaussian read noise of σ=8 added at lr shows up as a residual of std ≈ 8/255."""
    cfg = RobustDegradation(blur=Blur(p=0.0), resize=Resize(kinds=("area",), weights=(1.0,)),
                            noise=Noise(gaussian_p=1.0, gaussian_sigma=(8.0, 8.0), gray_p=0.0, poisson_p=0.0, hr_p=0.0),
                            jpeg=Jpeg(p=0.0))
    resid = degrade_lr(hr, cfg, _gen()) - quantize(F.avg_pool2d(hr, 8))
    assert resid.std().item() * 255 == pytest.approx(8.0, rel=0.08)


def test_shot_noise_grows_with_brightness(hr):
    """Shot noise of scale 1 has the variance of Poisson(255x)/255: x/255, so brighter pixels are noisier."""
    cfg = RobustDegradation(blur=Blur(p=0.0), resize=Resize(kinds=("area",), weights=(1.0,)),
                            noise=Noise(gaussian_p=0.0, poisson_p=1.0, poisson_scale=(1.0, 1.0), hr_p=0.0),
                            jpeg=Jpeg(p=0.0))
    clean = quantize(F.avg_pool2d(hr, 8))
    resid = degrade_lr(hr, cfg, _gen()) - clean
    mid = (clean > 0.15) & (clean < 0.85)  # away from the clamp at 0 and 1
    assert (resid[mid] ** 2).mean().item() == pytest.approx((clean[mid] / 255).mean().item(), rel=0.15)
    dark, bright = clean < 0.25, (clean > 0.6) & (clean < 0.85)
    assert resid[bright].std() > resid[dark].std()


def test_jpeg_last_and_lossy(hr):
    """JPEG at quality 10 changes a clean area-resized lr, more than quality 95 does."""
    clean = quantize(F.avg_pool2d(hr, 8))

    def err(q: int) -> float:
        cfg = RobustDegradation(blur=Blur(p=0.0), resize=Resize(kinds=("area",), weights=(1.0,)),
                                noise=Noise(gaussian_p=0.0, poisson_p=0.0), jpeg=Jpeg(p=1.0, quality=(q, q)))
        return (degrade_lr(hr, cfg, _gen()) - clean).abs().mean().item()

    assert err(10) > err(95) > 0


@pytest.mark.parametrize("name", list(DEGRADATIONS))
def test_config_round_trips_through_yaml(name):
    """Every named model serialises to plain YAML and back to an equal, valid config."""
    cfg = DEGRADATIONS[name]
    back = RobustDegradation.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    assert back == cfg and back.validate() is back and resolve(name) == cfg


@pytest.mark.parametrize("override,message", [
    ({"resize": {"kinds": ["foo"], "weights": [1]}}, r"^resize\.kinds: unknown kind 'foo' \(known: decimate"),
    ({"blur": {"kinds": ["iso", "box"]}}, r"^blur\.kinds: unknown kind 'box'"),
    ({"resize": {"kinds": ["area", "bicubic"], "weights": [1]}}, r"^resize\.weights: 1 weights for 2 kinds"),
    ({"resize": {"kinds": ["area"], "weights": [-1]}}, r"^resize\.weights: weights must be >= 0"),
    ({"noise": {"gaussian_sigma": [5, 2]}}, r"^noise\.gaussian_sigma: range \[5, 2\] is empty"),
    ({"noise": {"gaussian_sigma": [-1, 2]}}, r"^noise\.gaussian_sigma: range \[-1, 2\] must be >= 0"),
    ({"noise": {"poisson_scale": [-0.5, 1]}}, r"^noise\.poisson_scale: range"),
    ({"blur": {"sigma": [-1, 3]}}, r"^blur\.sigma: range \[-1, 3\] must be > 0"),
    ({"blur": {"sigma": [3, 1]}}, r"^blur\.sigma: range \[3, 1\] is empty"),
    ({"blur": {"kernel_size": 20}}, r"^blur\.kernel_size: must be an odd integer"),
    ({"jpeg": {"quality": [0, 95]}}, r"^jpeg\.quality: range \[0, 95\] outside 1\.\.100"),
    ({"jpeg": {"quality": [40, 101]}}, r"^jpeg\.quality: range \[40, 101\] outside 1\.\.100"),
    ({"jpeg": {"quality": [40.5, 90]}}, r"^jpeg\.quality: expected an integer"),
    ({"jpeg": {"p": 1.5}}, r"^jpeg\.p: probability 1\.5 outside \[0, 1\]"),
    ({"noise": {"hr_p": -0.1}}, r"^noise\.hr_p: probability -0\.1 outside"),
    ({"blur": {"p": "often"}}, r"^blur\.p: expected a number, got 'often'"),
    ({"blur": {"colour": 1}}, r"^blur\.colour: unknown key \(known: p, kinds"),
    ({"sharpen": {}}, r"^sharpen: unknown key \(known: blur, resize, noise, jpeg\)"),
])
def test_bad_config_names_the_key(override, message):
    """Unknown kinds, impossible ranges and probabilities, wrong types: DegradationError naming the dotted key."""
    with pytest.raises(DegradationError, match=message):
        RobustDegradation.from_dict(override)


def test_kinds_without_weights_are_equally_likely():
    """Naming resize kinds without weights gives them equal odds; other fields keep the robust defaults."""
    cfg = RobustDegradation.from_dict({"resize": {"kinds": ["area", "bicubic_aa"]}, "jpeg": {"p": 0}})
    assert cfg.resize.weights == (1.0, 1.0) and cfg.jpeg.p == 0.0 and cfg.blur == DEGRADATIONS["robust"].blur


def test_errors_carry_the_callers_prefix():
    """A config that embeds the model gets its own key in front (data.degradation.noise.gray_p)."""
    with pytest.raises(DegradationError, match=r"^data\.degradation\.noise\.gray_p: probability 2 outside"):
        resolve({"noise": {"gray_p": 2}}, "data.degradation")
    with pytest.raises(DegradationError, match=r"^data\.degradation: unknown degradation 'fancy' \(known: paper, rob"):
        resolve("fancy", "data.degradation")
    with pytest.raises(DegradationError, match=r"^jpeg\.p"):
        RobustDegradation(jpeg=Jpeg(p=2.0)).validate()


def test_bench_reports_both_pipelines():
    """The micro-benchmark times degrade_lr and the per-image PIL loop on one thread and gives their ratio."""
    r = bench_degradation(batch=4, seconds=0.05)
    assert r["torch_us_per_sample"] > 0 and r["pil_us_per_sample"] > 0 and r["threads"] == 1
    assert r["ratio_torch_over_pil"] == pytest.approx(r["torch_us_per_sample"] / r["pil_us_per_sample"])
