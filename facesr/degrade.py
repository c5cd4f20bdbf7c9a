"""Degradation model: source face -> quadruplet (lr 24², x2 48², x4 96², hr 192²).

The paper (Sec. 2.3) produces the quadruplet by "Gaussian blurring followed by
decimation". Choices made here, and why:

* **Source -> hr (crop, no resampling).** CASIA-WebFace and LFW faces are
  250×250 with the face in the central ~120 px. ``hr`` is the central 192×192
  crop, taken without any resize: every ``hr`` pixel is a real camera pixel,
  so the 8× target holds genuine high frequencies rather than interpolation
  blur, and the face (~120 px) sits inside the frame with hair and chin
  context. A source of another size is first rescaled (antialiased) so its
  shorter side is 250 (same framing assumed), then cropped; a source whose
  shorter side is under 192 px is refused as too small (upscaling it would
  fake detail).
* **Each 2× step is blur + decimate with σ = 1.0 (in pixels of the finer
  image).** The Gaussian's response at the coarser image's Nyquist frequency
  (0.25 cycles/px) is exp(-2π²σ²f²) ≈ 0.29, which suppresses most aliasing,
  while the passband at half that frequency keeps 0.73 of its amplitude. The
  steps are cascaded (hr -> x4 -> x2 -> lr), so every SR module faces the same
  2× inverse problem, which is what the cascade's design assumes; the
  equivalent single blur from hr is σ ≈ 1.0, 2.2, 4.6 hr-pixels for x4, x2, lr.
* **Sampling phase.** Coarse pixel i covers fine pixels 2i and 2i+1, so the
  kernel is even-length and centred at 2i+0.5. This matches the pixel-centre
  convention of ``F.interpolate(..., align_corners=False)``, so the bicubic
  baseline is not penalised by a half-pixel shift.
* **Residual images** Δx = x − g_σ∗x use σ = 1/3, 1, 7/3 at 48², 96², 192²
  exactly as the paper says; they feed the identity priors.

All functions are batch-first (B, 3, H, W), float in [0, 1], deterministic,
and work on any device/dtype.

Every filter is separable and applied as two matrix products, ``A_h @ x @ A_wᵀ``, each ``A`` an (out, in)
banded matrix holding the 1-D kernel with the reflect padding and the decimation folded in (built once per
σ, size, device and dtype). Depthwise ``conv2d`` computes the same sums in a tenth of the arithmetic, but
oneDNN runs it 4-7x slower on the CPU: the paper residual on 32 faces at 192², 2 cores (Intel Xeon, AMX),
10.6 ms as matmuls against 45 ms as convolutions, 25 / 104 ms with its backward; at 96² 1.4 / 5.3 ms
(`facesr bench degrade`, which runs both). The results agree to float rounding (3e-7).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .cache import tensor_cache
from .vocab import LEVELS, SIZES


@dataclass(frozen=True)
class DegradeConfig:
    source_size: int = 250  # shorter side the source framing is normalised to (CASIA/LFW are 250×250)
    crop: int = 192  # hr side: central crop of the normalised source, no resize
    blur_sigma: float = 1.0  # Gaussian σ per 2× step, in pixels of the finer image (anti-aliasing)
    residual_sigma: dict = field(  # σ of the high-pass residual per level (paper Sec. 2.3)
        default_factory=lambda: {"x2": 1 / 3, "x4": 1.0, "hr": 7 / 3}
    )

    def to_dict(self) -> dict:
        return {
            "source_size": self.source_size,
            "crop": self.crop,
            "blur_sigma": self.blur_sigma,
            "residual_sigma": dict(self.residual_sigma),
            "phase": "even kernel centred at 2i+0.5 (align_corners=False)",
            "cascade": "hr->x4->x2->lr",
        }


DEFAULT = DegradeConfig()


class TooSmallError(ValueError):
    """The source image cannot give a 192×192 crop without upscaling."""


def kernel_radius(sigma: float) -> int:
    """Taps on each side of the Gaussian's centre: the odd kernel has 2r+1, the even one 2r."""
    return max(1, math.ceil(3.0 * sigma))


def gaussian_kernel1d(sigma: float, even: bool = False, dtype=torch.float32) -> torch.Tensor:
    """Normalised 1-D Gaussian; odd length centred on a tap, or even length centred between taps."""
    radius = kernel_radius(sigma)
    if even:
        t = torch.arange(-radius, radius, dtype=torch.float64) + 0.5  # 2·radius taps
    else:
        t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).to(dtype)


@tensor_cache(maxsize=256)
def _band(sigma: float, even: bool, n: int, stride: int, pad: tuple[int, int], device: torch.device,
          dtype: torch.dtype) -> torch.Tensor:
    """(out, n) matrix of the 1-D Gaussian on a side of ``n`` pixels: reflect-padded by ``pad``, every
    ``stride``-th output kept (what ``F.pad(mode="reflect")`` then a strided 1-D convolution compute)."""
    if max(pad) >= n:
        raise ValueError(f"reflect padding of {max(pad)} needs a side over {max(pad)} px, got {n}")
    k = gaussian_kernel1d(sigma, even, torch.float64)
    n_out = (n + pad[0] + pad[1] - k.numel()) // stride + 1
    j = torch.arange(n_out)[:, None] * stride + torch.arange(k.numel())[None] - pad[0]  # (out, taps) padded index
    j = torch.where(j < 0, -j, torch.where(j >= n, 2 * (n - 1) - j, j))  # reflect: the edge pixel not repeated
    m = torch.zeros(n_out, n, dtype=torch.float64).scatter_add_(1, j, k.expand(n_out, -1).contiguous())
    return m.to(device=device, dtype=dtype)


