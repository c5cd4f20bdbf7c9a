"""One image reader (facesr/imageio.py) for every user file: hostile and unusual files get the documented result
through the reader itself, `facesr sr` and `facesr prep`; no real faces needed (synthetic images only).

| file                                  | reader / `facesr sr`                  | `facesr prep`             |
|---------------------------------------|---------------------------------------|---------------------------|
| EPS/PostScript named face.png         | refused: not-an-image; no Ghostscript | rejected: not-an-image    |
| PNG declaring 30000x30000 (a bomb)    | refused: too-large, before decoding   | rejected: too-large       |
| JPEG cut in half                      | refused: corrupt (truncated)          | rejected: corrupt         |
| 16-bit greyscale PNG                  | grey RGB, high byte (not clipped)     | rejected: greyscale       |
| 16-bit RGB PNG                        | RGB, high byte                        | accepted                  |
| CMYK JPEG                             | RGB (PIL's formula)                   | rejected: cmyk            |
| JPEG stored sideways, EXIF 6          | upright                               | accepted, upright         |
"""

from __future__ import annotations

import csv
import io
import json
import struct
import tarfile
import warnings
import zlib
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import EpsImagePlugin, Image

from facesr.imageio import FORMATS, MAX_PIXELS, ImageReadError, open_image, read_rgb
from launch.cli import main

H, W = 240, 200  # upright size of the synthetic photos: taller than wide, both sides >= the 192 crop
QUADRANTS = {"tl": (220, 40, 40), "tr": (40, 200, 40), "bl": (40, 40, 220), "br": (230, 220, 40)}
EPS = ("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 200 200\n%%EndComments\n"
       "0 0 moveto 200 200 lineto stroke\nshowpage\n%%EOF\n")


