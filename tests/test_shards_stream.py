"""Streaming shards: exact tensors, rank/worker partition, equal batch counts, safe decoding, augmentation, manifest checks."""

from __future__ import annotations

import io
import json
import logging
import pickle
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from facesr.degrade import degrade, quadruplet
from facesr.vocab import LEVELS, SIZES
from shards.manifest import ManifestError, read_manifest, shard_urls, split_samples
from shards.stream import StreamConfig, build_loader
from tests.fixtures_faces import png_bytes, prepared


def _records(urls: list[str]) -> dict[str, dict]:
    """key -> the sample's JSON record, read straight from the tars."""
    out = {}
    for u in urls:
        with tarfile.open(u) as tar:
            for ti in tar:
                if ti.name.endswith(".json"):
                    out[ti.name.split(".", 1)[0]] = json.loads(tar.extractfile(ti).read())
    return out


def _train():
    src, out, _ = prepared()
    m = read_manifest(out)
    return src, out, m, shard_urls(out, "train", manifest=m)


def test_streamed_tensors_equal_degrading_the_source():
    """A streamed sample is exactly facesr.degrade.quadruplet of its source image, as uint8 (converted on the device)."""
    src, _, m, urls = _train()
    cfg = StreamConfig(batch_size=5, batches_per_epoch=6, workers=0, shuffle=0, meta=True)
    recs = _records(urls)
    n = 0
    for batch in build_loader(urls, cfg, rank=0, world_size=1, epoch=0):
        for i, key in enumerate(batch["key"]):
            img = torch.from_numpy(np.array(Image.open(src / recs[key]["path"]))).permute(2, 0, 1)
            want = quadruplet(img)
            for k in LEVELS:
                assert batch[k].dtype == torch.uint8 and batch[k].shape[1:] == (3, SIZES[k], SIZES[k])
                assert torch.equal(batch[k][i].float() / 255, want[k]), (key, k)
            assert batch["cls"][i].item() == m["identities"][recs[key]["identity"]]["cls"]
            n += 1
    assert n == 30 and batch["cls"].dtype == torch.int64


def test_two_ranks_two_workers_disjoint_shards_equal_batches():
    """2 ranks x 2 workers read disjoint shards, and every rank yields exactly len(loader) batches."""
    _, _, m, urls = _train()
    assert len(urls) >= 4
    cfg = StreamConfig(batch_size=4, num_samples=split_samples(m, "train"), workers=2, shuffle=16, meta=True)
    seen, counts = defaultdict(set), []
    for rank in range(2):
        loader = build_loader(urls, cfg, rank=rank, world_size=2, epoch=0)
        n = 0
        for batch in loader:
            seen[(rank, batch["worker"])].update(batch["url"])
            assert batch["hr"].shape == (4, 3, 192, 192)
            n += 1
        counts.append((n, len(loader)))
    assert counts[0] == counts[1] and counts[0][0] == counts[0][1] == split_samples(m, "train") // 8
    assert len(seen) == 4
    pairs = list(seen.values())
    assert all(not (a & b) for i, a in enumerate(pairs) for b in pairs[i + 1 :])


@pytest.mark.parametrize("workers", [0, 2])
def test_seeds_derive_from_epoch(workers):
    """Same (seed, epoch, rank) gives the same batches, in the training process or in worker processes (each
    builds its own pipeline); another epoch gives another order."""
    _, _, _, urls = _train()
    cfg = StreamConfig(batch_size=4, batches_per_epoch=3, workers=workers, shuffle=20, meta=True)

    def keys(epoch):
        return [k for b in build_loader(urls, cfg, rank=0, world_size=1, epoch=epoch) for k in b["key"]]

    assert keys(0) == keys(0) != keys(1)


def _write_tar(path: Path, samples: list[dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for n, s in enumerate(samples):
            for ext, data in s.items():
                ti = tarfile.TarInfo(f"s{n:04d}.{ext}")
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))


