"""The paper's Table 1 peers as presets of the same system (issue 17): SRCNN and VDSR on the bicubic-upsampled
lr, ℓp (the cascade with a perceptual loss on SqueezeNet fire2-4 features), SRGAN (SRResNet on the lr and a
discriminator trained beside it). Each builds over every preset,
learns on real faces, goes through weights files, eval, grid and export with its x8-only vocabulary; the
perceptual loss equals a direct feature computation; config errors name the key.

ℓp's feature network is torchvision's squeezenet1_1. Its ImageNet weights cannot be downloaded here, so the
tests give it a local weights file of the same architecture, randomly initialised (seeded): the loading code
and the loss are the real ones, and a perceptual loss on random conv features still gives a learning signal.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torchvision.models import squeezenet1_1

from facesr.evaluate import build_report, folder_batches, format_table, list_faces, score, select
from facesr.losses import AdversarialLoss, MSELoss, PerceptualLoss
from facesr.models import OUTPUTS, PRESETS, SR_MODELS, build_sr
from facesr.models.perceptual import IMAGENET_MEAN, IMAGENET_STD
from facesr.vocab import SIZES
from facesr.weights import load_squeezenet, load_srnet, save_srnet, squeezenet_file

from .conftest import LFW, tiny_net
from .test_learning import _faces


@pytest.fixture(scope="module")
def squeeze_file(tmp_path_factory):
    """torchvision squeezenet1_1 weights (seeded random init) as safetensors and as a torch .pth state dict."""
    torch.manual_seed(0)
    state = squeezenet1_1(weights=None).state_dict()
    d = tmp_path_factory.mktemp("squeezenet")
    save_file(state, str(d / "squeezenet1_1.safetensors"))
    torch.save(state, d / "squeezenet1_1.pth")
    return d / "squeezenet1_1.safetensors", d / "squeezenet1_1.pth"


def _held_loss(net: torch.nn.Module, loss_fn: torch.nn.Module, held: dict) -> float:
    """``loss_fn``'s loss of ``net`` on the faces ``held``, in eval mode (training mode restored after)."""
    net.eval()
    with torch.no_grad():
        value = loss_fn(net(held["lr"]), held)["loss"].item()
    net.train()
    return value


def _minibatches(train: dict):
    """STEPS random mini-batches of BATCH faces from ``train`` (seeded: the same draw for every test)."""
    gen = torch.Generator().manual_seed(0)
    n = len(train["lr"])
    for _ in range(STEPS):
        idx = torch.randint(0, n, (BATCH,), generator=gen)
        yield {k: v[idx] for k, v in train.items()}


def _trained_looking(model: str, seed: int = 0):
    """A tiny network with non-trivial output (zero-initialised last layers perturbed), in eval mode."""
    torch.manual_seed(seed)
    net = tiny_net(seed) if model == "cascade" else build_sr(model, preset="tiny")
    if model == "vdsr":
        with torch.no_grad():
            net.body[-1].weight.normal_(0, 1e-2)
    return net.eval()


@pytest.mark.parametrize("model", sorted(SR_MODELS))
def test_every_sr_model_builds_with_its_outputs(model, tmp_path):
    """Each tiny SR model maps lr (2, 3, 24, 24) to finite outputs at exactly its targets, its deploy network
    gives the hr output, and a weights file brings back the same network."""
    net = build_sr(model, preset="tiny").eval()
    lr = torch.rand(2, 3, 24, 24)
    with torch.no_grad():
        out = net(lr)
        assert tuple(out) == OUTPUTS[model]
        for key, img in out.items():
            assert img.shape == (2, 3, SIZES[key], SIZES[key]) and torch.isfinite(img).all()
        assert torch.equal(net.deploy()(lr), out["hr"])
        save_srnet(tmp_path / "w.safetensors", net)
        back = load_srnet(tmp_path / "w.safetensors")
        assert type(back) is type(net) and back.cfg == net.cfg
        assert torch.equal(back(lr)["hr"], out["hr"])


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("model", sorted(SR_MODELS))
def test_every_preset_has_the_output_shapes(model, preset):
    """Every preset's SR model gives its targets' shapes (shapes only: built on the meta device, no compute)."""
    with torch.device("meta"):
        out = build_sr(model, preset=preset)(torch.zeros(2, 3, 24, 24))
    assert {k: tuple(v.shape) for k, v in out.items()} == {k: (2, 3, SIZES[k], SIZES[k]) for k in OUTPUTS[model]}


