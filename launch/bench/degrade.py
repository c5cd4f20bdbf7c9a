"""Robust degradation: ``degrade_lr`` per sample on one CPU thread against a naive per-image PIL loop.

Both pipelines run in the same process on the same faces: the batched torch one
(``facesr.degradations.degrade_lr`` with the ``robust`` model) and what one would
write per image with PIL and numpy (Gaussian blur with the same odds and σ range,
antialiased bicubic resize, Gaussian noise, JPEG). The torch figure is also split
by stage (resize only, + blur, + noise, + JPEG) to show where the time goes.
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
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0