def _good_sample(rng: np.random.Generator) -> dict[str, bytes]:
    quad = degrade(torch.from_numpy(rng.random((1, 3, 192, 192), dtype=np.float32)))
    s = {f"{k}.png": png_bytes(Image.fromarray((v[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)))
         for k, v in quad.items()}
    return s | {"cls": b"3", "json": b"{}"}


class _Payload:
    """Unpickling this creates a file: proof that a decoder ran pickle.loads."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (Path(self.target).touch, ())


def test_pickle_members_refused_and_counted(tmp_path, caplog):
    """A sample with .pyd/.pickle/.pth members is refused without unpickling; the error is counted and logged."""
    rng = np.random.default_rng(0)
    target = tmp_path / "pwned"
    evil = pickle.dumps(_Payload(str(target)))
    samples = [_good_sample(rng) for _ in range(3)]
    samples[1] = samples[1] | {"pyd": evil}
    samples.append(_good_sample(rng) | {"pickle": evil})
    samples.append(_good_sample(rng) | {"pth": evil})
    samples.append(_good_sample(rng) | {"hr.png": b"\x89PNG broken"})  # corrupt PNG: also just counted
    _write_tar(tmp_path / "evil.tar", samples)
    cfg = StreamConfig(batch_size=1, batches_per_epoch=4, workers=0, shuffle=0, meta=True, log_interval_s=0)
    with caplog.at_level(logging.WARNING, logger="shards.stream"):
        loader = build_loader([str(tmp_path / "evil.tar")], cfg, rank=0, world_size=1, epoch=0)
        keys = [b["key"][0] for b in loader]
    assert set(keys) == {"s0000", "s0002"}
    assert not target.exists(), "a pickle member was unpickled"
    assert loader.decode_errors >= 4 and "refusing members ['pyd']" in caplog.text
    pickle.loads(evil)  # the payload is real: unpickling it does create the file
    assert target.exists()


def test_pipe_urls_and_log_rate_limit(tmp_path, caplog):
    """Shards stream through pipe: commands; with a long log interval errors are counted but logged once."""
    _, out, m, _ = _train()
    urls = shard_urls(out, "val", url=f"pipe:cat {out}/{{name}}", manifest=m)
    assert urls[0].startswith("pipe:cat ")
    cfg = StreamConfig(batch_size=2, batches_per_epoch=2, workers=0, shuffle=0)
    assert sum(b["lr"].shape[0] for b in build_loader(urls, cfg, rank=0, world_size=1, epoch=0)) == 4
    rng = np.random.default_rng(1)
    _write_tar(tmp_path / "bad.tar", [_good_sample(rng) | {"x2.png": b"junk"} for _ in range(5)] + [_good_sample(rng)])
    cfg = StreamConfig(batch_size=1, batches_per_epoch=3, workers=0, shuffle=0, log_interval_s=3600)
    with caplog.at_level(logging.WARNING, logger="shards.stream"):
        loader = build_loader([str(tmp_path / "bad.tar")], cfg, rank=0, world_size=1, epoch=0)
        assert len(list(loader)) == 3
    assert loader.decode_errors == 15 and caplog.text.count("decode errors") == 1


def test_labelled_only_drops_unlabelled():
    """labelled_only streams just the prior's classes (cls >= 0)."""
    _, _, m, urls = _train()
    cfg = StreamConfig(batch_size=8, num_samples=split_samples(m, "train", labelled_only=True), workers=0,
                       labelled_only=True, levels=("x2", "x4", "hr"))
    batches = list(build_loader(urls, cfg, rank=0, world_size=1, epoch=0))
    assert batches and all((b["cls"] >= 0).all() and "lr" not in b for b in batches)


@pytest.mark.parametrize("flip,crop_pad", [(True, 0), (False, 2), (True, 3)])
def test_flips_and_crops_keep_the_quadruplet_consistent(flip, crop_pad):
    """Device augmentation of streamed batches: each level is still the degradation of the augmented hr
    (away from the padded borders), samples differ in what they draw, and a seed replays it exactly."""
    from facesr.augment import flip_crop, step_generator
    from facesr.step import Precision, to_device

    _, _, _, urls = _train()
    plain = StreamConfig(batch_size=8, batches_per_epoch=2, workers=0, seed=5)
    changed = False
    for i, raw in enumerate(build_loader(urls, plain, rank=0, world_size=1, epoch=0)):
        ref = to_device(raw, "cpu", Precision(False, False))
        batch = flip_crop(ref, step_generator(5, 0, 0, i, "cpu"), flip=flip, crop_pad=crop_pad)
        again = flip_crop(ref, step_generator(5, 0, 0, i, "cpu"), flip=flip, crop_pad=crop_pad)
        assert all(torch.equal(batch[k], again[k]) for k in LEVELS)
        changed |= not torch.equal(batch["hr"], ref["hr"])
        down = degrade(batch["hr"])
        for k in ("lr", "x2", "x4"):
            m = (crop_pad + 3) * SIZES[k] // SIZES["lr"]  # padded band plus the blur's reach
            inner = (slice(None), slice(None), slice(m, SIZES[k] - m), slice(m, SIZES[k] - m))
            assert (down[k][inner] - batch[k][inner]).abs().max() <= 2.5 / 255, k
    assert changed


def test_manifest_errors_name_the_file(tmp_path):
    """Missing manifest, missing shard, size/sha/count mismatches: ManifestError naming the file."""
    _, out, _, _ = _train()
    with pytest.raises(ManifestError, match=str(tmp_path / "manifest.json")):
        read_manifest(tmp_path)
    root = tmp_path / "copy"
    root.mkdir()
    for p in out.iterdir():
        if p.is_file():
            (root / p.name).write_bytes(p.read_bytes())
    m = json.loads((root / "manifest.json").read_text())
    shard = root / m["splits"]["train"]["shards"][0]["name"]

    data = bytearray(shard.read_bytes())
    data[600] ^= 1
    shard.write_bytes(bytes(data))
    read_manifest(root)  # same size: only verify can tell
    with pytest.raises(ManifestError, match=f"{shard}: sha256"):
        read_manifest(root, verify=True)
    shard.write_bytes(bytes(data[:-10240]))
    with pytest.raises(ManifestError, match=f"{shard}: .* bytes"):
        read_manifest(root)
    shard.unlink()
    with pytest.raises(ManifestError, match=f"{shard}: shard listed in .* is missing"):
        shard_urls(root, "train")
    (root / shard.name).write_bytes((out / shard.name).read_bytes())
    m["splits"]["train"]["shards"][0]["samples"] += 1
    m["splits"]["train"]["samples"] += 1
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match=f"{shard}: holds \\d+ samples"):
        read_manifest(root, verify=True)
    with pytest.raises(ManifestError, match="no split 'dev'"):
        shard_urls(out, "dev")


