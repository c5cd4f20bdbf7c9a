"""`facesr sr`: 24² faces in, 192² PNGs out; other sizes resized with a warning or --fit; bad files skipped."""

import numpy as np
import pytest
import torch
from PIL import Image

from facesr.degrade import quadruplet, to_uint8
from facesr.infer import find_srnet, load_cascade, load_upscaler, read_rgb, super_resolve, to_lr
from facesr.models import PRESETS
from facesr.weights import save_priors, save_srnet

from .conftest import LFW, tiny_net


def faces() -> list:
    """Three real LFW photos (read when a test runs: without ../shared the test is skipped, not the module)."""
    return sorted((LFW / "Colin_Powell").iterdir())[:3]


@pytest.fixture
def inputs(tmp_path):
    """A folder with two 24² faces, a 250² LFW photo, a text file and a broken JPEG."""
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    photos = faces()
    for i, f in enumerate(photos[:2]):
        lr = quadruplet(read_rgb(f))["lr"]
        Image.fromarray(to_uint8(lr).permute(1, 2, 0).numpy()).save(d / ("sub" if i else ".") / f"face{i}.png")
    (d / "photo.jpg").symlink_to(photos[2])
    (d / "readme.txt").write_text("not an image")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return d


def test_folder(tiny_run, inputs, tmp_path):
    """24² in directly, the 250² photo resized with a warning, non-images skipped with a message, PNG 192² out."""
    msgs = []
    out = tmp_path / "out"
    rep = super_resolve(load_upscaler(tiny_run), inputs, out, batch_size=2, log=msgs.append)
    assert sorted(p.relative_to(out).as_posix() for p in rep.written) == ["face0.png", "photo.png", "sub/face1.png"]
    assert sorted(p.name for p, _ in rep.skipped) == ["broken.jpg", "readme.txt"]
    assert [p.name for p, _ in rep.resized] == ["photo.jpg"] and "250x250" in rep.resized[0][1]
    assert any("skipped" in m and "readme.txt" in m for m in msgs)
    assert any(m.startswith("warning") and "photo.jpg" in m for m in msgs)
    for p in rep.written:
        im = Image.open(p)
        assert im.format == "PNG" and im.size == (192, 192) and im.mode == "RGB"


def test_fit_degrades_like_training():
    """--fit turns an LFW photo into exactly the lr the evaluation uses, without a warning."""
    img = read_rgb(faces()[0])
    lr, note = to_lr(img, fit=True)
    assert note is None and torch.equal(lr, quadruplet(img)["lr"])
    lr, note = to_lr(img[:, :100, :80], fit=True)  # too small to crop 192: resized, with a note
    assert lr.shape == (3, 24, 24) and "80x100" in note and "centre square" in note


def test_batching_does_not_change_outputs(tiny_run, inputs, tmp_path):
    """Batch size 1 and batch size 16 write the same pixels (BatchNorm uses stored statistics)."""
    a = super_resolve(load_upscaler(tiny_run), inputs, tmp_path / "a", batch_size=1, log=lambda m: None)
    b = super_resolve(load_upscaler(tiny_run), inputs, tmp_path / "b", batch_size=16, log=lambda m: None)
    for pa, pb in zip(a.written, b.written):
        assert np.array_equal(np.asarray(Image.open(pa)), np.asarray(Image.open(pb)))


def test_single_file_to_png_and_model_forms(tiny_run, tmp_path):
    """IN may be one image and OUT a .png; MODEL may be the run folder or its safetensors (same output)."""
    src = tmp_path / "face.png"
    Image.fromarray(to_uint8(quadruplet(read_rgb(faces()[0]))["lr"]).permute(1, 2, 0).numpy()).save(src)
    r1 = super_resolve(load_upscaler(tiny_run), src, tmp_path / "one.png", log=lambda m: None)
    r2 = super_resolve(load_upscaler(tiny_run / "srnet.safetensors"), src, tmp_path / "two", log=lambda m: None)
    assert r1.written == [tmp_path / "one.png"] and r2.written == [tmp_path / "two" / "face.png"]
    assert np.array_equal(np.asarray(Image.open(r1.written[0])), np.asarray(Image.open(r2.written[0])))


def test_run_folder_lookup(tmp_path):
    """A run folder without srnet.safetensors is searched for an SR-net file; priors files are not mistaken for one."""
    d = tmp_path / "run"
    save_priors(d / "priors.safetensors", {"hr": torch.nn.Linear(1, 1)}, PRESETS["tiny"].prior, ["a"])
    with pytest.raises(FileNotFoundError, match="srnet"):
        find_srnet(d)
    save_srnet(d / "stage2" / "final.safetensors", tiny_net())
    assert find_srnet(d).name == "final.safetensors"
    assert load_cascade(d).cfg == PRESETS["tiny"].sr


