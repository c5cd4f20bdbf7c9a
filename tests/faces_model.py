"""A tiny cascade that beats bicubic on faces shrunk the way `facesr sr` shrinks them, trained in a minute.

tests/test_faces_photos.py needs a model that really beats bicubic (the tiny nets of conftest only perturb it).
The demo's deploy model lives outside the checkout, so the test trains its own: the tiny preset, 300 Adam steps
of SSIM on 64 LFW faces of train identities, lr made by antialiased bicubic (PIL's shrink, the one
`facesr sr`'s alignment uses), as tests/test_learning.py's robust model (+0.34 dB over bicubic at 300 steps).
"""

import numpy as np
import torch
from PIL import Image

from facesr.degrade import quadruplet
from facesr.degradations import EVAL_DEGRADATIONS
from facesr.losses import ssim_loss
from facesr.models import PRESETS, SRNet
from facesr.vocab import TARGETS
from shards.plan import SplitConfig, split_identities

from .conftest import LFW

STEPS, BATCH, LR = 300, 8, 10 / 3 * 1e-3


def split_of() -> dict[str, str]:
    """LFW identity -> its split in the demo's shards (facesr prep's default split)."""
    ids = sorted(p.name for p in LFW.iterdir() if p.is_dir())
    return split_identities(ids, SplitConfig())


def train_model(n: int = 64) -> SRNet:
    split = split_of()
    people = [i for i in sorted(split) if split[i] == "train"][:n]
    imgs = torch.stack([torch.from_numpy(np.asarray(Image.open(sorted((LFW / p).iterdir())[0]).convert("RGB"))
                                         .copy()).permute(2, 0, 1) for p in people])
    quads = quadruplet(imgs)
    quads["lr"] = EVAL_DEGRADATIONS["bicubic_aa"](quads["hr"])
    torch.manual_seed(0)
    net = SRNet(PRESETS["tiny"].sr)
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    gen = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        idx = torch.randint(0, n, (BATCH,), generator=gen)
        out = net(quads["lr"][idx])
        loss = sum(ssim_loss(out[k], quads[k][idx]) for k in TARGETS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval()
