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
