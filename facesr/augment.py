"""The priors' training augmentation (paper Sec. 2.3: random horizontal flips and random crops), batched.

It runs on the training device after the uint8 batch has crossed, so the loader only decodes. Every
level of a sample gets the same flip and the same shift in whole lr pixels (×2 at x2, ×4 at x4, ×8 at
hr), reflect-padded to keep sizes; both commute with the degradation up to borders, so the quadruplet
stays a consistent one. Randomness comes only from the explicit generator (on the batch's device), so a
resumed run that seeds it from (seed, epoch, rank, micro-batch) draws the same augmentation again.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

from .vocab import LEVELS, SIZES


def step_seed(seed: int, epoch: int, rank: int, index: int, use: str = "aug") -> int:
    """A 63-bit seed from (seed, epoch, rank, micro-batch index) and what it seeds: reproducible on resume."""
    digest = hashlib.sha256(f"{use}:{seed}:{epoch}:{rank}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def step_generator(seed: int, epoch: int, rank: int, index: int, device: torch.device | str) -> torch.Generator:
    """A generator on ``device`` seeded from (seed, epoch, rank, micro-batch index): reproducible on resume."""
    return torch.Generator(device=device).manual_seed(step_seed(seed, epoch, rank, index))


def flip_crop(batch: dict, generator: torch.Generator, flip: bool = True, crop_pad: int = 0) -> dict:
    """Same random flip and lr-pixel shift for every level of each sample; float (B, 3, S, S) levels."""
    levels = [k for k in LEVELS if k in batch]
    if not levels or not (flip or crop_pad):
        return batch
    ref = batch[levels[0]]
    b, dev = ref.shape[0], ref.device
    out = dict(batch)
    if flip:
        mirror = (torch.rand(b, device=dev, generator=generator) < 0.5).view(b, 1, 1, 1)  # (B, 1, 1, 1)
        for k in levels:
            out[k] = torch.where(mirror, out[k].flip(-1), out[k])
    if crop_pad:
        shift = torch.randint(-crop_pad, crop_pad + 1, (2, b), device=dev, generator=generator)  # (2, B) lr px
        for k in levels:
            s, size = SIZES[k] // SIZES["lr"], SIZES[k]
            p = crop_pad * s
            x = F.pad(out[k], (p, p, p, p), mode="reflect")  # (B, 3, S + 2p, S + 2p)
            rows = (p + shift[0] * s).view(b, 1) + torch.arange(size, device=dev)  # (B, S)
            cols = (p + shift[1] * s).view(b, 1) + torch.arange(size, device=dev)  # (B, S)
            x = x.gather(2, rows.view(b, 1, size, 1).expand(b, x.shape[1], size, x.shape[3]))  # (B, 3, S, S+2p)
            out[k] = x.gather(3, cols.view(b, 1, 1, size).expand(b, x.shape[1], size, size))  # (B, 3, S, S)
    return out