def test_peers_follow_their_papers():
    """Paper sizes: SRCNN is 9-1-5 with 64/32 filters; VDSR has 20 conv layers of 64 3x3 filters and predicts a
    residual over bicubic (freshly built, its zeroed last layer leaves the bicubic upsampling)."""
    srcnn = build_sr("srcnn", preset="paper")
    convs = [m for m in srcnn.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.kernel_size[0] for c in convs] == [9, 1, 5] and [c.out_channels for c in convs] == [64, 32, 3]
    convs = [m for m in build_sr("vdsr", preset="paper").modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 20 and {c.kernel_size for c in convs} == {(3, 3)}
    assert [c.out_channels for c in convs[:-1]] == [64] * 19
    lr = torch.rand(1, 3, 24, 24)
    bicubic = torch.nn.functional.interpolate(lr, size=(192, 192), mode="bicubic", align_corners=False)
    # torch's bicubic, computed as matmuls (facesr/resample.py): equal to float rounding
    assert torch.allclose(build_sr("vdsr", preset="tiny")(lr)["hr"], bicubic, atol=1e-6)


def test_srgan_follows_ledig():
    """SRGAN's generator (SRResNet): 9x9 head and tail, 16 residual blocks of two 64-filter 3x3 convs with BN, and
    one pixel shuffle x2 per factor of 2 (three for 8x), on the 24² lr itself. Its discriminator: 3x3 convs of
    64, 64, 128, 128, 256, 256, 512, 512 filters, strides 1, 2, 1, 2, ..., LeakyReLU 0.2, dense 1024, one logit."""
    from facesr.models import build_critic

    g = build_sr("srresnet", preset="paper")
    convs = [m for m in g.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs[0].kernel_size == convs[-1].kernel_size == (9, 9) and convs[0].in_channels == 3
    assert len(g.blocks) == 16 and sum(isinstance(m, torch.nn.PixelShuffle) for m in g.modules()) == 3
    assert {c.out_channels for c in convs[1:-1] if c.kernel_size == (3, 3)} == {64, 256}
    out = g(torch.rand(2, 3, 24, 24))
    assert set(out) == {"hr"} and out["hr"].shape == (2, 3, 192, 192)
    d = build_critic("paper")
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 512, 512]
    assert [c.stride[0] for c in convs] == [1, 2, 1, 2, 1, 2, 1, 2]
    dense = [m for m in d.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in dense] == [(512, 1024), (1024, 1)]
    assert d(torch.rand(3, 3, 192, 192)).shape == (3,) and build_critic("tiny")(torch.rand(2, 3, 192, 192)).shape == (2,)


def test_adversarial_loss_terms_and_where_their_gradients_go():
    """SRGAN's loss: the generator's = MSE on [-1, 1] images (Ledig's) + w · BCE(D(sr), real), computed directly here; the
    discriminator's = BCE(D(hr), real) + BCE(D(sr), fake). The generator's loss sends no gradient into D and the
    discriminator's none into the generator."""
    from facesr.models import build_critic

    torch.manual_seed(4)
    g, d = build_sr("srresnet", preset="tiny"), build_critic("tiny")
    batch = {"lr": torch.rand(2, 3, 24, 24), "hr": torch.rand(2, 3, 192, 192)}
    loss = AdversarialLoss(d, weight=0.01)
    sr = g(batch["lr"])
    terms = loss(sr, batch)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    with torch.no_grad():
        adv = bce(d(sr["hr"]), torch.ones(2))
        mse = torch.nn.functional.mse_loss(2 * sr["hr"] - 1, 2 * batch["hr"] - 1)
    assert terms["adv/x8"].item() == pytest.approx(adv.item(), rel=1e-5)
    assert terms["loss"].item() == pytest.approx(mse.item() + 0.01 * adv.item(), rel=1e-5)
    assert terms["mse/x8"].item() == pytest.approx(mse.item() / 4, rel=1e-5)  # reported in [0, 1] units
    terms["loss"].backward(retain_graph=True)
    assert all(p.grad is None for p in d.parameters())
    assert all(p.grad is not None for p in g.parameters())
    g.zero_grad(set_to_none=True)
    terms["critic_loss"].backward()
    assert all(p.grad is None for p in g.parameters()) and all(p.grad is not None for p in d.parameters())
    with pytest.raises(RuntimeError, match="no discriminator"):
        AdversarialLoss()(sr, batch)


def test_srgan_two_players_learn_on_real_faces():
    """SRResNet and its discriminator trained in alternation, as the worker loop does (generator step, then
    discriminator step), STEPS Adam steps on 64 real LFW faces: the generator's pixel MSE on 16 faces it never
    saw falls by half (it starts far from an image), and the discriminator tells real faces from the generator's
    better than chance on them."""
    from facesr.models import build_critic

    torch.manual_seed(0)
    train, held = _faces(64), _faces(16, skip=2000)
    g, d = build_sr("srresnet", preset="tiny"), build_critic("tiny")
    loss_fn = AdversarialLoss(d)
    opt_g, opt_d = torch.optim.Adam(g.parameters(), lr=1e-3), torch.optim.Adam(d.parameters(), lr=1e-3)

    before = _held_loss(g, MSELoss(), held)
    for batch in _minibatches(train):
        terms = loss_fn(g(batch["lr"]), batch)
        opt_g.zero_grad(set_to_none=True)
        terms["loss"].backward()
        opt_g.step()
        opt_d.zero_grad(set_to_none=True)
        terms["critic_loss"].backward()
        opt_d.step()
    after = _held_loss(g, MSELoss(), held)
    assert after < 0.5 * before, (before, after)
    with torch.no_grad():
        real, fake = torch.sigmoid(d(held["hr"])), torch.sigmoid(d(g(held["lr"])["hr"]))
    assert (real > fake).float().mean() > 0.5, (real, fake)


# ---------------------------------------------------------------- perceptual loss


def test_perceptual_loss_matches_direct_fire_features(squeeze_file):
    """ℓp per scale = Σ over torchvision squeezenet1_1's fire2, fire3, fire4 outputs (features[3], [4], [6],
    taken by hooks on the whole network) of the mean squared difference, on ImageNet-normalised images."""
    safetensors_path, pth_path = squeeze_file
    ref = squeezenet1_1(weights=None)
    ref.load_state_dict(torch.load(pth_path, weights_only=True))
    ref.eval()
    taps: list[torch.Tensor] = []
    for i in (3, 4, 6):
        ref.features[i].register_forward_hook(lambda m, inp, out: taps.append(out))
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def direct(a, b):
        taps.clear()
        ref.features((a - mean) / std)
        fa = list(taps)
        taps.clear()
        ref.features((b - mean) / std)
        return sum(((x - y) ** 2).mean() for x, y in zip(fa, taps))

    torch.manual_seed(1)
    batch = {k: torch.rand(2, 3, s, s) for k, s in SIZES.items()}
    sr = {k: (batch[k] + 0.1 * torch.randn_like(batch[k])).clamp(0, 1) for k in ("x2", "x4", "hr")}
    for path in (safetensors_path, pth_path):  # both file forms load the same network
        terms = PerceptualLoss(load_squeezenet(str(path)))(sr, batch)
        with torch.no_grad():
            want = {s: direct(sr[k], batch[k]) for k, s in (("x2", "x2"), ("x4", "x4"), ("hr", "x8"))}
        for scale, value in want.items():
            assert terms[f"perceptual/{scale}"].item() == pytest.approx(value.item(), rel=1e-5)
        assert terms["loss"].item() == pytest.approx(sum(v.item() for v in want.values()), rel=1e-5)
    frozen = load_squeezenet(str(safetensors_path)).train()
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())