def _separable(x: torch.Tensor, sigma: float, even: bool, stride: int, pad: tuple[int, int]) -> torch.Tensor:
    """The Gaussian of ``sigma`` along both image axes (module docstring: two matmuls)."""
    rows = _band(float(sigma), even, x.shape[-2], stride, pad, x.device, x.dtype)
    cols = rows if x.shape[-1] == x.shape[-2] else _band(float(sigma), even, x.shape[-1], stride, pad, x.device,
                                                          x.dtype)
    return rows @ x @ cols.T


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur with reflect padding; same size out. (B, C, H, W) -> (B, C, H, W)."""
    r = kernel_radius(sigma)
    return _separable(x, sigma, False, 1, (r, r))


def downsample2x(x: torch.Tensor, sigma: float = DEFAULT.blur_sigma) -> torch.Tensor:
    """Gaussian blur followed by 2× decimation. (B, C, H, W) -> (B, C, H/2, W/2)."""
    if x.shape[-1] % 2 or x.shape[-2] % 2:
        raise ValueError(f"downsample2x needs even sides, got {tuple(x.shape[-2:])}")
    r = kernel_radius(sigma)
    # Output i averages fine pixels 2i-r+1 .. 2i+r, centred at 2i+0.5.
    return _separable(x, sigma, True, 2, (r - 1, r))


def degrade(hr: torch.Tensor, cfg: DegradeConfig = DEFAULT) -> dict[str, torch.Tensor]:
    """hr (B, 3, 192, 192) in [0, 1] -> {"lr": 24², "x2": 48², "x4": 96², "hr": 192²} (float, unquantised)."""
    out = {"hr": hr}
    x = hr
    for key in reversed(LEVELS[:-1]):  # x4, x2, lr
        x = downsample2x(x, cfg.blur_sigma)
        out[key] = x
    return {k: out[k] for k in LEVELS}


def residual(x: torch.Tensor, key: str, cfg: DegradeConfig = DEFAULT) -> torch.Tensor:
    """High-pass residual Δx = x − g_σ∗x for level ``key`` in {x2, x4, hr}."""
    return x - blur(x, cfg.residual_sigma[key])


PRIOR_INPUTS = ("residual", "image")  # what an identity prior sees: the paper's Δx, or the whole face


def prior_view(x: torch.Tensor, key: str, kind: str = "residual") -> torch.Tensor:
    """What an identity prior of level ``key`` is trained on and judges, of [0, 1] images ``x``: ``residual`` =
    the paper's high-pass Δx (Sec. 3); ``image`` = the whole image (a face SqueezeNet for ℓp, issue 17)."""
    if kind == "residual":
        return residual(x, key)
    if kind == "image":
        return x
    raise ValueError(f"unknown prior input {kind!r}; choose one of {', '.join(PRIOR_INPUTS)}")


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Round [0, 1] floats to the 8-bit grid, as when stored as PNG."""
    return (x.clamp(0, 1) * 255).round() / 255


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] float (…, 3, H, W) -> uint8 with the same rounding as ``quantize``."""
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def crop_hr(img: torch.Tensor, cfg: DegradeConfig = DEFAULT) -> torch.Tensor:
    """Source image (3, H, W) or (B, 3, H, W), uint8 or float in [0, 1] -> hr float (…, 3, 192, 192).

    Raises TooSmallError when the shorter side is under ``cfg.crop``.
    """
    batched = img.dim() == 4
    x = img if batched else img.unsqueeze(0)
    if x.shape[1] != 3:
        raise ValueError(f"expected 3 colour channels, got {x.shape[1]}")
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    h, w = x.shape[-2:]
    short = min(h, w)
    if short < cfg.crop:
        raise TooSmallError(f"image {w}x{h} is smaller than the {cfg.crop}px crop")
    if short != cfg.source_size:
        scale = cfg.source_size / short
        size = (max(cfg.crop, round(h * scale)), max(cfg.crop, round(w * scale)))
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        h, w = size
    top, left = (h - cfg.crop) // 2, (w - cfg.crop) // 2
    x = x[..., top : top + cfg.crop, left : left + cfg.crop]
    return x if batched else x[0]


def quadruplet(img: torch.Tensor, cfg: DegradeConfig = DEFAULT) -> dict[str, torch.Tensor]:
    """Source image(s) -> quantised quadruplet, exactly what the shards store (as floats in [0, 1])."""
    hr = crop_hr(img, cfg)
    batched = hr.dim() == 4
    quad = degrade(hr if batched else hr.unsqueeze(0), cfg)
    return {k: quantize(v) if batched else quantize(v)[0] for k, v in quad.items()}


def check_sizes(batch: dict[str, torch.Tensor]) -> None:
    """Raise ValueError naming the key whose spatial size is not the vocabulary's."""
    for k in LEVELS:
        if k in batch and tuple(batch[k].shape[-2:]) != (SIZES[k], SIZES[k]):
            raise ValueError(f"{k}: expected {SIZES[k]}x{SIZES[k]}, got {tuple(batch[k].shape[-2:])}")
