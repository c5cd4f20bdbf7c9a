"""Named degradation models hr (192²) -> lr (24²): the paper's fixed one, a randomised ``robust`` one, eval ones.

The paper's cascade (``facesr.degrade``) makes one kind of 24×24 face; a model
trained only on it fails on faces shrunk any other way (issue 12). ``robust``
draws a degradation per sample, in the spirit of BSRGAN / Real-ESRGAN but mild
enough for 24×24 faces. Only ``lr`` is randomised: the x2/x4/hr targets stay
the clean paper cascade.

Per sample, in this order (the order is fixed where physics fixes it):

1. **blur** at hr (optics, defocus, motion): with ``blur.p``, an isotropic or
   anisotropic rotated Gaussian, σ per axis uniform in ``blur.sigma`` hr px.
   Always before the resize: blur happens in the camera, at full resolution.
2. **sensor noise** at hr with ``noise.hr_p`` (a camera image later shrunk: the
   resize then averages most of it away, except under decimation) — otherwise
   step 4. Shot noise (Real-ESRGAN's ``scale·(Poisson(255x)/255 − x)``, drawn as
   its Gaussian approximation ``scale·√(x/255)·z``: same variance, 12× cheaper
   than ``torch.poisson`` on a CPU core, and 255x ≥ 20 photons on most face
   pixels, where the two agree) then read noise (Gaussian, σ in 0-255 units, the
   same in R, G, B with ``noise.gray_p``), each with its own probability.
3. **resize** ×1/8 by one kind: decimation at a random phase 0..7 per axis, the
   paper's cascade, area, bilinear, bicubic (a=−0.75, no antialias: torch's
   ``interpolate``), antialiased bicubic (a=−0.5: PIL, torch ``antialias=True``),
   antialiased Lanczos-3. All but decimation are one generic separable resampler
   (an (out, in) matrix per filter and size, cached per device and dtype, applied
   as two matmuls); samples sharing a kind are resized together.
4. **sensor noise** at lr, for samples whose noise was not drawn at hr.
5. **8-bit quantisation**, then **JPEG** with ``jpeg.p`` at a quality uniform in
   ``jpeg.quality`` (``facesr.jpeg``: libjpeg-turbo's arithmetic bit for bit, as
   torch ops on the device). Always last: compression is what happens to a stored image.

Randomness is keyed by the caller's ``torch.Generator``: the per-sample parameters
are drawn on the host (numpy, from the generator's seed) and the noise on the
generator's device, so a seeded generator gives identical output on every call and
the step never waits for the device to learn which samples get what (issue 24).

``EVAL_DEGRADATIONS`` are fixed, deterministic degradations for the robustness
table of ``facesr eval quality --degradations``; several use PIL, a tool other
than ours, and ``heldout`` uses kinds training never sees.
"""

from __future__ import annotations

import io
import math
import zlib
from dataclasses import dataclass, field, fields
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .cache import tensor_cache
from .degrade import blur as gaussian_blur
from .degrade import degrade, quantize, to_uint8
from .jpeg import jpeg_round_trip
from .structured import FieldError, build
from .vocab import SIZES

FACTOR = SIZES["hr"] // SIZES["lr"]  # 8: hr side over lr side


class DegradationError(ValueError):
    """A degradation config that cannot work; the message starts with the dotted field name."""


# ---------------------------------------------------------------- the generic separable resampler


def _box(x: torch.Tensor) -> torch.Tensor:
    return ((x > -0.5) & (x <= 0.5)).to(x.dtype)  # PIL's half-open box


def _triangle(x: torch.Tensor) -> torch.Tensor:
    return (1 - x.abs()).clamp(min=0)


def _cubic(a: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def cubic(x: torch.Tensor) -> torch.Tensor:  # Keys (1981)
        x = x.abs()
        near = ((a + 2) * x - (a + 3)) * x * x + 1
        far = (((x - 5) * x + 8) * x - 4) * a
        return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))

    return cubic


def _lanczos3(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x.abs() < 3, torch.sinc(x) * torch.sinc(x / 3), torch.zeros_like(x))


# filter name -> (function of the distance in input pixels, support radius)
FILTERS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], float]] = {
    "box": (_box, 0.5),
    "triangle": (_triangle, 1.0),
    "cubic": (_cubic(-0.5), 2.0),  # PIL and torch antialias=True
    "cubic75": (_cubic(-0.75), 2.0),  # torch / OpenCV without antialias
    "lanczos3": (_lanczos3, 3.0),
}

