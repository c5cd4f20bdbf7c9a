"""Bad input at the command line: refused with a message naming what is wrong, and nothing already done is lost.

Each test runs the real command (`facesr prep`, `facesr train`, `facesr sr`) on real LFW faces in a temporary
folder, with something broken, and checks (1) the exit status and the message and (2) that what existed
before (finished shards, a run folder with its checkpoints and metrics, earlier outputs) is byte-for-byte
unchanged. Refusals that can be made before Ray starts are made there, so these tests need no cluster.

Bad config values and files, broken shard folders and manifests, impossible batch sizes, stage-2 priors of
another class map, and lying weights files: the tables of tests/test_hostile_inputs.py.
Covered elsewhere, not repeated here: every kind of unusable image in prep (corrupt, zero-byte, text, greyscale,
CMYK, alpha, palette, too small, folder, dangling link, hidden, empty identity, stray file) in
tests/test_prep.py::test_every_bad_input_rejected_with_reason; missing/empty SRC and unwritable OUT in
tests/test_prep.py::test_clear_errors_for_missing_or_empty_src_and_unwritable_out; every manifest/shard
mismatch at the reader (missing shard, size, sha256, sample count, unknown split) in
tests/test_shards_stream.py::test_manifest_errors_name_the_file; wrong config keys/types in
tests/test_config.py::test_bad_keys_and_types_name_the_field.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launch.cli import main
from tests.conftest import ROOT
from tests.fixtures_faces import make_src

CPU = "launch/configs/cpu.yaml"
PREP = ["--shard-size", "8", "--val", "0.2", "--test", "0", "--no-progress", "--no-ray"]


def snapshot(root: Path) -> dict[str, str]:
    """path -> sha256 of every file under ``root``: what must survive a refused command unchanged."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("bad") / "faces"
    make_src(src, n=40, bad=False)
    return src


@pytest.fixture(scope="module")
def shards(faces) -> Path:
    out = faces.parent / "shards"
    assert main(["prep", str(faces), str(out), *PREP]) == 0
    return out


@pytest.fixture
def copy_of(tmp_path):
    def make(src: Path) -> Path:
        dst = tmp_path / src.name
        shutil.copytree(src, dst)
        return dst
    return make


# ---------------------------------------------------------------- training inputs


def test_priors_of_an_older_build_are_refused_saying_what_to_do(tmp_path):
    """Priors written before the tiny preset's priors gained BatchNorm (no ``norm``): refused for the tiny preset,
    naming the file, both builds and the remedy (the demo run of an earlier facesr hit this in `make table1`)."""
    import dataclasses

    from facesr.models import build_prior, get_preset
    from facesr.weights import check_priors, save_priors

    old = dataclasses.replace(get_preset("tiny").prior, norm=False)
    path = tmp_path / "old-priors.safetensors"
    save_priors(path, {k: build_prior(old, 3) for k in ("x2", "x4", "hr")}, old, ["a", "b", "c"])
    with pytest.raises(ValueError) as e:
        check_priors(path, preset="tiny")
    assert str(path) in str(e.value) and "'norm': True" in str(e.value) and "train stage 1 again" in str(e.value)
    assert check_priors(path)["num_classes"] == 3  # without a preset to match, the file itself is fine

# ---------------------------------------------------------------- inference inputs


@pytest.fixture(scope="module")
def srnet(tmp_path_factory) -> Path:
    from facesr.models import PRESETS, SRNet
    from facesr.weights import save_srnet

    path = tmp_path_factory.mktemp("model") / "srnet.safetensors"
    save_srnet(path, SRNet(PRESETS["tiny"].sr))
    return path


