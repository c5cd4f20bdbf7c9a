"""Tiny cascades trained in a CPU minute each, once per test session and shared by the tests that need one.

tests/test_learning.py checks that they learn (past bicubic, branches alive, the robust one where the fixed one
loses); tests/test_faces_photos.py needs a model that really beats bicubic on faces shrunk the way `facesr sr`
shrinks them (PIL's antialiased bicubic) and uses the robust one, whose gain there test_learning asserts (+0.34 dB
over bicubic at 300 steps). The tiny preset, ROBUST_STEPS Adam steps of SSIM at the paper's stage-2 lr and batch,
on the first image of the first 64 train identities of the demo's split (facesr prep's default), so the test
identities the photo tests use were never seen.
"""

from functools import cache

import numpy as np
import torch
from PIL import Image

from facesr.degrade import quadruplet
from facesr.losses import ssim_loss
from facesr.models import PRESETS, SRNet
from facesr.vocab import TARGETS
from shards.plan import SplitConfig, split_identities

from .conftest import LFW

ROBUST_STEPS, BATCH, LR = 300, 8, 10 / 3 * 1e-3  # robust: +0.34/+0.35 dB over bicubic at 300 steps, -0.12 at 100


def split_of() -> dict[str, str]:
    """LFW identity -> its split in the demo's shards (facesr prep's default split)."""
    ids = sorted(p.name for p in LFW.iterdir() if p.is_dir())
    return split_identities(ids, SplitConfig())


def faces(people: list[str]) -> dict[str, torch.Tensor]:
    """Quadruplets (float, 0..1) of the first LFW image of each of ``people``."""
    imgs = torch.stack([torch.from_numpy(np.asarray(Image.open(sorted((LFW / p).iterdir())[0]).convert("RGB"))
                                         .copy()).permute(2, 0, 1) for p in people])
    return quadruplet(imgs.float() / 255)


@cache
def train_faces(n: int = 64) -> dict[str, torch.Tensor]:
    split = split_of()
    return faces([i for i in sorted(split) if split[i] == "train"][:n])


@cache
def trained(kind: str) -> SRNet:
    """The tiny cascade trained ROBUST_STEPS steps on lr made by ``kind`` (paper: the quadruplet's own lr; else a
    facesr.degradations model drawn per batch, e.g. robust). Trained once per process; callers must not train it."""
    from facesr.degradations import DEGRADATIONS, degrade_lr

    train = train_faces()
    torch.manual_seed(0)
    net = SRNet(PRESETS["tiny"].sr).to(memory_format=torch.channels_last)  # as the CPU workers train: ~1.3x fp32
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    gen, deg = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    for _ in range(ROBUST_STEPS):
        idx = torch.randint(0, train["hr"].shape[0], (BATCH,), generator=gen)
        lr = train["lr"][idx] if kind == "paper" else degrade_lr(train["hr"][idx], DEGRADATIONS[kind], deg)
        out = net(lr.contiguous(memory_format=torch.channels_last))
        loss = sum(ssim_loss(out[k], train[k][idx]) for k in TARGETS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval().requires_grad_(False)
