"""Deploy-network exports: TorchScript and ONNX agree with PyTorch, with a dynamic batch, and serve `facesr sr`."""

import numpy as np
import pytest
import torch
from PIL import Image

from facesr.export import TOLERANCE, example_input, export, max_abs_diff
from facesr.infer import OnnxUpscaler, load_upscaler, super_resolve
from facesr.models import PRESETS, SRNet
from facesr.weights import save_srnet


def trained_looking_net(seed: int = 0) -> SRNet:
    """A tiny cascade with non-trivial branches and BatchNorm statistics (what a trained net has)."""
    torch.manual_seed(seed)
    net = SRNet(PRESETS["tiny"].sr)
    with torch.no_grad():
        for b in net.branches:
            b.body[-1].weight.normal_(0, 1e-2)
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    return net.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    net = trained_looking_net()
    out = tmp_path_factory.mktemp("export")
    return net, export(net.deploy(), out), out


def test_parity_within_tolerance(exported):
    """Both exports match the PyTorch deploy network within 1e-4 on a batch size other than the traced one."""
    _, result, _ = exported
    for fmt in ("torchscript", "onnx"):
        assert result[fmt]["ok"] and result[fmt]["max_abs_diff"] <= TOLERANCE


def test_onnx_reference_evaluator_parity(exported):
    """onnx's reference evaluator (no onnxruntime needed) gives the same result as PyTorch."""
    net, result, _ = exported
    ref = OnnxUpscaler(result["onnx"]["path"], backend="reference")
    assert max_abs_diff(net.deploy(), ref, batch=1) <= TOLERANCE


def test_deploy_has_no_branches(exported):
    """The exported graph is the deploy path: output 192² only, and the x2/x4 branch weights are absent."""
    import onnx

    net, result, _ = exported
    model = onnx.load(result["onnx"]["path"])
    assert [o.name for o in model.graph.output] == ["hr"]
    n_onnx = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    n_deploy = sum(p.numel() for p in net.deploy().parameters())
    n_full = sum(p.numel() for p in net.parameters())
    resize = 2 * 24 * 192  # the skip's bicubic as two constant (192, 24) matrices (facesr/resample.py)
    assert n_onnx < n_full + resize and abs(n_onnx - resize - n_deploy) < 0.05 * n_deploy  # BN may be folded
    ts = load_upscaler(result["torchscript"]["path"])
    assert ts(example_input(4)).shape == (4, 3, 192, 192)


def test_exports_serve_facesr_sr(exported, tmp_path):
    """`facesr sr` with the .pt or .onnx file writes the same PNG (up to one 8-bit step) as with the weights."""
    net, result, _ = exported
    save_srnet(tmp_path / "srnet.safetensors", net)
    src = tmp_path / "face.png"
    Image.fromarray((example_input(1, 7)[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(src)
    outs = {}
    for name, model in (("st", tmp_path / "srnet.safetensors"), ("pt", result["torchscript"]["path"]),
                        ("onnx", result["onnx"]["path"])):
        rep = super_resolve(load_upscaler(model), src, tmp_path / f"{name}.png", log=lambda m: None)
        outs[name] = np.asarray(Image.open(rep.written[0])).astype(int)
    assert np.abs(outs["pt"] - outs["st"]).max() <= 1 and np.abs(outs["onnx"] - outs["st"]).max() <= 1


def test_cli_export_torchscript(tmp_path, capsys):
    """`facesr export RUN OUT --format torchscript` writes the file and prints the parity."""
    from launch.cli import main

    save_srnet(tmp_path / "run" / "srnet.safetensors", trained_looking_net(1))
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out"), "--format", "torchscript"]) == 0
    assert (tmp_path / "out" / "srnet_deploy.pt").is_file()
    assert "max |diff|" in capsys.readouterr().out
