"""Robust degradation: ``degrade_lr`` per sample on one CPU thread against a naive per-image PIL loop.

Both pipelines run in the same process on the same faces: the batched torch one
(``facesr.degradations.degrade_lr`` with the ``robust`` model) and what one would
write per image with PIL and numpy (Gaussian blur with the same odds and σ range,
antialiased bicubic resize, Gaussian noise, JPEG). The torch figure is also split
by stage (resize only, + blur, + noise, + JPEG) to show where the time goes.

Beside it, the paper's high-pass residual Δx = x − g_σ∗x (what the identity priors see, in stage 1 and in stage
2's cross-entropy) on a batch at each level, forward and forward + backward, on the machine's threads: the
Gaussian as two banded matmuls (``facesr.degrade``) against the same Gaussian as two depthwise convolutions with
reflect padding (what ``facesr.degrade`` ran before, and what one would write first).
"""

from __future__ import annotations

import dataclasses
import io
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from facesr.degrade import DEFAULT, gaussian_kernel1d, residual
from facesr.degradations import DEGRADATIONS, Blur, Jpeg, Noise, RobustDegradation, degrade_lr
from facesr.hardware import machine_info


def synthetic_faces(batch: int, seed: int = 0) -> torch.Tensor:
    """(batch, 3, 192, 192) smooth random images with fine texture, on the 8-bit grid (timing only)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, 12, 12, generator=g)
    coarse = F.interpolate(coarse, size=(192, 192), mode="bicubic", align_corners=False)
    x = coarse + 0.05 * torch.randn(batch, 3, 192, 192, generator=g)
    return (x.clamp(0, 1) * 255).round() / 255


def _pil_one(img: Image.Image, cfg: RobustDegradation, rng: random.Random) -> np.ndarray:
    """The naive baseline for one image: blur, resize, noise, JPEG with PIL and numpy."""
    if rng.random() < cfg.blur.p:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(*cfg.blur.sigma)))
    img = img.resize((24, 24), Image.Resampling.BICUBIC)
    if rng.random() < cfg.noise.gaussian_p:
        x = np.asarray(img, dtype=np.float32)
        x = x + np.random.default_rng(rng.getrandbits(32)).normal(0, rng.uniform(*cfg.noise.gaussian_sigma), x.shape)
        img = Image.fromarray(np.clip(x + 0.5, 0, 255).astype(np.uint8))
    if rng.random() < cfg.jpeg.p:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=rng.randint(*cfg.jpeg.quality))
        buf.seek(0)
        img = Image.open(buf).convert("RGB")
    return np.asarray(img)


def _time(fn, seconds: float, per_call: int) -> float:
    """µs per sample of ``fn`` (one call = ``per_call`` samples), repeated for at least ``seconds`` after a warm-up."""
    fn()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += per_call
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return elapsed / n * 1e6


def bench_degradation(batch: int = 64, seconds: float = 3.0, cfg: RobustDegradation | None = None) -> dict:
    """Time both on one CPU thread: {"torch_us_per_sample", "pil_us_per_sample", "ratio_torch_over_pil", ...}."""
    cfg = cfg or DEGRADATIONS["robust"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        hr = synthetic_faces(batch)
        g = torch.Generator().manual_seed(0)
        off = dict(blur=Blur(p=0.0), noise=Noise(gaussian_p=0.0, poisson_p=0.0), jpeg=Jpeg(p=0.0))
        stages = {
            "resize only": dataclasses.replace(cfg, **off),
            "+ blur": dataclasses.replace(cfg, noise=off["noise"], jpeg=off["jpeg"]),
            "+ noise": dataclasses.replace(cfg, jpeg=off["jpeg"]),
        }
        breakdown = {name: _time(lambda c=c: degrade_lr(hr, c, g), seconds / 2, batch) for name, c in stages.items()}
        torch_us = _time(lambda: degrade_lr(hr, cfg, g), seconds, batch)
        breakdown["+ jpeg (all)"] = torch_us
        images = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in (hr * 255).round().to(torch.uint8)]
        rng = random.Random(0)
        pil_us = _time(lambda: [_pil_one(im, cfg, rng) for im in images], seconds, batch)
    finally:
        torch.set_num_threads(threads)
    return {
        "batch": batch,
        "threads": 1,
        "cpu": machine_info()["cpu"],
        "torch": torch.__version__,
        "torch_us_per_sample": torch_us,
        "pil_us_per_sample": pil_us,
        "ratio_torch_over_pil": torch_us / pil_us,
        "torch_stages_us_per_sample": breakdown,
    }


def residual_by_conv(x: torch.Tensor, key: str) -> torch.Tensor:
    """The naive residual: the separable Gaussian as two depthwise ``conv2d`` with reflect padding."""
    k = gaussian_kernel1d(DEFAULT.residual_sigma[key]).to(x.dtype)
    r, c = (k.numel() - 1) // 2, x.shape[1]
    y = F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return x - y


def bench_residual(batch: int = 32, seconds: float = 1.0) -> dict:
    """ms per call of the residual at x2/x4/hr, ours (matmuls) and by convolution, forward and with backward."""
    out = {}
    for key, size in (("x2", 48), ("x4", 96), ("hr", 192)):
        x = synthetic_faces(batch)
        x = F.interpolate(x, size=(size, size), mode="area") if size != 192 else x
        xg = x.clone().requires_grad_(True)
        row = {"max_abs_difference": float((residual(x, key) - residual_by_conv(x, key)).abs().max())}
        for name, fn in (("matmul", residual), ("conv", residual_by_conv)):
            row[f"{name}_ms"] = _time(lambda: fn(x, key), seconds, 1) / 1e3
            row[f"{name}_backward_ms"] = _time(lambda: fn(xg, key).sum().backward(), seconds, 1) / 1e3
        row["speedup"] = row["conv_ms"] / row["matmul_ms"]
        row["speedup_backward"] = row["conv_backward_ms"] / row["matmul_backward_ms"]
        out[key] = row
    return {"batch": batch, "threads": torch.get_num_threads(), "levels": out}


def configure(p) -> None:
    p.add_argument("--batch", type=int, default=64, help="faces degraded per call")
    p.add_argument("--seconds", type=float, default=3.0, help="measuring time per pipeline (half per torch stage)")
    p.add_argument("--out", default="bench/degrade.json")


def run(args) -> int:
    result = bench_degradation(batch=args.batch, seconds=args.seconds)
    print(f"robust degradation on one thread ({result['cpu']}): torch {result['torch_us_per_sample']:.0f} µs a "
          f"sample, per-image PIL loop {result['pil_us_per_sample']:.0f} µs (x{result['ratio_torch_over_pil']:.2f})")
    for stage, us in result["torch_stages_us_per_sample"].items():
        print(f"  {stage:>13}: {us:8.0f} µs a sample")
    result["residual"] = res = bench_residual()
    print(f"paper residual on {res['batch']} faces, {res['threads']} threads: matmuls vs depthwise convolutions")
    for key, row in res["levels"].items():
        print(f"  {key:>3}: {row['matmul_ms']:7.2f} vs {row['conv_ms']:7.2f} ms (x{row['speedup']:.1f}); with backward "
              f"{row['matmul_backward_ms']:7.2f} vs {row['conv_backward_ms']:7.2f} ms (x{row['speedup_backward']:.1f}); "
              f"max |difference| {row['max_abs_difference']:.1e}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0