def quadrant_photo() -> np.ndarray:
    """uint8 (H, W, 3): four flat colours, so orientation and colour survive JPEG and resizing."""
    img = np.zeros((H, W, 3), np.uint8)
    img[: H // 2, : W // 2], img[: H // 2, W // 2 :] = QUADRANTS["tl"], QUADRANTS["tr"]
    img[H // 2 :, : W // 2], img[H // 2 :, W // 2 :] = QUADRANTS["bl"], QUADRANTS["br"]
    return img


def quadrant_means(img: torch.Tensor) -> dict[str, np.ndarray]:
    """uint8 (3, h, w) -> mean colour of the centre of each quadrant (edges left out: JPEG and resizing blur them)."""
    x = img.permute(1, 2, 0).numpy().astype(float)
    h, w = x.shape[:2]
    qh, qw = h // 4, w // 4
    return {"tl": x[qh // 2 : qh + qh // 2, qw // 2 : qw + qw // 2].mean((0, 1)),
            "tr": x[qh // 2 : qh + qh // 2, -qw - qw // 2 : -qw // 2].mean((0, 1)),
            "bl": x[-qh - qh // 2 : -qh // 2, qw // 2 : qw + qw // 2].mean((0, 1)),
            "br": x[-qh - qh // 2 : -qh // 2, -qw - qw // 2 : -qw // 2].mean((0, 1))}


def assert_upright(img: torch.Tensor, tol: float) -> None:
    for q, mean in quadrant_means(img).items():
        assert np.abs(mean - QUADRANTS[q]).max() < tol, (q, mean, QUADRANTS[q])


def png_file(width: int, height: int, bit_depth: int, colour_type: int, raw: bytes) -> bytes:
    """A PNG written chunk by chunk: for what PIL will not write (16-bit RGB) or should not (a bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def grey16() -> np.ndarray:
    """uint16 (H, W): every 16-bit level from 0 to 65535 along the rows."""
    return np.linspace(0, 65535, H * W).round().astype(np.uint16).reshape(H, W)


def rgb16() -> np.ndarray:
    """uint16 (H, W, 3): the quadrant photo at 16 bit, each level v as v * 256 plus a low byte that must be dropped."""
    v = quadrant_photo().astype(np.uint16)
    return v * 256 + (255 - v)


def make_eps(p: Path) -> None:
    p.write_text(EPS)


def make_bomb(p: Path, side: int = 30_000) -> None:
    p.write_bytes(png_file(side, side, 8, 2, b"\0" * 16))  # a few hundred bytes declaring side x side RGB


def make_truncated(p: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (H, W, 3), np.uint8)).save(buf, "JPEG")
    p.write_bytes(buf.getvalue()[: buf.tell() // 2])


def make_grey16(p: Path) -> None:
    Image.fromarray(grey16()).save(p)  # mode I;16


def make_rgb16(p: Path) -> None:
    raw = b"".join(b"\0" + row.astype(">u2").tobytes() for row in rgb16())  # filter 0 per row, big-endian
    p.write_bytes(png_file(W, H, 16, 2, raw))


def make_cmyk(p: Path) -> None:
    Image.fromarray(quadrant_photo()).convert("CMYK").save(p, quality=95)


def make_rotated(p: Path) -> None:
    """Stored 90° counter-clockwise with EXIF orientation 6 ("rotate 90° clockwise to view"), as phones do."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(quadrant_photo()).transpose(Image.Transpose.ROTATE_90).save(p, quality=95, exif=exif.tobytes())


def check_grey16(img: torch.Tensor) -> None:
    expected = torch.from_numpy((grey16() >> 8).astype(np.uint8))
    assert all(torch.equal(c, expected) for c in img)  # exact high byte in all three channels
    assert img.max() == 255 and img.min() == 0 and len(img[0].unique()) == 256  # the full range, not clipped


def check_rgb16(img: torch.Tensor) -> None:
    assert torch.equal(img, torch.from_numpy(quadrant_photo()).permute(2, 0, 1))


def check_cmyk(img: torch.Tensor) -> None:
    assert_upright(img, tol=12)


def check_rotated(img: torch.Tensor) -> None:
    assert img.shape == (3, H, W)
    assert_upright(img, tol=12)


# name -> (file, maker, reader: refusal kind and phrase or a check of the pixels, prep: rejects.tsv kind or None)
CASES = {
    "eps": ("face.png", make_eps, ("not-an-image", "accepted format"), "not-an-image"),
    "bomb": ("bomb.png", make_bomb, ("too-large", "decompression bomb"), "too-large"),
    "truncated": ("truncated.jpg", make_truncated, ("corrupt", "truncated"), "corrupt"),
    "grey16": ("grey16.png", make_grey16, check_grey16, "greyscale"),
    "rgb16": ("rgb16.png", make_rgb16, check_rgb16, None),
    "cmyk": ("cmyk.jpg", make_cmyk, check_cmyk, "cmyk"),
    "rotated": ("rotated.jpg", make_rotated, check_rotated, None),
}
REFUSED = [n for n, c in CASES.items() if isinstance(c[2], tuple)]
READ = [n for n in CASES if n not in REFUSED]


@pytest.fixture(scope="module")
def fake_gs(tmp_path_factory):
    """PIL's EPS plugin pointed at a stand-in Ghostscript that leaves a file behind when run (yields that file)."""
    d = tmp_path_factory.mktemp("gs")
    proof, gs = d / "ghostscript-ran", d / "gs"
    gs.write_text(f"#!/bin/sh\ntouch '{proof}'\nexit 1\n")
    gs.chmod(0o755)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(EpsImagePlugin, "gs_binary", str(gs))
        yield proof


@pytest.fixture(scope="module")
def src(tmp_path_factory, fake_gs) -> Path:
    """A prep-layout folder (one identity) holding every case."""
    d = tmp_path_factory.mktemp("imageio") / "src"
    (d / "Person_A").mkdir(parents=True)
    for name, maker, _, _ in CASES.values():
        maker(d / "Person_A" / name)
    return d


@pytest.fixture(scope="module")
def sr_run(src, tiny_run, tmp_path_factory):
    """`facesr sr` over the folder: (exit code, stdout, stderr, OUT)."""
    out = tmp_path_factory.mktemp("sr-out")
    cap_out, cap_err = io.StringIO(), io.StringIO()
    with redirect_stdout(cap_out), redirect_stderr(cap_err):
        rc = main(["sr", str(tiny_run), str(src), str(out), "--faces-only", "--device", "cpu"])
    return rc, cap_out.getvalue(), cap_err.getvalue(), out


@pytest.fixture(scope="module")
def prep_run(src, tmp_path_factory):
    """`facesr prep` over the folder (in process, no Ray): (exit code, OUT, rejects by path, sample paths -> hr)."""
    out = tmp_path_factory.mktemp("prep") / "out"
    rc = main(["prep", str(src), str(out), "--no-ray", "--no-progress", "--val", "0", "--test", "0",
               "--shard-size", "4"])
    with open(out / "rejects.tsv", newline="") as f:
        rejects = {r["path"]: r for r in csv.DictReader(f, delimiter="\t")}
    samples = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    key = m.name[: -len(".json")]
                    rec = json.loads(tar.extractfile(m).read())
                    hr = Image.open(io.BytesIO(tar.extractfile(f"{key}.hr.png").read()))
                    samples[rec["path"]] = torch.from_numpy(np.array(hr)).permute(2, 0, 1)
    return rc, out, rejects, samples


@pytest.mark.parametrize("case", REFUSED)
def test_reader_refuses_with_kind_and_reason(src, case, fake_gs):
    """The reader refuses each hostile file with an ImageReadError naming the file, its kind and the reason."""
    name, _, (kind, phrase), _ = CASES[case]
    path = src / "Person_A" / name
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a refusal, not a PIL warning
        with pytest.raises(ImageReadError) as e:
            read_rgb(path)
    assert isinstance(e.value, ValueError) and e.value.kind == kind and phrase in e.value.reason
    assert str(e.value).startswith(f"{path}: ")
    assert not fake_gs.exists(), "Ghostscript ran"


@pytest.mark.parametrize("case", READ)
def test_reader_converts_to_documented_rgb(src, case):
    """16-bit PNGs keep the high byte (not clipped), CMYK becomes RGB, an EXIF-rotated photo comes out upright."""
    name, _, check, _ = CASES[case]
    img = read_rgb(src / "Person_A" / name)
    assert img.dtype == torch.uint8 and img.shape[0] == 3
    check(img)


def test_eps_reaches_ghostscript_without_the_allowlist(src, fake_gs):
    """The EPS case is a real threat: PIL's plain Image.open hands face.png to Ghostscript (the stand-in ran)."""
    try:
        with Image.open(src / "Person_A" / "face.png") as im:
            assert im.format == "EPS"
            with pytest.raises(Exception):  # the stand-in exits 1 after leaving its mark
                im.load()
        assert fake_gs.exists()
    finally:
        fake_gs.unlink(missing_ok=True)  # the other tests check that nothing else ran it


@pytest.mark.parametrize("side", [10_000, 30_000])  # PIL alone: a warning at 10000², an error at 30000²
def test_bomb_refused_whatever_pils_global_limit(tmp_path, monkeypatch, side):
    """A bomb is refused before decoding, with the reader's message, even with PIL's global limit switched off."""
    bomb = tmp_path / "bomb.png"
    make_bomb(bomb, side)
    for pil_limit in (Image.MAX_IMAGE_PIXELS, None, 1000):  # PIL's default, switched off, lowered by someone
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pil_limit)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(ImageReadError, match="decompression bomb") as e:
                read_rgb(bomb)
        assert e.value.kind == "too-large"
        if pil_limit is None:  # the reader's own check, from the header alone
            assert f"{side}x{side} is {side * side:,} pixels, over the limit of {MAX_PIXELS:,}" in e.value.reason


def test_pixel_limit_is_per_call(tmp_path):
    """max_pixels is an argument: a 240x200 photo passes the default and is refused under a limit of 40,000."""
    p = tmp_path / "photo.png"
    Image.fromarray(quadrant_photo()).save(p)
    assert read_rgb(p).shape == (3, H, W)
    with pytest.raises(ImageReadError, match="over the limit of 40,000") as e:
        read_rgb(p, max_pixels=40_000)
    assert e.value.kind == "too-large"


@pytest.mark.parametrize("mode, expected", [
    ("RGBA", (110, 20, 20)),  # (220, 40, 40) at alpha 128: over black
    ("LA", (65, 65, 65)),  # grey 129 at alpha 128
    ("P", (0, 0, 0)),  # palette with its one colour transparent
    ("L", (129, 129, 129)),
    ("1", (255, 255, 255)),
])
def test_modes_with_alpha_palette_grey(tmp_path, mode, expected):
    """Alpha and transparent palette entries are composited over black; greyscale is repeated over RGB."""
    base = Image.new("RGB", (8, 8), (220, 40, 40))
    if mode == "RGBA":
        img = base.convert("RGBA")
        img.putalpha(128)
    elif mode == "LA":
        img = Image.new("LA", (8, 8), (129, 128))
    elif mode == "P":
        img = base.convert("P")
        img.info["transparency"] = img.getpixel((0, 0))
    else:
        img = Image.new(mode, (8, 8), 129 if mode == "L" else 1)
    p = tmp_path / "img.png"
    img.save(p, **({"transparency": img.info["transparency"]} if mode == "P" else {}))
    out = read_rgb(p)
    assert out.shape == (3, 8, 8) and tuple(out[:, 3, 3].tolist()) == expected


def test_allowlist_decides_by_content(tmp_path):
    """A PNG named photo.jpg opens (content, not name); a GIF in the list opens; a TGA (not in FORMATS) does not."""
    p = tmp_path / "photo.jpg"
    Image.fromarray(quadrant_photo()).save(p, format="PNG")
    assert np.array_equal(np.asarray(open_image(p)), quadrant_photo())
    Image.fromarray(quadrant_photo()).save(tmp_path / "a.gif")
    assert "GIF" in FORMATS and read_rgb(tmp_path / "a.gif").shape == (3, H, W)
    Image.fromarray(quadrant_photo()).save(tmp_path / "a.tga")
    with pytest.raises(ImageReadError, match="not an image in an accepted format") as e:
        read_rgb(tmp_path / "a.tga")
    assert e.value.kind == "not-an-image"


@pytest.mark.parametrize("case", REFUSED)
def test_sr_skips_refused_files_with_the_reason(sr_run, src, case, fake_gs):
    """`facesr sr` skips each refused file, printing its path and the reader's reason; nothing is written for it."""
    rc, stdout, stderr, out = sr_run
    name, _, (_, phrase), _ = CASES[case]
    line = next(l for l in stderr.splitlines() if l.startswith(f"skipped {src / 'Person_A' / name}: "))
    assert phrase in line
    assert not (out / "Person_A" / name).with_suffix(".png").exists()
    assert rc == 0 and f"{len(READ)} PNGs" in stdout and f"{len(REFUSED)} skipped" in stdout
    assert not fake_gs.exists(), "Ghostscript ran"


@pytest.mark.parametrize("case", READ)
def test_sr_writes_the_readable_ones(sr_run, case):
    """`facesr sr` super-resolves the 16-bit, CMYK and EXIF-rotated files to 192² PNGs; the rotated one upright."""
    _, _, _, out = sr_run
    name = CASES[case][0]
    png = out / "Person_A" / Path(name).with_suffix(".png")
    img = read_rgb(png)
    assert img.shape == (3, 192, 192)
    if case in ("rotated", "rgb16", "cmyk"):  # the tiny net stays close to bicubic: the quadrants survive
        assert_upright(img, tol=40)


@pytest.mark.parametrize("case", list(CASES))
def test_prep_rejects_or_shards_each_file(prep_run, case, fake_gs):
    """`facesr prep` writes each refused file to rejects.tsv with its kind and a reason; accepted ones are sharded
    (the EXIF-rotated photo upright)."""
    rc, out, rejects, samples = prep_run
    name, _, reader, kind = CASES[case]
    rel = f"Person_A/{name}"
    assert rc == 0
    if kind is None:
        assert rel not in rejects and rel in samples
        assert_upright(samples[rel], tol=16)  # hr: the central 192² crop, quadrants intact
    else:
        assert rejects[rel]["kind"] == kind and rel not in samples
        if isinstance(reader, tuple):  # the reader's reason is kept
            assert reader[1] in rejects[rel]["detail"]
    assert not fake_gs.exists(), "Ghostscript ran"
