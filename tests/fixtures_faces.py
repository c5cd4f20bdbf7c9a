"""Face folders for the shards tests, built in temporary folders from real LFW faces.

``make_src`` links a few hundred real faces (identities with 2-8 images, so
the class label set is not empty) and adds one file of every bad-input kind,
made from a real face. ``prepared()`` runs one real prep (Ray, local cluster
of 2 CPUs) over it and is cached for the session: the prep tests and the
streaming tests read the same shards.
"""

from __future__ import annotations

import atexit
import functools
import io
import os
import shutil
import tempfile
from pathlib import Path

from PIL import Image

from tests.conftest import LFW

N_FACES = 200  # real faces; enough for 5 train shards of 32 and non-empty val/test
SHARD_SIZE = 32
PREP_ARGS = ["--shard-size", str(SHARD_SIZE), "--val", "0.15", "--test", "0.15", "--seed", "3", "--no-progress"]

# path relative to SRC -> rejects.tsv kind. "unreadable" cannot come from chmod 000 here: the tests run as
# root, which reads any file; a dangling symlink really fails to open, and a folder named x.jpg is "not-a-file".
BAD = {
    "Bad_Person/truncated.jpg": "corrupt",
    "Bad_Person/zero.jpg": "zero-byte",
    "Bad_Person/text.jpg": "not-an-image",
    "Bad_Person/grey.jpg": "greyscale",
    "Bad_Person/cmyk.jpg": "cmyk",
    "Bad_Person/rgba.png": "alpha",
    "Bad_Person/palette.png": "palette",
    "Bad_Person/small.jpg": "too-small",
    "Bad_Person/folder.jpg": "not-a-file",
    "Bad_Person/dangling.jpg": "unreadable",
    "Bad_Person/.DS_Store": "hidden",
    "Empty_Person": "empty-identity",
    "README.txt": "stray-file",
    "stray.jpg": "stray-file",
}


def real_faces(n: int = N_FACES) -> list[Path]:
    """The first identities (by name) with 2-8 images, until ``n`` images."""
    out = []
    for ident in sorted(os.listdir(LFW)):
        files = sorted((LFW / ident).iterdir())
        if 2 <= len(files) <= 8:
            out += files
        if len(out) >= n:
            return out[:n]
    return out


def add_bad_inputs(src: Path, face: Path) -> dict[str, str]:
    """Write every bad-input kind into ``src`` (from the real JPEG ``face``); returns path -> expected kind."""
    bad = src / "Bad_Person"
    bad.mkdir()
    data = face.read_bytes()
    img = Image.open(face).convert("RGB")
    (bad / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (bad / "zero.jpg").write_bytes(b"")
    (bad / "text.jpg").write_text("this is not a JPEG\n")
    img.convert("L").save(bad / "grey.jpg")
    img.convert("CMYK").save(bad / "cmyk.jpg")
    img.convert("RGBA").save(bad / "rgba.png")
    img.convert("P").save(bad / "palette.png")
    img.resize((100, 100)).save(bad / "small.jpg")
    (bad / "folder.jpg").mkdir()
    (bad / "dangling.jpg").symlink_to(src / "no-such-file.jpg")
    (bad / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    shutil.copy(face, bad / "good.jpg")  # one usable image: the identity itself is fine
    (src / "Empty_Person").mkdir()
    (src / "README.txt").write_text("stray\n")
    shutil.copy(face, src / "stray.jpg")
    expected = dict(BAD)
    if os.geteuid() != 0:  # only a non-root user is really refused by mode 000
        locked = bad / "locked.jpg"
        shutil.copy(face, locked)
        locked.chmod(0)
        expected["Bad_Person/locked.jpg"] = "unreadable"
    return expected


def make_src(root: Path, n: int = N_FACES, bad: bool = True) -> dict[str, str]:
    """A CASIA-layout folder at ``root``: real faces linked (never copied into the repo) plus bad inputs."""
    root.mkdir(parents=True)
    faces = real_faces(n)
    for f in faces:
        (root / f.parent.name).mkdir(exist_ok=True)
        (root / f.parent.name / f.name).symlink_to(f)
    return add_bad_inputs(root, faces[0]) if bad else {}


@functools.lru_cache(maxsize=None)
def prepared() -> tuple[Path, Path, dict[str, str]]:
    """(SRC, OUT, expected rejects) of one real Ray prep, shared by every test of the session."""
    from launch.cli import main

    tmp = Path(tempfile.mkdtemp(prefix="facesr-shards-"))
    atexit.register(shutil.rmtree, tmp, True)
    src, out = tmp / "src", tmp / "out"
    expected = make_src(src)
    rc = main(["prep", str(src), str(out), "--address", "local", "--cpus", "2", *PREP_ARGS])
    assert rc == 0
    return src, out, expected


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
