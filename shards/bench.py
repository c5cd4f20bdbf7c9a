"""Measurements behind ``facesr bench data``: prep and streaming against naive baselines doing the same work.

* Naive prep: one process, one core, the obvious script — PIL open+convert,
  ``facesr.degrade.quadruplet``, PIL's default PNG save, ``tarfile`` — for the
  same quadruplet PNGs in a tar.
* Naive streaming: a map-style ``Dataset`` that opens the JPEG and degrades on
  the fly in ``__getitem__`` (what one writes without shards).

Everything here times one core (torch intra-op threads = 1), so per-core
figures compare like with like and scale by core count.
"""

from __future__ import annotations

import io
import math
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from facesr.degrade import quadruplet, to_uint8

from .writer import one_thread

CASIA_IMAGES = 494_414  # CASIA-WebFace (paper Sec. 3.1)


def naive_prep(files: list[Path], out_tar: Path) -> dict:
    """The single-process PIL script: source JPEGs -> quadruplet PNGs in one tar."""
    with one_thread():
        t0 = time.perf_counter()
        with tarfile.open(out_tar, "w") as tar:
            for n, f in enumerate(files):
                img = Image.open(f).convert("RGB")
                quad = quadruplet(torch.from_numpy(np.array(img)).permute(2, 0, 1))
                for k, v in quad.items():
                    buf = io.BytesIO()
                    Image.fromarray(to_uint8(v).permute(1, 2, 0).numpy()).save(buf, format="PNG")
                    ti = tarfile.TarInfo(f"{n:08d}.{k}.png")
                    ti.size = buf.tell()
                    buf.seek(0)
                    tar.addfile(ti, buf)
        s = time.perf_counter() - t0
    return {"images": len(files), "seconds": s, "images_per_s_per_core": len(files) / s,
            "bytes_per_image": out_tar.stat().st_size / len(files)}


class NaiveFaces(Dataset):
    """Map-style baseline: JPEG decode and degradation in ``__getitem__``, every epoch again."""

    def __init__(self, files: list[Path]):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        img = torch.from_numpy(np.array(Image.open(self.files[i]).convert("RGB"))).permute(2, 0, 1)
        return quadruplet(img)  # {"lr","x2","x4","hr"}: float (3, S, S)


def interleaved_rates(streams: dict[str, object], batch_size: int, batches: int, rounds: int,
                      warmup: int = 3) -> dict[str, dict]:
    """Samples/s per worker of each batch iterable, timed in alternation (``rounds`` × ``batches`` each).

    On a shared machine load comes and goes; alternating variants and keeping each one's best round
    compares them under the same conditions. All in this process, one core: the per-worker rate.
    """
    its = {k: iter(v) for k, v in streams.items()}
    rates = {k: [] for k in its}
    with one_thread():
        for it in its.values():
            for _ in range(warmup):
                next(it)
        for _ in range(rounds):
            for k, it in its.items():
                t0 = time.perf_counter()
                for _ in range(batches):
                    next(it)
                rates[k].append(batches * batch_size / (time.perf_counter() - t0))
    return {k: {"samples_per_s_per_worker": max(v), "rounds": v} for k, v in rates.items()}


def naive_batches(files: list[Path], batch_size: int):
    """Endless batches of the naive map-style dataset (shuffled, one process)."""
    loader = DataLoader(NaiveFaces(files), batch_size=batch_size, shuffle=True, num_workers=0, drop_last=True)
    while True:
        yield from loader


def extrapolate(check_per_core: float, write_per_core: float, cores: int, shard_size: int,
                images: int = CASIA_IMAGES) -> dict:
    """Time to shard ``images`` on ``cores``: check pass at full width, then waves of whole shard tasks."""
    check_s = images / (check_per_core * cores)
    shards = math.ceil(images / shard_size)
    waves = math.ceil(shards / cores)
    write_s = waves * shard_size / write_per_core  # the last wave is partly idle: counted in full
    return {"images": images, "cores": cores, "shards": shards, "waves": waves, "check_s": check_s,
            "write_s": write_s, "total_s": check_s + write_s, "total_min": (check_s + write_s) / 60}