@pytest.mark.parametrize("kind", ["residual", "image"])
def test_prior_feature_perceptual_loss_matches_the_priors_own_fire_modules(kind):
    """ℓp on the identity priors (``stage2.perceptual_weights=priors``): per output, Σ over fire2, fire3, fire4 of
    that scale's prior (hooked on the whole frozen prior, as its classifier sees them) of the mean squared
    difference between the features of what the prior was trained on (residuals, or the images themselves for
    priors of ``stage1.input=image``); gradients reach the SR output, none reach the frozen prior."""
    from facesr.degrade import prior_view
    from facesr.models import FrozenPrior, build_prior, get_preset
    from facesr.models.perceptual import PRIOR_FIRE, PriorFeatures

    torch.manual_seed(2)
    priors = {}
    for k in ("x2", "x4", "hr"):
        net = build_prior(get_preset("tiny").prior, num_classes=7)
        net.train()
        with torch.no_grad():  # BN running statistics that are not the identity
            for _ in range(3):
                net(0.05 * torch.randn(4, 3, SIZES[k], SIZES[k]))
        priors[k] = FrozenPrior(net, input=kind)
    assert [type(priors["hr"].model.features[i]).__name__ for i in PRIOR_FIRE.values()] == ["Fire"] * 3
    batch = {k: torch.rand(2, 3, s, s) for k, s in SIZES.items()}
    sr = {k: (batch[k] + 0.1 * torch.randn_like(batch[k])).clamp(0, 1).requires_grad_() for k in ("x2", "x4", "hr")}
    loss = PerceptualLoss({k: PriorFeatures(p, k) for k, p in priors.items()})
    terms = loss(sr, batch)
    for key, scale in (("x2", "x2"), ("x4", "x4"), ("hr", "x8")):
        taps: list[torch.Tensor] = []
        hooks = [priors[key].model.features[i].register_forward_hook(lambda m, inp, out: taps.append(out))
                 for i in PRIOR_FIRE.values()]
        with torch.no_grad():
            priors[key](prior_view(sr[key].detach(), key, kind))
            got = list(taps)
            taps.clear()
            priors[key](prior_view(batch[key], key, kind))
        for h in hooks:
            h.remove()
        want = sum(((a - b) ** 2).mean() for a, b in zip(got, taps))
        assert terms[f"perceptual/{scale}"].item() == pytest.approx(want.item(), rel=1e-5)
    terms["loss"].backward()
    assert all(sr[k].grad is not None and sr[k].grad.abs().sum() > 0 for k in sr)
    assert not any(p.requires_grad for p in loss.parameters())
    with pytest.raises(KeyError, match="not output 'x3'"):
        loss._features("x3")