def test_bad_model_path(tmp_path):
    """Unknown model files fail with a message naming the accepted forms."""
    (tmp_path / "m.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="onnx"):
        load_upscaler(tmp_path / "m.bin")
    with pytest.raises(FileNotFoundError):
        load_upscaler(tmp_path / "missing.safetensors")


def test_cli_sr(tiny_run, inputs, tmp_path, capsys):
    """`facesr sr MODEL IN OUT` writes the PNGs and reports what it resized and skipped."""
    from launch.cli import main

    assert main(["sr", str(tiny_run), str(inputs), str(tmp_path / "o"), "--faces-only", "--device", "cpu"]) == 0
    cap = capsys.readouterr()
    assert "wrote 3 PNGs" in cap.out and "1 resized, 2 skipped" in cap.out
    assert "broken.jpg" in cap.err


def test_compare_panels(tiny_run, inputs, tmp_path):
    """--compare: per input one row of 192² cells (input, bicubic, facesr, and the source photo where the input
    was larger than 24²); its facesr cell is the plain output, pixel for pixel."""
    from launch.cli import main

    plain, panels = tmp_path / "plain", tmp_path / "panels"
    assert main(["sr", str(tiny_run), str(inputs), str(plain), "--faces-only", "--device", "cpu"]) == 0
    assert main(["sr", str(tiny_run), str(inputs), str(panels), "--faces-only", "--device", "cpu", "--compare"]) == 0
    cell, gap, header = 192, 2, 22
    for name, cols in [("face0.png", 3), ("sub/face1.png", 3), ("photo.png", 4)]:
        panel = np.asarray(Image.open(panels / name).convert("RGB"))
        assert panel.shape == (header + cell, cols * (cell + gap) - gap, 3), name
        x0 = 2 * (cell + gap)
        assert np.array_equal(panel[header:, x0 : x0 + cell], np.asarray(Image.open(plain / name))), name
    photo = np.asarray(Image.open(panels / "photo.png").convert("RGB"))[header:, 3 * (cell + gap):].astype(float)
    src = np.asarray(Image.open(faces()[2]).convert("RGB").resize((cell, cell), Image.BICUBIC)).astype(float)
    assert np.abs(photo - src).mean() < 3  # the source photo, resized (torch's antialiased bicubic vs PIL's)


def test_flip_ensemble_is_mirror_equivariant_and_the_mean_of_both_passes():
    """--tta flip: the mean of the network on the face and, mirrored back, on its mirror; so a mirrored face
    gives exactly the mirrored output (a plain network does not), for the cascade's dict and the deploy tensor."""
    from facesr.infer import FlipEnsemble, with_tta

    net = tiny_net(3)
    lr = torch.rand(3, 3, 24, 24, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        tta = FlipEnsemble(net)
        out, plain, mirrored = tta(lr), net(lr), net(lr.flip(-1))
        assert set(out) == set(plain) == {"x2", "x4", "hr"}
        for k in out:
            assert torch.allclose(out[k], (plain[k] + mirrored[k].flip(-1)) / 2, atol=1e-6), k
            assert torch.allclose(tta(lr.flip(-1))[k], out[k].flip(-1), atol=1e-6), k
        assert not torch.allclose(mirrored["hr"], plain["hr"].flip(-1), atol=1e-4)  # the test could fail
        assert torch.allclose(tta.deploy()(lr), out["hr"], atol=1e-6)
    assert with_tta(net, "none") is net and isinstance(with_tta(net, "flip"), FlipEnsemble)
    with pytest.raises(ValueError, match="tta"):
        with_tta(net, "rot90")


def test_cli_sr_tta_flip_writes_the_flip_averaged_faces(tiny_run, inputs, tmp_path):
    """`facesr sr --tta flip`: each written face is the flip-averaged network's output, not the plain one's."""
    from facesr.infer import FlipEnsemble
    from launch.cli import main

    for tta in ("none", "flip"):
        assert main(["sr", str(tiny_run), str(inputs), str(tmp_path / tta), "--faces-only", "--device", "cpu",
                     "--tta", tta]) == 0
    lr = to_lr(read_rgb(inputs / "face0.png"))[0].unsqueeze(0)
    with torch.inference_mode():
        want = to_uint8(FlipEnsemble(load_upscaler(tiny_run))(lr)[0]).permute(1, 2, 0).numpy()
    got, plain = (np.asarray(Image.open(tmp_path / t / "face0.png")) for t in ("flip", "none"))
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    assert np.abs(got.astype(int) - plain.astype(int)).max() > 1  # the option changes what is written