# resize kind -> (filter, antialias); None: not a filter (strided decimation, the paper's cascade)
RESIZE_KINDS: dict[str, tuple[str, bool] | None] = {
    "decimate": None,  # keep one pixel in 8 at a random phase 0..7 per axis (no low-pass: aliasing)
    "paper": None,  # the paper's cascade, 3 × (Gaussian σ=1 + 2× decimation centred at 2i+0.5), as one matrix
    "area": ("box", True),  # mean of each 8×8 block (PIL BOX, cv2 INTER_AREA)
    "bilinear": ("triangle", False),  # torch interpolate bilinear: 2 taps, aliases at 8×
    "bilinear_aa": ("triangle", True),  # PIL BILINEAR, torch antialias=True
    "bicubic": ("cubic75", False),  # torch interpolate bicubic: 4 taps, aliases at 8×
    "bicubic_aa": ("cubic", True),  # PIL BICUBIC (Image.resize's default), torch antialias=True
    "lanczos3": ("lanczos3", False),  # 6 taps, aliases at 8×
    "lanczos3_aa": ("lanczos3", True),  # PIL LANCZOS
}


@tensor_cache(maxsize=64)
def _matrix64(filt: str, antialias: bool, n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) float64 resampling weights; pixel centres at i+0.5 (align_corners=False).

    Antialiased: the filter is stretched by the scale factor when shrinking and taps outside the image are
    dropped and the rest renormalised (PIL, torch antialias=True). Not antialiased: the filter keeps its size
    and taps outside the image reuse the edge pixel (torch's index clamping).
    """
    fn, support = FILTERS[filt]
    scale = n_in / n_out
    stretch = max(scale, 1.0) if antialias else 1.0
    centre = (torch.arange(n_out, dtype=torch.float64) + 0.5) * scale - 0.5  # in input pixel coordinates
    reach = math.ceil(support * stretch) + 1
    j = centre.floor().long()[:, None] + torch.arange(-reach, reach + 1)[None]  # (n_out, taps)
    w = fn((j - centre[:, None]) / stretch)
    inside = (j >= 0) & (j < n_in)
    if antialias:
        w = w * inside
    m = torch.zeros(n_out, n_in, dtype=torch.float64).scatter_add_(1, j.clamp(0, n_in - 1), w)
    return m / m.sum(1, keepdim=True)


@tensor_cache(maxsize=8)
def _paper64(n_in: int) -> torch.Tensor:
    """(n_in/8, n_in) float64 matrix of the paper's cascade, measured through ``facesr.degrade`` itself.

    Image j holds ones on row j only; the cascade is separable and each row of it sums to one, so its lr
    is A[:, j] on every column.
    """
    rows = torch.zeros(n_in, 1, n_in, 64, dtype=torch.float64)
    rows[torch.arange(n_in), 0, torch.arange(n_in)] = 1
    return degrade(rows)["lr"][:, 0, :, 0].T.contiguous()  # (n_in/8, n_in)


@tensor_cache(maxsize=256)
def resize_matrix(kind: str, n_in: int, n_out: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(n_out, n_in) weights of a filter resize kind (or ``paper``), built once per device and dtype."""
    if kind == "paper":
        if n_in != FACTOR * n_out:
            raise ValueError(f"paper: the cascade shrinks by {FACTOR}, not {n_in} -> {n_out}")
        m = _paper64(n_in)
    else:
        m = _matrix64(*RESIZE_KINDS[kind], n_in, n_out)
    return m.to(device=device, dtype=dtype, non_blocking=True)  # once per key; the host copy stays cached


def resample(
    x: torch.Tensor, size: int | tuple[int, int], kind: str, phase: torch.Tensor | None = None
) -> torch.Tensor:
    """Resize (B, C, H, W) float -> (B, C, h, w) with a kind of ``RESIZE_KINDS`` (no clamping, no rounding).

    ``decimate`` needs integer factors and takes ``phase`` (B, 2) of (row, column) offsets (default 0).
    """
    if kind not in RESIZE_KINDS:
        raise ValueError(f"unknown resize kind {kind!r} (known: {', '.join(RESIZE_KINDS)})")
    h, w = (size, size) if isinstance(size, int) else size
    big_h, big_w = x.shape[-2:]
    if kind == "decimate":
        fh, fw = big_h // h, big_w // w
        if fh * h != big_h or fw * w != big_w:
            raise ValueError(f"decimate: {big_h}x{big_w} -> {h}x{w} is not an integer factor")
        b, c = x.shape[:2]
        cells = x.reshape(b, c, h, fh, w, fw).permute(0, 3, 5, 1, 2, 4)  # (B, fh, fw, C, h, w)
        if phase is None:
            return cells[:, 0, 0]
        phase = phase.to(x.device, non_blocking=True)
        return cells[torch.arange(b, device=x.device), phase[:, 0], phase[:, 1]]  # (B, C, h, w)
    mh = resize_matrix(kind, big_h, h, x.device, x.dtype)
    mw = mh if (big_w, w) == (big_h, h) else resize_matrix(kind, big_w, w, x.device, x.dtype)
    return mh @ x @ mw.T  # (h, H) @ (B, C, H, W) @ (W, w) -> (B, C, h, w)


# ---------------------------------------------------------------- configuration

BLUR_KINDS = ("iso", "aniso")


@dataclass(frozen=True)
class Blur:
    p: float = 0.7  # chance a sample is blurred at hr; the rest keep only the resizer's own low-pass (sharp sources)
    kinds: tuple[str, ...] = ("iso", "aniso")  # round (defocus) or elongated, rotated Gaussians (shake, astigmatism)
    weights: tuple[float, ...] = (0.6, 0.4)  # relative odds of each kind; round blur is the common case
    sigma: tuple[float, float] = (0.2, 3.0)  # σ range per axis in hr px: 0.2 is none, 3 is ~0.4 lr px (mild at 24²)
    rotation: tuple[float, float] = (0.0, 180.0)  # degrees, anisotropic kernels only; 0-180 covers every orientation
    kernel_size: int = 21  # largest kernel side (odd); 2·ceil(3σ)+1 = 19 at σ = 3 fits, larger σ is truncated


@dataclass(frozen=True)
class Resize:
    kinds: tuple[str, ...] = (  # every common way to shrink, and the paper's (keeps its row in training)
        "decimate", "paper", "area", "bilinear", "bicubic", "bicubic_aa", "lanczos3_aa"
    )
    weights: tuple[float, ...] = (0.1, 0.1, 0.15, 0.1, 0.1, 0.3, 0.15)  # bicubic_aa most: PIL's default


@dataclass(frozen=True)
class Noise:
    gaussian_p: float = 0.4  # chance of read noise (Real-ESRGAN: 0.5; milder: a 24² face has little to lose)
    gaussian_sigma: tuple[float, float] = (1.0, 10.0)  # σ range in 0-255 units; 10 is a dim phone photo
    gray_p: float = 0.4  # share of read noise that is the same in R, G, B (luminance noise), Real-ESRGAN's value
    poisson_p: float = 0.2  # chance of shot noise, independent of read noise
    poisson_scale: tuple[float, float] = (0.05, 1.0)  # scale·(Poisson(255x)/255 − x); 1 ≈ σ 11/255 at mid grey
    hr_p: float = 0.25  # chance the noise enters at hr, before the resize (a camera image then shrunk), else at lr


@dataclass(frozen=True)
class Jpeg:
    p: float = 0.5  # chance the lr is stored as JPEG (web thumbnails, video frames)
    quality: tuple[int, int] = (40, 95)  # libjpeg quality range; under 40 a 24² face is mostly 8×8 blocks


@dataclass(frozen=True)
class RobustDegradation:
    """One degradation model: every range of the randomised hr -> lr pipeline (defaults: ``robust``)."""

    blur: Blur = field(default_factory=Blur)  # Gaussian blur at hr
    resize: Resize = field(default_factory=Resize)  # the 8× shrink
    noise: Noise = field(default_factory=Noise)  # sensor noise, at hr or lr
    jpeg: Jpeg = field(default_factory=Jpeg)  # compression, last

    def validate(self, prefix: str = "") -> RobustDegradation:
        """Raise DegradationError naming the first impossible field (prefixed by ``prefix.``); returns self."""
        def key(section: str, name: str) -> str:
            return f"{prefix}.{section}.{name}" if prefix else f"{section}.{name}"

        b, r, n, j = self.blur, self.resize, self.noise, self.jpeg
        for section, name in (("blur", "p"), ("noise", "gaussian_p"), ("noise", "gray_p"), ("noise", "poisson_p"),
                              ("noise", "hr_p"), ("jpeg", "p")):
            v = getattr(getattr(self, section), name)
            if not 0 <= v <= 1:
                raise DegradationError(f"{key(section, name)}: probability {v:g} outside [0, 1]")
        _check_kinds(key("blur", "kinds"), key("blur", "weights"), b.kinds, b.weights, BLUR_KINDS)
        _check_kinds(key("resize", "kinds"), key("resize", "weights"), r.kinds, r.weights, tuple(RESIZE_KINDS))
        _check_range(key("blur", "sigma"), b.sigma, low=0.0, strict=True)
        _check_range(key("blur", "rotation"), b.rotation)
        if b.kernel_size < 3 or b.kernel_size % 2 == 0:
            raise DegradationError(f"{key('blur', 'kernel_size')}: must be an odd integer >= 3, got {b.kernel_size}")
        _check_range(key("noise", "gaussian_sigma"), n.gaussian_sigma, low=0.0)
        _check_range(key("noise", "poisson_scale"), n.poisson_scale, low=0.0)
        _check_range(key("jpeg", "quality"), j.quality, low=1, high=100)
        return self

    def to_dict(self) -> dict:
        """Plain nested dict (lists, numbers, strings) that YAML and JSON carry."""
        return {s.name: {f.name: _plain(getattr(getattr(self, s.name), f.name)) for f in fields(getattr(self, s.name))}
                for s in fields(self)}

    @classmethod
    def from_dict(cls, d: dict, prefix: str = "") -> RobustDegradation:
        """Build and validate from ``to_dict``'s shape; absent fields keep ``robust``'s (kinds alone: equal weights).

        The dataclasses above are the schema (facesr.structured: OmegaConf's structured configs)."""
        if not isinstance(d, dict):
            raise DegradationError(f"{prefix or 'degradation'}: expected a mapping, got {d!r}")
        d = {name: {**section, "weights": [1.0] * len(section["kinds"])}  # kinds named without odds: equally likely
             if isinstance(section, dict) and isinstance(section.get("kinds"), list) and "weights" not in section
             else section for name, section in d.items()}
        try:
            return build(cls, d, prefix=f"{prefix}." if prefix else "").validate(prefix)
        except FieldError as e:
            raise DegradationError(str(e)) from None


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


def _check_kinds(kinds_key: str, weights_key: str, kinds, weights, known: tuple[str, ...]) -> None:
    if not kinds:
        raise DegradationError(f"{kinds_key}: no kinds given (known: {', '.join(known)})")
    for k in kinds:
        if k not in known:
            raise DegradationError(f"{kinds_key}: unknown kind {k!r} (known: {', '.join(known)})")
    if len(set(kinds)) != len(kinds):
        raise DegradationError(f"{kinds_key}: a kind is listed twice in {list(kinds)}")
    if len(weights) != len(kinds):
        raise DegradationError(f"{weights_key}: {len(weights)} weights for {len(kinds)} kinds")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise DegradationError(f"{weights_key}: weights must be >= 0 with a positive sum, got {list(weights)}")


def _check_range(where: str, r, low=None, high=None, strict: bool = False) -> None:
    if len(r) != 2:
        raise DegradationError(f"{where}: expected a range [min, max], got {list(r)}")
    lo, hi = r
    if lo > hi:
        raise DegradationError(f"{where}: range [{lo:g}, {hi:g}] is empty")
    if high is not None and (lo < low or hi > high):
        raise DegradationError(f"{where}: range [{lo:g}, {hi:g}] outside {low:g}..{high:g}")
    if low is not None and (lo <= low if strict else lo < low):
        raise DegradationError(f"{where}: range [{lo:g}, {hi:g}] must be {'>' if strict else '>='} {low:g}")


PAPER = RobustDegradation(
    blur=Blur(p=0.0), resize=Resize(kinds=("paper",), weights=(1.0,)),
    noise=Noise(gaussian_p=0.0, poisson_p=0.0), jpeg=Jpeg(p=0.0),
)
DEGRADATIONS: dict[str, RobustDegradation] = {
    "paper": PAPER,  # the paper's fixed cascade (what the shards store as lr): the paper preset's default
    "robust": RobustDegradation(),  # randomised per sample, every range above
    # robust without its JPEG step: the demo's and deploy model's mix. Trained on 24² faces a third of which were
    # JPEG-compressed, the cascade learns to smooth 8×8 blocks away and with them what tells people apart; without
    # the JPEG step it drifts less than bicubic on the paper and antialiased-bicubic rows (README: identity, issue 25)
    "robust_nojpeg": RobustDegradation(jpeg=Jpeg(p=0.0)),
}


def resolve(spec: str | dict, prefix: str = "degradation") -> RobustDegradation:
    """A ``DEGRADATIONS`` name or a ``to_dict``-shaped mapping (missing fields: ``robust``'s) -> validated config."""
    if isinstance(spec, str):
        if spec not in DEGRADATIONS:
            raise DegradationError(f"{prefix}: unknown degradation {spec!r} (known: {', '.join(DEGRADATIONS)})")
        return DEGRADATIONS[spec]
    return RobustDegradation.from_dict(spec, prefix)


# ---------------------------------------------------------------- the randomised pipeline


@dataclass(frozen=True)
class Params:
    """Per-sample draws of one batch, every tensor (B,) or (B, 2) on the CPU; 0 where a step is off."""

    blur_sigma: torch.Tensor  # (B, 2) σ along the kernel's own axes in hr px; 0 = not blurred
    blur_theta: torch.Tensor  # (B,) kernel rotation, radians
    resize: torch.Tensor  # (B,) index into cfg.resize.kinds
    phase: torch.Tensor  # (B, 2) decimation offsets (row, column) in 0..7
    gaussian: torch.Tensor  # (B,) read-noise σ in 0-255 units; 0 = none
    gray: torch.Tensor  # (B,) bool: read noise equal in R, G, B
    poisson: torch.Tensor  # (B,) shot-noise scale; 0 = none
    noise_at_hr: torch.Tensor  # (B,) bool: noise before the resize
    jpeg: torch.Tensor  # (B,) JPEG quality; 0 = not compressed


def _streams(generator: torch.Generator) -> tuple[np.random.Generator, int, int]:
    """From the generator's seed: the host stream of the per-sample parameters, the seed of the device noise,
    and the seed the generator is left at. Read on the host: a CUDA generator keeps its seed there."""
    params, noise, after = np.random.SeedSequence(generator.initial_seed()).generate_state(3, np.uint64)
    return np.random.default_rng(int(params)), int(noise) >> 1, int(after) >> 1


def _draw(n: int, cfg: RobustDegradation, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``n`` samples' parameters (``Params``' fields as numpy), always the same draws in the same order."""
    b, nz = cfg.blur, cfg.noise

    def uniform(r) -> np.ndarray:
        return r[0] + (r[1] - r[0]) * rng.random(n)

    def pick(weights) -> np.ndarray:
        w = np.asarray(weights, dtype=np.float64)
        return rng.choice(len(w), size=n, p=w / w.sum())

    blurred = rng.random(n) < b.p
    aniso = np.asarray([k == "aniso" for k in b.kinds])[pick(b.weights)]
    s1, s2 = uniform(b.sigma), uniform(b.sigma)
    theta = np.deg2rad(uniform(b.rotation))
    sigma = np.stack([s1, np.where(aniso, s2, s1)], 1) * blurred[:, None]
    resize = pick(cfg.resize.weights)
    phase = rng.integers(0, FACTOR, (n, 2))
    gaussian = uniform(nz.gaussian_sigma) * (rng.random(n) < nz.gaussian_p)
    gray = rng.random(n) < nz.gray_p
    poisson = uniform(nz.poisson_scale) * (rng.random(n) < nz.poisson_p)
    at_hr = rng.random(n) < nz.hr_p
    quality = rng.integers(cfg.jpeg.quality[0], cfg.jpeg.quality[1] + 1, n)
    jpeg = quality * (rng.random(n) < cfg.jpeg.p)
    f32 = np.float32
    return {"blur_sigma": sigma.astype(f32), "blur_theta": theta.astype(f32), "resize": resize, "phase": phase,
            "gaussian": gaussian.astype(f32), "gray": gray, "poisson": poisson.astype(f32), "noise_at_hr": at_hr,
            "jpeg": jpeg}


def sample_params(n: int, cfg: RobustDegradation, generator: torch.Generator) -> Params:
    """The parameters ``degrade_lr`` draws for ``n`` samples with ``generator`` (which this leaves as it is)."""
    return Params(**{k: torch.from_numpy(v) for k, v in _draw(n, cfg, _streams(generator)[0]).items()})


def blur_kernels(sigma: torch.Tensor, theta: torch.Tensor, size: int) -> torch.Tensor:
    """Normalised Gaussian kernels (B, size, size) from σ (B, 2) along axes rotated by θ (B,) radians."""
    r = size // 2
    t = torch.arange(-r, r + 1, dtype=torch.float32, device=sigma.device)
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    c, s = theta.cos()[:, None, None], theta.sin()[:, None, None]
    u, v = c * xx + s * yy, -s * xx + c * yy  # coordinates along the kernel's own axes
    k = torch.exp(-0.5 * ((u / sigma[:, 0, None, None]) ** 2 + (v / sigma[:, 1, None, None]) ** 2))
    # Weights under 1e-12 change no 8-bit pixel, but a narrow kernel's tail holds subnormal floats (exp of
    # -87..-104), which a CPU multiplies ~100x slower: one such kernel made the whole batch's blur 10x slower.
    k = k.masked_fill(k < 1e-12, 0.0)
    return k / k.sum((-2, -1), keepdim=True)


def _blur(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Each sample of (m, C, H, W) with its own kernel (m, k, k): one grouped conv, reflect padding."""
    m, c, h, w = x.shape
    r = kernels.shape[-1] // 2
    weight = kernels.to(x.dtype).repeat_interleave(c, 0)[:, None]  # (m·C, 1, k, k)
    y = F.conv2d(F.pad(x.reshape(1, m * c, h, w), (r, r, r, r), mode="reflect"), weight, groups=m * c)
    return y.view(m, c, h, w)


def _upload(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on ``device``, copied without waiting for the device's queue (and without reading it back)."""
    return torch.from_numpy(np.ascontiguousarray(a)).to(device, non_blocking=True)


def _noise(x: torch.Tensor, p: dict, idx: np.ndarray, g: torch.Generator) -> torch.Tensor:
    """Shot then read noise on batch samples ``idx`` (host indices), whose pixels are ``x`` (m, 3, H, W); clamped."""
    dev = x.device
    shot = p["poisson"][idx]
    on = np.flatnonzero(shot > 0)  # rows of x, known on the host
    if on.size:
        rows = _upload(on, dev)
        clean = x[rows].clamp(0, 1)
        z = torch.randn(clean.shape, generator=g, device=g.device).to(dev, non_blocking=True)
        scale = _upload(shot[on], dev).view(-1, 1, 1, 1)
        x = x.index_put((rows,), clean + (clean / 255).sqrt() * z * scale)  # Poisson(255x)/255 − x ≈ √(x/255)·z
    read = p["gaussian"][idx]
    on = np.flatnonzero(read > 0)
    if on.size:
        rows = _upload(on, dev)
        z = torch.randn((on.size, *x.shape[1:]), generator=g, device=g.device).to(dev, non_blocking=True)
        z = torch.where(_upload(p["gray"][idx][on], dev).view(-1, 1, 1, 1), z[:, :1].expand_as(z), z)
        x = x.index_put((rows,), x[rows] + z * _upload(read[on] / 255, dev).view(-1, 1, 1, 1))
    return x.clamp(0, 1)


def jpeg(u8: torch.Tensor, quality) -> torch.Tensor:
    """JPEG round trip of (m, 3, h, w) uint8 at a quality per image (host ints): libjpeg-turbo's, on u8's device."""
    return jpeg_round_trip(u8, quality)


def degrade_lr(hr: torch.Tensor, cfg: RobustDegradation, generator: torch.Generator) -> torch.Tensor:
    """hr (B, 3, H, W) uint8 or float in [0, 1] -> lr float (B, 3, H/8, W/8) on the 8-bit grid, per-sample random.

    Pure and batch-first; runs on hr's device and never reads from it: the parameters are drawn on the host
    (numpy, seeded from ``generator``'s seed), so every subset and kernel size is known without asking the
    device, and the noise is drawn on the generator's device. The generator is then re-seeded from the same
    stream, so the same seed gives the same lr, and consecutive calls with one generator draw anew.
    """
    x = hr.float() / 255 if hr.dtype == torch.uint8 else hr.float()
    n, _, h, w = x.shape
    dev = x.device
    rng, noise_seed, after = _streams(generator)
    p = _draw(n, cfg, rng)
    generator.manual_seed(noise_seed)

    blurred = np.flatnonzero(p["blur_sigma"][:, 0] > 0)
    if blurred.size:
        reach = math.ceil(3 * float(p["blur_sigma"][blurred].max()))
        size = min(cfg.blur.kernel_size, 2 * max(reach, 1) + 1)  # as small as the batch's widest kernel allows
        kernels = blur_kernels(_upload(p["blur_sigma"][blurred], dev), _upload(p["blur_theta"][blurred], dev), size)
        rows = _upload(blurred, dev)
        x = x.index_put((rows,), _blur(x[rows], kernels))

    noisy = (p["gaussian"] > 0) | (p["poisson"] > 0)
    at_hr = np.flatnonzero(noisy & p["noise_at_hr"])
    if at_hr.size:
        rows = _upload(at_hr, dev)
        x = x.index_put((rows,), _noise(x[rows], p, at_hr, generator))

    lr = torch.empty(n, 3, h // FACTOR, w // FACTOR, device=dev)
    for i, kind in enumerate(cfg.resize.kinds):  # samples sharing a kind are resized together
        idx = np.flatnonzero(p["resize"] == i)
        if idx.size:
            rows = _upload(idx, dev)
            phase = _upload(p["phase"][idx], dev) if kind == "decimate" else None
            lr[rows] = resample(x[rows], (h // FACTOR, w // FACTOR), kind, phase)

    at_lr = np.flatnonzero(noisy & ~p["noise_at_hr"])
    if at_lr.size:
        rows = _upload(at_lr, dev)
        lr = lr.index_put((rows,), _noise(lr[rows], p, at_lr, generator))

    u8 = to_uint8(lr)
    compressed = np.flatnonzero(p["jpeg"] > 0)
    if compressed.size:
        rows = _upload(compressed, dev)
        u8[rows] = jpeg_round_trip(u8[rows], p["jpeg"][compressed])
    generator.manual_seed(after)
    return u8.float() / 255  # (B, 3, H/8, W/8)


# ---------------------------------------------------------------- fixed degradations for evaluation


def _seeds(hr: torch.Tensor) -> list[int]:
    """A seed per image from its own 8-bit pixels: a face gets the same lr whatever the batching or data source."""
    return [zlib.crc32(img.numpy().tobytes()) for img in to_uint8(hr.detach().cpu())]


def _pil_each(hr: torch.Tensor, fn: Callable[[Image.Image], Image.Image]) -> torch.Tensor:
    """Apply ``fn`` to every image of hr (B, 3, H, W) with PIL -> (B, 3, h, w) float on hr's device."""
    outs = []
    for img in to_uint8(hr.detach().cpu()):
        out = fn(Image.fromarray(img.permute(1, 2, 0).numpy()))
        outs.append(torch.from_numpy(np.asarray(out.convert("RGB")).copy()).permute(2, 0, 1))
    return (torch.stack(outs).float() / 255).to(hr.device)


def _lr_size(im: Image.Image) -> tuple[int, int]:
    return im.width // FACTOR, im.height // FACTOR


def _encode(im: Image.Image, fmt: str, quality: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, format=fmt, quality=quality)
    buf.seek(0)
    with Image.open(buf) as back:
        return back.convert("RGB")


def _pil_bicubic(im: Image.Image) -> Image.Image:
    return im.resize(_lr_size(im), Image.Resampling.BICUBIC)


def _pil_bicubic_jpeg50(im: Image.Image) -> Image.Image:
    return _encode(_pil_bicubic(im), "JPEG", 50)


def _pil_hamming_webp60(im: Image.Image) -> Image.Image:
    return _encode(im.resize(_lr_size(im), Image.Resampling.HAMMING), "WEBP", 60)


def eval_paper(hr: torch.Tensor) -> torch.Tensor:
    """The paper's cascade (training's lr): 3 × (Gaussian σ=1 + 2× decimation centred at 2i+0.5)."""
    return quantize(degrade(hr.float())["lr"])


def eval_decimate0(hr: torch.Tensor) -> torch.Tensor:
    """The literal "blur + decimation": 3 × (Gaussian σ=1, odd kernel + keeping the even pixels, phase 0)."""
    x = hr.float()
    for _ in range(3):
        x = gaussian_blur(x, 1.0)[..., ::2, ::2]
    return quantize(x)


def eval_bicubic_aa(hr: torch.Tensor) -> torch.Tensor:
    """PIL Image.resize(BICUBIC) 8× down: antialiased bicubic, what most people do."""
    return _pil_each(hr, _pil_bicubic)


def eval_area(hr: torch.Tensor) -> torch.Tensor:
    """Mean of each 8×8 block (area / box; cv2 INTER_AREA)."""
    return quantize(F.avg_pool2d(hr.float(), FACTOR))


def eval_bilinear_noise(hr: torch.Tensor) -> torch.Tensor:
    """torch bilinear 8× down without antialias + Gaussian noise σ=5/255 (seeded per image)."""
    lr = F.interpolate(hr.float(), scale_factor=1 / FACTOR, mode="bilinear", align_corners=False, antialias=False)
    noise = torch.stack([torch.randn(lr.shape[1:], generator=torch.Generator().manual_seed(s)) for s in _seeds(hr)])
    return quantize(lr + noise.to(lr.device) * (5 / 255))


def eval_jpeg50(hr: torch.Tensor) -> torch.Tensor:
    """PIL antialiased bicubic 8× down, then JPEG quality 50 with PIL (4:2:0)."""
    return _pil_each(hr, _pil_bicubic_jpeg50)


def motion_kernel(length: float, angle: float, size: int) -> torch.Tensor:
    """A straight motion-blur line of ``length`` px at ``angle`` degrees, splatted bilinearly into (size, size)."""
    t = torch.linspace(-length / 2, length / 2, 8 * size, dtype=torch.float64)
    a = math.radians(angle)
    xs, ys = t * math.cos(a) + size // 2, -t * math.sin(a) + size // 2
    k = torch.zeros(size, size, dtype=torch.float64)
    x0, y0 = xs.floor().long(), ys.floor().long()
    for dx in (0, 1):
        for dy in (0, 1):
            wgt = (1 - (xs - x0 - dx).abs()) * (1 - (ys - y0 - dy).abs())
            k.index_put_(((y0 + dy).clamp(0, size - 1), (x0 + dx).clamp(0, size - 1)), wgt, accumulate=True)
    return (k / k.sum()).float()


def eval_heldout(hr: torch.Tensor) -> torch.Tensor:
    """Never in training: motion blur (5-13 hr px, any angle) + PIL HAMMING 8× down + WebP q60, seeded per image."""
    draws = [np.random.default_rng(s).uniform((5, 0), (13, 180)) for s in _seeds(hr)]  # (length, angle) per image
    kernels = torch.stack([motion_kernel(length, angle, 15) for length, angle in draws]).to(hr.device)
    return _pil_each(quantize(_blur(hr.float(), kernels)), _pil_hamming_webp60)


# name -> hr (B, 3, 192, 192) float in [0, 1] -> lr (B, 3, 24, 24) on the 8-bit grid; each deterministic
EVAL_DEGRADATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "paper": eval_paper,
    "decimate0": eval_decimate0,
    "bicubic_aa": eval_bicubic_aa,
    "area": eval_area,
    "bilinear_noise": eval_bilinear_noise,
    "jpeg50": eval_jpeg50,
    "heldout": eval_heldout,
}


def describe(name: str) -> str:
    """One line saying how an ``EVAL_DEGRADATIONS`` entry makes lr (its docstring)."""
    return EVAL_DEGRADATIONS[name].__doc__.strip().splitlines()[0]


def lr_under(name: str, batch: dict) -> torch.Tensor:
    """A quadruplet batch's lr under eval degradation ``name``, made from its hr (B, 3, 192, 192) -> (B, 3, 24, 24).

    ``paper`` keeps the batch's own lr: the same cascade, made from the unquantised source as the shards store it.
    """
    if name not in EVAL_DEGRADATIONS:
        raise ValueError(f"unknown eval degradation {name!r} (known: {', '.join(EVAL_DEGRADATIONS)})")
    return batch["lr"].float() if name == "paper" else EVAL_DEGRADATIONS[name](batch["hr"].float())
