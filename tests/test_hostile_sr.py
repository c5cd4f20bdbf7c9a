"""`facesr sr` under hostile inputs (issue 28's sr items), as a table: each case sets up IN and OUT, runs the real
command in both modes (photos: the default; crops: --faces-only) and checks what it printed and wrote.

Inputs are 24x24 faces (in photo mode a 24x24 input is taken as an aligned face: no detector needed), so every
case runs the whole command in well under a second."""

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from launch.cli import main

MODES = {"photos": [], "faces-only": ["--faces-only"]}


def face(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(path)
    return path


def sr(model, src, out, mode, capsys, *extra) -> tuple[int, str, str]:
    rc = main(["sr", str(model), str(src), str(out), "--device", "cpu", *MODES[mode], *extra])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def pngs(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png")) if folder.exists() else []


def out_is_in(tmp, model, mode, capsys):
    """OUT = IN: refused in one line before anything is written; the inputs stay as they were."""
    src = tmp / "in"
    before = face(src / "a.png").read_bytes()
    rc, out, err = sr(model, src, src, mode, capsys)
    assert rc == 2 and "OUT is IN" in err and len(err.strip().splitlines()) == 1, err
    assert (src / "a.png").read_bytes() == before and sorted(os.listdir(src)) == ["a.png"]


def out_inside_in(tmp, model, mode, capsys):
    """OUT inside IN (whose outputs a later run would read back as inputs): refused, OUT not created."""
    src = tmp / "in"
    face(src / "a.png")
    rc, out, err = sr(model, src, src / "results", mode, capsys)
    assert rc == 2 and "inside IN" in err and not (src / "results").exists(), err


def one_file_onto_itself(tmp, model, mode, capsys):
    """IN one image, OUT the same path: refused; the image is untouched."""
    src = face(tmp / "a.png")
    before = src.read_bytes()
    rc, out, err = sr(model, src, src, mode, capsys)
    assert rc == 2 and "overwrite an input" in err and src.read_bytes() == before, err


def colliding_names(tmp, model, mode, capsys):
    """a.jpg and a.png in one folder get distinct outputs (a.jpg.png, a.png.png) and the count says 2."""
    src = tmp / "in"
    face(src / "a.png", 1)
    Image.open(face(tmp / "x.png", 2)).save(src / "a.jpg", quality=95)
    rc, out, err = sr(model, src, tmp / "out", mode, capsys)
    assert rc == 0 and pngs(tmp / "out") == ["a.jpg.png", "a.png.png"], (pngs(tmp / "out"), err)
    a, b = (np.asarray(Image.open(tmp / "out" / n)) for n in ("a.jpg.png", "a.png.png"))
    assert not np.array_equal(a, b)
    assert ("wrote 2 PNGs" if mode == "faces-only" else "2 faces from 2 photos") in out, out


def link_planted_at_an_output(tmp, model, mode, capsys):
    """OUT/a.png planted as a link to a file outside OUT: the link is replaced by the PNG, the target untouched."""
    src, dst = tmp / "in", tmp / "out"
    face(src / "a.png")
    dst.mkdir()
    (tmp / "precious.txt").write_text("precious")
    (dst / "a.png").symlink_to(tmp / "precious.txt")
    rc, out, err = sr(model, src, dst, mode, capsys)
    assert rc == 0 and (tmp / "precious.txt").read_text() == "precious", err
    assert not (dst / "a.png").is_symlink() and Image.open(dst / "a.png").size == (192, 192)


def link_planted_as_a_folder(tmp, model, mode, capsys):
    """OUT/sub planted as a link to a folder outside OUT: refused in one line before work; nothing lands there."""
    src, dst = tmp / "in", tmp / "out"
    face(src / "a.png")
    face(src / "sub" / "b.png")
    (tmp / "elsewhere").mkdir()
    dst.mkdir()
    (dst / "sub").symlink_to(tmp / "elsewhere", target_is_directory=True)
    rc, out, err = sr(model, src, dst, mode, capsys)
    assert rc == 2 and "link inside OUT" in err and os.listdir(tmp / "elsewhere") == [], err


def not_regular_files(tmp, model, mode, capsys):
    """A FIFO, a link to a folder and a link to a device in IN each get a `skipped` line with the reason (none
    blocks or vanishes); the real face is written."""
    src = tmp / "in"
    face(src / "a.png")
    os.mkfifo(src / "pipe.png")
    (tmp / "folder").mkdir()
    (src / "folder.png").symlink_to(tmp / "folder", target_is_directory=True)
    (src / "null.png").symlink_to("/dev/null")
    rc, out, err = sr(model, src, tmp / "out", mode, capsys)
    assert rc == 0 and pngs(tmp / "out") == ["a.png"], err
    for name, why in [("pipe.png", "not a regular file"), ("folder.png", "a folder"), ("null.png", "not a regular")]:
        assert any(l.startswith("skipped ") and name in l and why in l for l in err.splitlines()), (name, err)


def control_characters_in_names(tmp, model, mode, capsys):
    """A name holding a newline and an escape sequence is printed escaped: it cannot forge a line of its own."""
    src = tmp / "in"
    face(src / "a\nwrote 999 PNGs\x1b[2J.png")
    (src / "b\rfake.png").write_text("not an image")
    rc, out, err = sr(model, src, tmp / "out", mode, capsys)
    lines = (out + err).splitlines()
    assert rc == 0 and not any(l.startswith("wrote 999") or "fake" == l[:4] for l in lines), lines
    assert "\x1b" not in out + err and "\r" not in out + err
    assert "b\\rfake.png" in err, err


CASES = [out_is_in, out_inside_in, one_file_onto_itself, colliding_names, link_planted_at_an_output,
         link_planted_as_a_folder, not_regular_files, control_characters_in_names]


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_hostile_sr(case, mode, tmp_path, tiny_run, capsys):
    """Each case's docstring says what must hold; it holds in both modes."""
    case(tmp_path, tiny_run, mode, capsys)


class Quarter(torch.nn.Module):
    def forward(self, lr):
        return torch.nn.functional.interpolate(lr, scale_factor=4.0)  # (B, 3, 96, 96): not a facesr model


@pytest.mark.parametrize("mode", list(MODES))
def test_torchscript_of_the_wrong_shape_is_refused(mode, tmp_path, capsys):
    """A TorchScript file whose output is (B, 3, 96, 96) is refused in one line naming it and the shape, before
    any input is read; nothing is written."""
    path = tmp_path / "model.pt"
    torch.jit.trace(Quarter(), torch.zeros(1, 3, 24, 24)).save(str(path))
    face(tmp_path / "in" / "a.png")
    rc, out, err = sr(path, tmp_path / "in", tmp_path / "out", mode, capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "model.pt" in err and re.search(r"\(2, 3, 96, 96\)", err), err
    assert not (tmp_path / "out").exists()
