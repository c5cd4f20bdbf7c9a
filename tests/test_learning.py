"""The cascade learns past its bicubic starting point on real faces at the paper's stage-2 settings.

A regression test for a silent failure: with ReLUs between the branch convs (no BN there), every
hidden unit of the tiny demo's three branches died within an epoch at Adam lr 10/3·10⁻³, and the
network's output stayed bicubic + a constant for the rest of training while the loss curve looked
merely flat. Single process, no priors (α = 0): this checks the architecture and optimiser, not
the distributed machinery (tests/test_train.py does that).
"""


import pytest
import torch
import torch.nn.functional as F

from facesr.losses import ssim
from facesr.vocab import TARGETS

from .conftest import LFW
from .faces_model import faces, trained as tiny_trained


def _faces(n: int, skip: int = 0) -> dict[str, torch.Tensor]:
    """Quadruplets of n LFW faces, one per person, people in name order from ``skip`` (held out: the models of
    tests/faces_model.py train on train identities at the start of the alphabet)."""
    return faces(sorted(p.name for p in LFW.iterdir() if p.is_dir())[skip:skip + n])


@pytest.fixture(scope="module")
def trained(fixed_and_robust):
    """The cascade trained on the paper's fixed degradation (the robust tests' fixed model, not trained twice)."""
    nets, held = fixed_and_robust
    return nets["paper"], held


def test_branches_stay_alive(trained):
    """Every branch's hidden layer still passes signal (a dead one freezes its image at bicubic)."""
    net, held = trained
    hidden = {}
    hooks = [b.body[1].register_forward_hook(lambda m, i, o, k=k: hidden.__setitem__(k, o))
             for k, b in zip(TARGETS, net.branches)]
    with torch.no_grad():
        net(held["lr"])
    for h in hooks:
        h.remove()
    for k, h in hidden.items():  # a dead ReLU layer is exactly 0 everywhere
        spread = float(h.float().std(dim=(0, 2, 3)).max())
        assert spread > 1e-3, f"branch {k}: hidden layer constant over faces and pixels (std {spread:.2e})"


def test_beats_bicubic_on_unseen_faces(trained):
    """After ROBUST_STEPS steps, SSIM on 32 unseen people beats bicubic upsampling of the same lr at every scale."""
    net, held = trained
    with torch.no_grad():
        out = net(held["lr"])
    for k in TARGETS:
        size = held[k].shape[-1]
        bicubic = F.interpolate(held["lr"], size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
        gain = float(ssim(out[k].clamp(0, 1), held[k]) - ssim(bicubic, held[k]))
        assert gain > 0.01, f"{k}: SSIM gain over bicubic {gain:+.4f}"


# ---------------------------------------------------------------- robust degradation (issue 12)

@pytest.fixture(scope="module")
def fixed_and_robust():
    """The tiny cascade trained on the paper's fixed degradation and on the robust one (tests/faces_model.py: once
    a session, shared with the photo tests), and 32 faces of people neither saw."""
    return {kind: tiny_trained(kind) for kind in ("paper", "robust")}, _faces(32, skip=2000)


@pytest.mark.parametrize("made_by", ["bicubic_aa", "area"])
def test_robust_training_beats_bicubic_where_the_fixed_one_loses(fixed_and_robust, made_by):
    """On faces made small by PIL's antialiased bicubic or by area averaging, a short robust training beats
    bicubic upsampling at x8 (PSNR), and beats the same training on the paper's fixed degradation."""
    from facesr.degradations import EVAL_DEGRADATIONS
    from facesr.quality import finish, image_scores

    def psnr(pred, target):
        return image_scores(finish(pred), target)["psnr"].mean()

    nets, held = fixed_and_robust
    lr = EVAL_DEGRADATIONS[made_by](held["hr"])  # (32, 3, 24, 24)
    bicubic = F.interpolate(lr, size=(192, 192), mode="bicubic", align_corners=False).clamp(0, 1)
    with torch.no_grad():
        score = {k: float(psnr(n(lr)["hr"], held["hr"])) for k, n in nets.items()}
    base = float(psnr(bicubic, held["hr"]))
    assert score["robust"] > base + 0.15, (made_by, score, base)
    assert score["robust"] > score["paper"] + 0.5, (made_by, score, base)  # the fixed model loses ~2 dB here
