"""Detail strength (facesr.detail): the cascade's corrections to bicubic scaled by folding the factor into its
branches' last convolutions, exactly; refused where there is no correction to scale."""

from __future__ import annotations

import json

import pytest
import torch

from facesr.detail import check_detail, with_detail
from facesr.models import PRESETS, SRNet
from facesr.resample import upsample_bicubic
from facesr.weights import load_srnet, read_meta, save_srnet
from tests.conftest import LFW, tiny_net


def _drawing(seed: int = 0) -> SRNet:
    """A tiny cascade whose branches draw corrections of a visible size (not the zero-initialised skip)."""
    net = tiny_net(seed)
    with torch.no_grad():
        for b in net.branches:
            b.body[-1].weight.normal_(0, 0.05)
            b.body[-1].bias.normal_(0, 0.05)
    return net


@pytest.mark.parametrize("d", [0.5, 0.7, 1.3])
def test_every_output_is_bicubic_plus_the_scaled_correction(d):
    net = _drawing()
    lr = torch.rand(3, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, scaled = net(lr), with_detail(net, d)(lr)
        deploy = with_detail(net, d).deploy()(lr)
    for key, out in full.items():
        bic = upsample_bicubic(lr, out.shape[-1])
        assert (out - bic).abs().mean() > 0.05  # there is a correction to scale
        torch.testing.assert_close(scaled[key], bic + d * (out - bic), atol=2e-6, rtol=0)
    torch.testing.assert_close(deploy, scaled["hr"], atol=0, rtol=0)


def test_the_network_given_is_left_as_it_was_and_one_is_the_identity():
    net = _drawing()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with_detail(net, 0.5)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    same = with_detail(net, 1.0)
    assert same is not net and all(torch.equal(before[k], v) for k, v in same.state_dict().items())


def test_refused_without_a_correction_to_scale_and_for_bad_factors():
    from facesr.models import SRCNN

    with pytest.raises(ValueError, match="only the cascade with its bicubic skip.*SRCNN"):
        with_detail(SRCNN(PRESETS["tiny"].srcnn), 0.7)
    no_skip = SRNet(type(PRESETS["tiny"].sr)(**{**PRESETS["tiny"].sr.__dict__, "image_skip": False}))
    with pytest.raises(ValueError, match="image_skip"):
        with_detail(no_skip, 0.7)
    for bad in (0, -0.5, float("nan"), float("inf"), "x"):
        with pytest.raises(ValueError, match="detail"):
            check_detail(bad)


def test_a_scaled_network_saves_and_loads_as_any_other(tmp_path):
    path = tmp_path / "srnet.safetensors"
    save_srnet(path, with_detail(_drawing(), 0.6), extra={"detail": 0.6})
    assert read_meta(path)["detail"] == 0.6
    lr = torch.rand(1, 3, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(load_srnet(path)(lr)["hr"], with_detail(_drawing(), 0.6)(lr)["hr"])


def test_eval_detail_scores_each_strength_from_the_trained_one(tmp_path, capsys):
    """`facesr eval quality RUN --detail 1,0.5`: the model twice on the same faces, NAME@detail1 scoring as the
    network without --detail, and strengths absolute: a file shipped at 0.5 scored at --detail 1 is the network
    as trained."""
    from launch.cli import main

    def quality(run, out, *opts):
        assert main(["eval", "quality", str(run), "--data", str(LFW), "--limit", "6", "--batch-size", "6",
                     "--precision", "fp32", "--device", "cpu", "--out", str(tmp_path / out), *opts]) == 0
        return json.loads((tmp_path / out / "quality.json").read_text())

    trained, shipped = tmp_path / "runs" / "trained", tmp_path / "runs" / "shipped"
    save_srnet(trained / "srnet.safetensors", _drawing())
    save_srnet(shipped / "srnet.safetensors", with_detail(_drawing(), 0.5), extra={"detail": 0.5})
    plain = quality(trained, "plain")["results"]["trained"]["x8"]["psnr"]
    both = quality(trained, "both", "--detail", "1,0.5")
    assert set(both["models"]) == {"trained@detail1", "trained@detail0.5"}
    assert both["results"]["trained@detail1"]["x8"]["psnr"] == pytest.approx(plain, abs=1e-6)
    assert both["results"]["trained@detail0.5"]["x8"]["psnr"] != pytest.approx(plain, abs=1e-3)
    undone = quality(shipped, "undone", "--detail", "1")["results"]["shipped@detail1"]["x8"]["psnr"]
    assert undone == pytest.approx(plain, abs=1e-4)
    with pytest.raises(SystemExit):
        main(["eval", "quality", str(trained), "--detail", "0", "--out", str(tmp_path / "bad")])
    assert "--detail" in capsys.readouterr().err


def test_sr_loads_the_strength_shipped_or_asked_and_refuses_it_for_an_export(tmp_path):
    """`facesr sr`'s loader (``load_upscaler``, ``Upscaler.load``): a run shipped at 0.5 gives its 0.5 network by
    default and the trained one at ``detail=1``; an export's graph is fixed, so asking it for a strength is an
    error naming the file."""
    from facesr.infer import load_upscaler
    from facesr.upscaler import Upscaler

    trained = _drawing()
    run = tmp_path / "runs" / "shipped"
    save_srnet(run / "srnet.safetensors", with_detail(trained, 0.5), extra={"detail": 0.5})
    lr = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = {d: with_detail(trained, d)(lr)["hr"] for d in (0.5, 1.0, 0.8)}
        torch.testing.assert_close(load_upscaler(run)(lr), want[0.5], atol=1e-5, rtol=0)
        torch.testing.assert_close(load_upscaler(run, detail=1)(lr), want[1.0], atol=1e-5, rtol=0)
        torch.testing.assert_close(Upscaler.load(run, detail=0.8).model(lr), want[0.8], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"detail: .* got -1$"):
        load_upscaler(run, detail=-1)
    ts = tmp_path / "shipped.pt"
    ts.write_bytes(b"TorchScript")  # refused before it is read
    with pytest.raises(ValueError, match=r"shipped\.pt: an export's detail strength is fixed"):
        load_upscaler(ts, detail=1)


# ---------------------------------------------------------------- a strength per face (the detail gate)


def _gated(k: float = 0.7, seed: int = 0):
    """A drawing cascade with a gate whose strengths differ from face to face on ``_faces()``."""
    from facesr.detail import with_gate
    from facesr.models import DetailGate

    torch.manual_seed(seed)
    gate = DetailGate()
    with torch.no_grad():  # its raw predictions on _faces() stretched over [0.2, 1.4]
        r = gate(_faces())
        s = 1.2 / (r.max() - r.min())
        last = gate.body[-1]
        last.weight.mul_(s)
        last.bias.copy_(s * (last.bias - r.min()) + 0.2)
    return with_gate(_drawing(seed), gate, k), gate


def _faces(n: int = 6, seed: int = 3) -> torch.Tensor:
    """Random inputs from dim to bright, which a random gate tells apart."""
    return torch.rand(n, 3, 24, 24, generator=torch.Generator().manual_seed(seed)) * torch.linspace(0.2, 1, n).view(
        -1, 1, 1, 1)


def test_each_face_gets_its_own_clamped_strength_in_every_output_and_the_deploy_net():
    """Output = bicubic + clamp(k · gate(lr), 0, 1) · (the full network's output - bicubic), per face, at every
    scale; the deploy network (what exports and `facesr sr` run) the same; the gate sits beside the 53-layer
    path, not on it."""
    from facesr.models import conv_depth

    net, gate = _gated(0.7)
    lr = _faces()
    with torch.no_grad():
        d = (0.7 * gate(lr)).clamp(0, 1).view(-1, 1, 1, 1)
        full, gated, deploy = _drawing()(lr), net(lr), net.deploy()(lr)
    assert len({round(v, 3) for v in d.flatten().tolist()}) >= 4, d.flatten()  # strengths differ face to face
    for key, out in full.items():
        bic = upsample_bicubic(lr, out.shape[-1])
        torch.testing.assert_close(gated[key], bic + d * (out - bic), atol=1e-5, rtol=0)
    torch.testing.assert_close(deploy, gated["hr"], atol=0, rtol=0)
    assert conv_depth(net) == conv_depth(_drawing())


def test_a_gated_network_saves_loads_and_exports_as_any_other_and_fixed_strengths_replace_its_gate(tmp_path):
    """The gate travels in srnet.safetensors (its config says so); `load_upscaler` (facesr sr, Upscaler) runs it;
    TorchScript and ONNX exports keep it; --detail D gives every face D again (the gate removed) and
    --gate-strength K rescales it from the strength it was written with."""
    from facesr.detail import at_detail, at_gate_strength
    from facesr.export import export
    from facesr.infer import load_upscaler

    net, gate = _gated(0.7)
    run = tmp_path / "run"
    save_srnet(run / "srnet.safetensors", net, extra={"gate_strength": 0.7})
    loaded = load_srnet(run / "srnet.safetensors")
    assert loaded.cfg.gate and loaded.gate is not None
    lr = _faces(4, seed=4)
    with torch.no_grad():
        want = net(lr)["hr"]
        torch.testing.assert_close(load_upscaler(run)(lr), want, atol=1e-6, rtol=0)
        torch.testing.assert_close(at_detail(loaded, run, 0.5)(lr)["hr"], with_detail(_drawing(), 0.5)(lr)["hr"],
                                   atol=2e-6, rtol=0)
        assert at_detail(loaded, run, 1.0).gate is None
        rescaled = _gated(0.35)[0](lr)["hr"]
        torch.testing.assert_close(at_gate_strength(loaded, run, 0.35)(lr)["hr"], rescaled, atol=2e-6, rtol=0)
    with pytest.raises(ValueError, match="no detail gate"):
        at_gate_strength(_drawing(), run, 0.5)
    report = export(loaded.deploy(), tmp_path / "export", formats=("torchscript", "onnx"), check=True)
    assert all(r["ok"] for r in report.values()), report


def test_optimal_strength_recovers_the_share_of_the_correction_that_is_right():
    """hr = bicubic + s · c + (something orthogonal to c): the PSNR-optimal strength of c is s, face by face."""
    from facesr.detail import optimal_strength

    g = torch.Generator().manual_seed(5)
    lr = torch.rand(4, 3, 24, 24, generator=g)
    bic = upsample_bicubic(lr, 192)
    c = torch.randn(4, 3, 192, 192, generator=g) * 0.05
    other = torch.randn(4, 3, 192, 192, generator=g) * 0.05
    other -= c * ((other * c).flatten(1).sum(1) / (c * c).flatten(1).sum(1)).view(-1, 1, 1, 1)  # orthogonal to c
    s = torch.tensor([0.0, 0.4, 1.0, 1.7])
    hr = bic + s.view(-1, 1, 1, 1) * c + other
    torch.testing.assert_close(optimal_strength(c, lr, hr), s, atol=1e-4, rtol=0)


def test_eval_scores_a_gated_network_as_shipped_at_fixed_strengths_and_at_other_gate_strengths(tmp_path):
    """`facesr eval quality RUN --detail 1 --gate-strength 0.35`: the gated file's fixed-strength variant scores
    as the network without its gate, and the rescaled gate as a gate written at 0.35; a network without a gate
    asked for a gate strength is refused naming the option."""
    from launch.cli import main

    def quality(run, out, *opts):
        assert main(["eval", "quality", str(run), "--data", str(LFW), "--limit", "6", "--batch-size", "6",
                     "--precision", "fp32", "--device", "cpu", "--out", str(tmp_path / out), *opts]) == 0
        return json.loads((tmp_path / out / "quality.json").read_text())["results"]

    runs = tmp_path / "runs"
    save_srnet(runs / "gated" / "srnet.safetensors", _gated(0.7)[0], extra={"gate_strength": 0.7})
    save_srnet(runs / "low" / "srnet.safetensors", _gated(0.35)[0], extra={"gate_strength": 0.35})
    save_srnet(runs / "plain" / "srnet.safetensors", _drawing())
    got = quality(runs / "gated", "variants", "--detail", "1", "--gate-strength", "0.35")
    assert set(got) - {"bicubic", "nearest"} == {"gated@detail1", "gated@gate0.35"}
    plain, low = quality(runs / "plain", "plain")["plain"], quality(runs / "low", "low")["low"]
    assert got["gated@detail1"]["x8"]["psnr"] == pytest.approx(plain["x8"]["psnr"], abs=1e-4)
    assert got["gated@gate0.35"]["x8"]["psnr"] == pytest.approx(low["x8"]["psnr"], abs=1e-4)
    assert low["x8"]["psnr"] != pytest.approx(plain["x8"]["psnr"], abs=1e-3)
    with pytest.raises(SystemExit, match="plain: --gate-strength: .*has no detail gate"):
        main(["eval", "quality", str(runs / "plain"), "--gate-strength", "0.5", "--data", str(LFW), "--limit", "2",
              "--out", str(tmp_path / "bad")])