def test_sr_skips_non_images_and_keeps_earlier_outputs(capsys, tmp_path, srnet):
    """`facesr sr` on a folder of non-images (text, zero bytes, truncated JPEG, HTML named .png, a folder named
    .jpg) among one real face: each bad file is named and skipped, the face is written, and an earlier output
    in OUT is left as it was."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    face = sorted((ROOT.parent / "shared" / "data" / "lfw" / "Colin_Powell").iterdir())[0]
    (src / "face.jpg").symlink_to(face)
    bad = {"notes.txt": b"not an image\n", "zero.png": b"", "half.jpg": face.read_bytes()[:1000],
           "page.png": b"<html>404</html>"}
    for name, data in bad.items():
        (src / name).write_bytes(data)
    (src / "dir.jpg").mkdir()
    out.mkdir()
    (out / "earlier.png").write_bytes(b"an earlier result")
    rc = main(["sr", str(srnet), str(src), str(out), "--fit", "--device", "cpu"])
    cap = capsys.readouterr()
    assert rc == 0 and "wrote 1 PNGs" in cap.out, cap.out + cap.err
    for name in ("zero.png", "half.jpg", "page.png"):
        assert name in cap.err, (name, cap.err)
    assert (out / "earlier.png").read_bytes() == b"an earlier result"
    assert sorted(p.name for p in out.iterdir()) == ["earlier.png", "face.png"]


def test_sr_on_only_non_images_fails(capsys, tmp_path, srnet):
    """`facesr sr` given only non-images exits non-zero and writes nothing."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / "a.png").write_bytes(b"GIF89a nope")
    (src / "b.jpg").write_text("text")
    assert main(["sr", str(srnet), str(src), str(out), "--faces-only", "--device", "cpu"]) == 1
    assert "wrote 0 PNGs" in capsys.readouterr().out
    assert not out.exists() or not any(out.iterdir())


def test_sr_refuses_an_image_given_as_model(tmp_path):
    """A PNG passed where the model goes: refused with a message saying it is not a weights file."""
    from facesr.infer import load_upscaler

    fake = tmp_path / "model.safetensors"
    face = sorted((ROOT.parent / "shared" / "data" / "lfw" / "Colin_Powell").iterdir())[0]
    fake.write_bytes(face.read_bytes())
    with pytest.raises(ValueError, match=f"{fake}: not a safetensors weights file"):
        load_upscaler(fake)


# ---------------------------------------------------------------- disk full during prep


@contextlib.contextmanager
def tmpfs(path: Path, size: int):
    """A small tmpfs at ``path``: a disk that really fills up (ENOSPC), unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_prep_on_a_full_disk_keeps_finished_shards_and_resumes(tmp_path, faces, shards):
    """Prep into a disk that fills up after a few shards: it fails saying so, every shard under a final name
    is complete (byte-identical to an unconstrained prep), and after space is freed the same command keeps
    them and finishes with the same bytes."""
    sizes = [p.stat().st_size for p in sorted(shards.glob("train-*.tar"))]
    room = sum(sizes[:2]) + sizes[2] // 2 + 64 * 1024  # room for two shards and half of the third
    out = tmp_path / "disk"
    with tmpfs(out, room):
        cmd = [sys.executable, "-m", "launch.cli", "prep", str(faces), str(out), *PREP]
        full = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert full.returncode != 0
        assert "No space left on device" in full.stderr, full.stderr[-2000:]
        assert not (out / "manifest.json").exists()
        finished = sorted(p.name for p in out.glob("*.tar"))
        assert finished, "nothing was written before the disk filled"
        for name in finished:
            assert (out / name).read_bytes() == (shards / name).read_bytes(), name
        subprocess.run(["mount", "-o", f"remount,size={50 * 2**20}", str(out)], check=True)  # space freed
        again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-2000:]
        assert f"{len(finished)} already complete" in again.stdout, again.stdout
        assert snapshot(out) == snapshot(shards)


# ---------------------------------------------------------------- shards damaged under a running training


@pytest.mark.parametrize("damage", ["garble", "truncate"])
def test_epoch_loader_skips_a_shard_damaged_mid_run(shards, copy_of, damage):
    """The per-epoch training loader built after a train shard was damaged (as a later epoch or a restarted
    worker builds it) still yields the whole epoch, with the damage counted in ``decode_errors``."""
    from cluster.config import load_config, resolve
    from cluster.data import build_loader

    root = copy_of(shards)
    cfg = resolve(load_config(CPU, [f"data.shards={root}", "data.loader_workers=0"]))
    first = sorted(root.glob("train-*.tar"))[0]
    data = bytearray(first.read_bytes())
    if damage == "garble":
        for i in range(len(data) // 4, len(data) // 4 + 4096):
            data[i] ^= 0x5A
        first.write_bytes(bytes(data))
    else:
        first.write_bytes(bytes(data[: len(data) // 2]))
    loader = build_loader(cfg, 2, "train", 2, 0, 1, epoch=1)
    batches = list(loader)
    assert len(batches) == len(loader) > 0
    assert loader.decode_errors > 0