def test_squeezenet_weights_errors_say_what_to_do(tmp_path, monkeypatch, squeeze_file):
    """No ImageNet file in torch hub's cache (and no download): the error names the URL, the cache path and the
    config key; a wrong file is refused naming it."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FileNotFoundError) as e:
        squeezenet_file("imagenet", download=False)
    msg = str(e.value)
    assert "squeezenet1_1-b8a52dc0.pth" in msg and str(tmp_path / "torch") in msg and "stage2.perceptual_weights" in msg
    wrong = tmp_path / "cascade.safetensors"
    save_srnet(wrong, tiny_net())
    with pytest.raises(ValueError, match=f"{wrong}: not torchvision squeezenet1_1 weights"):
        load_squeezenet(str(wrong))
    with pytest.raises(FileNotFoundError, match="no such SqueezeNet weights file"):
        load_squeezenet(str(tmp_path / "absent.pth"))


def test_squeezenet_download_goes_through_torch_hub_with_its_hash_check(tmp_path, monkeypatch, squeeze_file):
    """``imagenet`` weights absent from the hub cache are fetched by torch.hub's download_url_to_file from a real
    HTTP server on loopback: a file whose sha256 starts with the name's prefix lands in the cache and loads; a
    file that fails the check is refused naming the URL, and nothing is left in the cache."""
    import hashlib
    import http.server
    import threading
    from functools import partial

    data = squeeze_file[1].read_bytes()
    prefix = hashlib.sha256(data).hexdigest()[:8]
    site = tmp_path / "site"
    site.mkdir()
    (site / f"squeezenet1_1-{prefix}.pth").write_bytes(data)
    (site / "squeezenet1_1-00000000.pth").write_bytes(data)  # the name promises another file
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             partial(http.server.SimpleHTTPRequestHandler, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    try:
        with pytest.raises(ValueError, match="squeezenet1_1-00000000.pth: downloaded file fails its sha256 check"):
            squeezenet_file("imagenet", url=f"{base}/squeezenet1_1-00000000.pth")
        assert not cache.exists() or not any(cache.iterdir())
        path = squeezenet_file("imagenet", url=f"{base}/squeezenet1_1-{prefix}.pth")
        assert path == cache / f"squeezenet1_1-{prefix}.pth" and path.read_bytes() == data
        with pytest.raises(FileNotFoundError, match="cannot download"):
            squeezenet_file("imagenet", url=f"{base}/squeezenet1_1-11111111.pth")  # 404
    finally:
        server.shutdown()
    assert isinstance(load_squeezenet(str(path)), torch.nn.Module)  # the file it fetched loads


# ---------------------------------------------------------------- learning on real faces

STEPS, BATCH = 40, 8


@pytest.mark.parametrize("model,loss", [("srcnn", "mse"), ("vdsr", "mse"), ("cascade", "perceptual")])
def test_peer_loss_falls_on_real_faces(model, loss, squeeze_file):
    """A tiny peer trained STEPS Adam steps on 64 real LFW faces with its own loss: the loss on 16 faces it never
    saw falls at least 3% below its value before training. VDSR and ℓp start at bicubic, a strong start: VDSR's
    MSE fell 5.6% (0.00587 -> 0.00554, +0.25 dB over bicubic); SRCNN starts far from an image."""
    torch.manual_seed(0)
    train, held = _faces(64), _faces(16, skip=2000)
    net = build_sr(model, preset="tiny")
    loss_fn = PerceptualLoss(load_squeezenet(str(squeeze_file[0]))) if loss == "perceptual" else MSELoss()
    opt = torch.optim.Adam(net.parameters(), lr={"srcnn": 1e-3, "vdsr": 1e-3, "cascade": 10 / 3 * 1e-3}[model])

    before = _held_loss(net, loss_fn, held)
    for batch in _minibatches(train):
        terms = loss_fn(net(batch["lr"]), batch)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        opt.step()
    after = _held_loss(net, loss_fn, held)
    assert after < 0.97 * before, (model, loss, before, after)


# ---------------------------------------------------------------- eval, grid, export with x8 only


def test_quality_table_and_grid_put_peers_beside_the_cascade(tmp_path, capsys):
    """`facesr eval quality` of a cascade run and two peer runs: one table, the peers at x8 only (dashes at x2
    and x4, gains over bicubic at x8 only in the JSON); `facesr eval grid --scales x8` gives one column per model
    (LR, bicubic, 3 models, HR), the default grid the cascade's three and each peer's one."""
    from PIL import Image

    from facesr.grid import CELL
    from launch.cli import main

    runs = {}
    for model in ("cascade", "srcnn", "vdsr"):
        runs[model] = tmp_path / "runs" / model
        save_srnet(runs[model] / "srnet.safetensors", _trained_looking(model))
    people = ["Aaron_Peirsol", "Colin_Powell", "Serena_Williams"]
    ids = tmp_path / "ids.txt"
    ids.write_text("\n".join(people) + "\n")
    out = tmp_path / "eval"
    assert main(["eval", "quality", *map(str, runs.values()), "--data", str(LFW), "--ids", str(ids), "--limit", "4",
                 "--batch-size", "4", "--out", str(out), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    report = json.loads((out / "quality.json").read_text())
    assert list(report["models"]) == ["cascade", "srcnn", "vdsr"]
    assert set(report["results"]["cascade"]) == {"x2", "x4", "x8"}
    for peer in ("srcnn", "vdsr"):
        assert set(report["results"][peer]) == set(report["gain_over_bicubic"][peer]) == {"x8"}
        gain = report["results"][peer]["x8"]["psnr"] - report["results"]["bicubic"]["x8"]["psnr"]
        assert report["gain_over_bicubic"][peer]["x8"]["psnr"] == pytest.approx(gain)
    x2_psnr = next(line for line in text.splitlines() if line.startswith("x2") and "PSNR" in line)
    assert x2_psnr.split()[-2:] == ["—", "—"] and x2_psnr.count("—") == 4  # two peers' figure and gain columns
    # the grid: Fig. 3's one column per model, and the default every scale each model has
    for scales, columns in (("x8", 2 + 3 + 1), ("x2,x4,x8", 2 + 3 + 1 + 1 + 1)):
        assert main(["eval", "grid", *map(str, runs.values()), "--data", str(LFW), "--ids", str(ids), "--rows", "2",
                     "--scales", scales, "--out", str(tmp_path / scales), "--device", "cpu"]) == 0
        w, _ = Image.open(tmp_path / scales / "grid.png").size
        assert columns * CELL <= w < (columns + 1) * CELL, (scales, w)


def test_score_counts_every_face_for_a_peer():
    """The peers' x8 scores come from as many faces as bicubic's, and the table formats without x2/x4 cells."""
    faces = select(list_faces(LFW, ["Colin_Powell"]), 5, seed=0)
    results, n = score({"vdsr": _trained_looking("vdsr")}, folder_batches(faces, 3))
    assert n == 5 and results["vdsr"]["x8"]["n"] == results["bicubic"]["x8"]["n"] == 5
    assert "x2" not in results["vdsr"]
    assert "vdsr" in format_table(build_report(results, n, "test", {"vdsr": "vdsr"}))


@pytest.mark.parametrize("model", ["srcnn", "srresnet"])
def test_peer_export_and_sr(tmp_path, model):
    """A peer's run folder exports to TorchScript within tolerance and serves `facesr sr` like the cascade's."""
    from facesr.export import export
    from facesr.infer import load_upscaler

    run = tmp_path / model
    save_srnet(run / "srnet.safetensors", _trained_looking(model))
    deploy = load_upscaler(run)
    result = export(deploy, tmp_path / "export", ("torchscript",))
    assert result["torchscript"]["ok"]
    lr = torch.rand(2, 3, 24, 24)
    with torch.no_grad():
        assert torch.allclose(load_upscaler(result["torchscript"]["path"])(lr), deploy(lr), atol=1e-5)


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("overrides,key", [
    (["stage2.model=srgan"], "stage2.model"),
    (["stage2.loss=l1"], "stage2.loss"),
    (["stage2.loss=mse", "run.stages=[1, 2]"], "run.stages"),
    (["stage2.loss=perceptual", "run.stages=[2]", "stage2.priors=p.safetensors"], "stage2.priors"),
    (["stage2.alpha=-1", "run.stages=[2]"], "stage2.alpha"),
    (["stage1.input=faces"], "stage1.input"),
    (["stage2.loss=adversarial", "stage2.adversarial_weight=0", "run.stages=[2]"], "stage2.adversarial_weight"),
    (["stage2.loss=adversarial", "run.stages=[1, 2]"], "run.stages"),
])
def test_bad_peer_config_names_the_key(overrides, key):
    """An unknown model or loss, stage 1 for a loss that uses no priors, or priors given to one: ConfigError
    naming the field."""
    from cluster.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config("launch/configs/demo.yaml", overrides).validate()
    assert e.value.field == key


def test_perceptual_weights_checked_before_any_worker(tmp_path, monkeypatch):
    """A perceptual run whose SqueezeNet weights cannot load is refused by the config check, naming the key."""
    from cluster.config import ConfigError, _check_perceptual, load_config, resolve

    cfg = resolve(load_config("launch/configs/demo.yaml", [
        "run.stages=[2]", "stage2.loss=perceptual", f"stage2.perceptual_weights={tmp_path / 'none.pth'}"]))
    with pytest.raises(ConfigError) as e:
        _check_perceptual(cfg)
    assert e.value.field == "stage2.perceptual_weights" and "none.pth" in str(e.value)


def test_perceptual_on_the_priors_is_a_stage_1_loss():
    """``stage2.perceptual_weights=priors`` makes ℓp use the identity priors: stage 1 may train them in the same
    run, or stage2.priors names them; the ImageNet file is then never asked for."""
    from cluster.config import load_config

    both = load_config("launch/configs/demo.yaml", ["stage2.loss=perceptual", "stage2.perceptual_weights=priors"])
    both.validate()
    assert both.stage2.uses_priors and both.run.stages == [1, 2]
    given = load_config("launch/configs/demo.yaml", ["stage2.loss=perceptual", "stage2.perceptual_weights=priors",
                                                     "run.stages=[2]", "stage2.priors=p.safetensors"])
    given.validate()
    assert not load_config("launch/configs/demo.yaml", ["stage2.loss=perceptual", "run.stages=[2]"]).stage2.uses_priors


@pytest.mark.parametrize("kind", ["residual", "image", None])
def test_stage2_builds_perceptual_loss_on_the_priors_file(tmp_path, kind):
    """The worker's loss for ``perceptual_weights=priors``: one prior-feature network per output, read from the
    stage2.priors file (the same loader and class-map check as C-SRIP's), frozen, fed what the file says its
    priors were trained on (``input``; files from before it: residual); priors of another class map are refused
    naming the file."""
    from cluster.config import load_config, resolve
    from cluster.stages import sr_loss
    from facesr.degrade import prior_view
    from facesr.models import build_prior, get_preset
    from facesr.models.perceptual import PriorFeatures
    from facesr.step import resolve_precision
    from facesr.weights import save_priors

    classes = ["a", "b", "c"]
    torch.manual_seed(0)
    cfg_prior = get_preset("tiny").prior
    priors = {k: build_prior(cfg_prior, len(classes)).eval() for k in ("x2", "x4", "hr")}
    path = tmp_path / "priors.safetensors"
    save_priors(path, priors, cfg_prior, classes, extra=None if kind is None else {"input": kind})
    cfg = resolve(load_config("launch/configs/demo.yaml", [
        "stage2.loss=perceptual", "stage2.perceptual_weights=priors", "run.stages=[2]", f"stage2.priors={path}",
        f"cluster.storage_path={tmp_path / 'runs'}"]))
    loss = sr_loss(cfg, classes, torch.device("cpu"), resolve_precision("fp32", "cpu"))
    assert isinstance(loss, PerceptualLoss) and sorted(loss.features) == ["hr", "x2", "x4"]
    assert all(isinstance(m, PriorFeatures) for m in loss.features.values())
    x = torch.rand(1, 3, 48, 48)
    with torch.no_grad():
        want = priors["x2"].features[:6](prior_view(x, "x2", kind or "residual"))
    assert torch.allclose(loss.features["x2"](x)[1], want, atol=1e-6)  # fire3 of the file's x2 prior
    with pytest.raises(ValueError, match=str(path)):
        sr_loss(cfg, ["a", "b", "z"], torch.device("cpu"), resolve_precision("fp32", "cpu"))


def test_table1_configs_train_every_peer_on_the_same_samples():
    """Every launch/configs/table1-*.yaml validates, and all of them train stage 2 on the same shards, with
    the paper's degradation, for the same samples (epochs × steps × batch) into one storage folder, each under
    its own run name (the peer's file name, which `make table1` relies on); only ℓp on face SqueezeNets trains a
    stage 1 of its own (its feature networks, on whole images)."""
    from pathlib import Path

    from cluster.config import load_config

    paths = sorted(Path("launch/configs").glob("table1-*.yaml"))
    names = {p.stem.removeprefix("table1-") for p in paths}
    assert {"csrip", "ssim", "srcnn", "vdsr", "lp", "lp-priors", "lp-faces", "srgan"} <= names
    seen = set()
    for p in paths:
        cfg = load_config(p)
        cfg.validate()
        assert cfg.run.name == p.stem.removeprefix("table1-")
        assert cfg.run.stages == ([1, 2] if cfg.run.name == "lp-faces" else [2])
        if 1 in cfg.run.stages:
            assert cfg.stage1.input == "image" and cfg.stage2.perceptual_weights == "priors" and not cfg.stage2.priors
        seen.add((cfg.data.shards, cfg.data.degradation, cfg.cluster.storage_path,
                  cfg.stage2.epochs * cfg.data.steps_per_epoch * cfg.stage2.batch_size))
    assert seen == {("runs/demo/shards", "paper", "runs/table1", 32 * 60 * 8)}