def test_raw_member_shards_stream_the_same_tensors(tmp_path):
    """`facesr prep --members raw` writes uint8 level bytes that stream to exactly the PNG shards' tensors
    (same keys, same order, same pixels), says so in the manifest, and the in-order reader reads both."""
    from launch.cli import main
    from shards.stream import read_in_order
    from tests.fixtures_faces import PREP_ARGS

    src, png_out, m = _train()[:3]
    raw_out = tmp_path / "raw"
    assert main(["prep", str(src), str(raw_out), "--no-ray", "--members", "raw", *PREP_ARGS]) == 0
    rm = read_manifest(raw_out)
    assert set(rm["encoding"]["members"]) >= {"lr.u8", "hr.u8"}
    assert {k: v["samples"] for k, v in rm["splits"].items()} == {k: v["samples"] for k, v in m["splits"].items()}
    with tarfile.open(shard_urls(raw_out, "train", manifest=rm)[0]) as tar:
        assert {n.split(".", 1)[1] for n in tar.getnames()} == {"lr.u8", "x2.u8", "x4.u8", "hr.u8", "cls", "json"}
    cfg = StreamConfig(batch_size=4, batches_per_epoch=5, workers=0, shuffle=8, meta=True)
    png = list(build_loader(shard_urls(png_out, "train", manifest=m), cfg, rank=0, world_size=1, epoch=0))
    raw = list(build_loader(shard_urls(raw_out, "train", manifest=rm), cfg, rank=0, world_size=1, epoch=0))
    assert len(png) == len(raw) == 5  # listed, not zipped: a short stream must fail, not end the comparison early
    for a, b in zip(png, raw, strict=True):
        assert a["key"] == b["key"] and all(torch.equal(a[k], b[k]) for k in LEVELS)
    png = list(read_in_order(shard_urls(png_out, "val", manifest=m)))
    raw = list(read_in_order(shard_urls(raw_out, "val", manifest=rm)))
    assert sum(len(b["key"]) for b in png) == m["splits"]["val"]["samples"]  # every sample, once
    for a, b in zip(png, raw, strict=True):
        assert a["key"] == b["key"] and all(torch.equal(a[k], b[k]) for k in LEVELS)


def test_raw_level_of_wrong_length_is_a_decode_error():
    """A .u8 member whose length is not 3·S·S is refused (counted and skipped, like a corrupt PNG)."""
    from shards.stream import DecodeError, decode_sample

    good = {f"{k}.u8": bytes(3 * SIZES[k] ** 2) for k in LEVELS} | {"cls": b"1", "__key__": "s0"}
    assert decode_sample(good)["hr"].shape == (3, 192, 192)
    with pytest.raises(DecodeError, match="hr.u8"):
        decode_sample({**good, "hr.u8": bytes(10)})
