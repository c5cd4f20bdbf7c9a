"""Writing one shard: source images -> quadruplet PNGs -> a reproducible tar, published atomically.

A shard's bytes depend only on its plan (and the PIL/zlib/torch versions): tar
headers carry a fixed mtime, uid/gid 0, empty user names and mode 0444, and
members are written in plan order. The tar is written under a temporary
name in the same folder and renamed into place, so a shard under its final
name is always complete (to an object store, ``OUT`` an ``s3://`` URI: written to a local temporary
file, uploaded under a temporary key and moved into place, ``shards.store``). A small record ``.parts/<stem>.json`` (sample count,
sha256, plan fingerprint) is written after the rename, again atomically;
a rerun trusts a shard only when its record matches the plan and the file's
sha256 matches the record.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image

from facesr.degrade import DEFAULT, DegradeConfig, quadruplet, to_uint8
from facesr.vocab import LEVELS

from .plan import ShardPlan
from .source import Rejected, open_face, source_file
from .store import ObjectPath, path as store_path

TAR_MTIME = 946684800  # 2000-01-01T00:00:00Z, fixed for byte-identical shards (GNU tar warns on 0)
PARTS = ".parts"  # per-shard completion records, under OUT
TMP_MARK = ".tmp-"  # in every temporary name, so a rerun can sweep leftovers of a killed run


MEMBER_FORMATS = ("png", "raw")  # lossless PNG (small), or raw uint8 (3, S, S) bytes (fast to stream)


def encode_face(path: str, cfg: DegradeConfig = DEFAULT, png_level: int = 1, members: str = "png") -> dict[str, bytes]:
    """Source image -> lossless bytes of ``quadruplet`` per level: ``{lr,x2,x4,hr}.png`` or ``.u8``.

    ``.u8`` is the level's uint8 pixels in (3, S, S) order, nothing else: 2.3x the bytes of PNG, but it
    streams ~100x faster than PNG decodes (docs/SHARDS.md), for loaders that must feed a fast GPU.
    """
    img = torch.from_numpy(open_face(path, cfg).copy()).permute(2, 0, 1)  # (3, H, W) uint8
    quad = quadruplet(img, cfg)
    out = {}
    for level in LEVELS:
        pixels = to_uint8(quad[level])  # (3, S, S)
        if members == "raw":
            out[f"{level}.u8"] = pixels.contiguous().numpy().tobytes()
            continue
        buf = io.BytesIO()
        Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy(), "RGB").save(buf, format="PNG",
                                                                               compress_level=png_level)
        out[f"{level}.png"] = buf.getvalue()
    return out


class _HashingWriter(io.RawIOBase):
    """File wrapper that hashes what tarfile writes, so the shard is not read back to hash it."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def writable(self):
        return True

    def tell(self):
        return self.size

    def write(self, b):
        self.sha.update(b)
        self.size += len(b)
        return self.f.write(b)


def _member(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = size, TAR_MTIME, 0o444
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


def atomic_write(path: Path | ObjectPath, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary name in the same folder and a rename (an object: one PUT)."""
    if isinstance(path, ObjectPath):
        path.write_bytes(data)
        return
    tmp = path.with_name(f".{path.name}{TMP_MARK}{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextmanager
def one_thread():
    """A task is one core's work: intra-op threads only fight the other tasks (10-20x slower when oversubscribed)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def write_shard(src: str, out: str, plan: ShardPlan, fingerprint: str, cfg: DegradeConfig = DEFAULT,
                png_level: int = 1, members: str = "png") -> dict:
    """Ray/serial task: encode the plan's images into ``OUT/<name>``; returns the shard's manifest record."""
    with one_thread():
        return _write_shard(src, out, plan, fingerprint, cfg, png_level, members)


def _write_shard(src, out, plan, fingerprint, cfg, png_level, members_format="png") -> dict:
    out_dir = store_path(out)
    final = out_dir / plan.name
    remote = isinstance(final, ObjectPath)
    tmp_dir = Path(tempfile.mkdtemp(prefix="facesr-shard-")) if remote else out_dir
    tmp = tmp_dir / f".{plan.name}{TMP_MARK}{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            hw = _HashingWriter(f)
            with tarfile.open(fileobj=hw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for ref in plan.samples:
                    try:
                        members = encode_face(source_file(src, ref.path), cfg, png_level, members_format)
                    except Rejected as r:  # it passed the check moments ago: the source changed under us
                        raise RuntimeError(f"{ref.path} changed since it was checked ({r}); rerun prep") from None
                    members["cls"] = str(ref.cls).encode()
                    members["json"] = json.dumps({"identity": ref.identity, "path": ref.path, "cls": ref.cls},
                                                 sort_keys=True, ensure_ascii=True).encode()
                    ext_of = "u8" if members_format == "raw" else "png"
                    for ext in (*(f"{lv}.{ext_of}" for lv in LEVELS), "cls", "json"):
                        data = members[ext]
                        tar.addfile(_member(f"{ref.key}.{ext}", len(data)), io.BytesIO(data))
            f.flush()
            os.fsync(f.fileno())
        if remote:
            final.upload(tmp)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()
        if remote:
            tmp_dir.rmdir()
    record = {"name": plan.name, "split": plan.split, "samples": len(plan.samples), "bytes": hw.size,
              "sha256": hw.sha.hexdigest(), "fingerprint": fingerprint}
    (out_dir / PARTS).mkdir(exist_ok=True)
    atomic_write(out_dir / PARTS / f"{final.stem}.json", json.dumps(record, sort_keys=True).encode())
    return record


def sha256_file(path: str | os.PathLike | ObjectPath, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open_input() if isinstance(path, ObjectPath) else open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def finished_record(out: str, plan: ShardPlan, fingerprint: str) -> dict | None:
    """Ray/serial task: the shard's record if it is complete, matches the plan and its sha256; else None."""
    out_dir = store_path(out)
    rec_path, final = out_dir / PARTS / f"{Path(plan.name).stem}.json", out_dir / plan.name
    try:
        record = json.loads(rec_path.read_text())
        size = final.size() if isinstance(final, ObjectPath) else final.stat().st_size
        if record.get("fingerprint") != fingerprint or size != record["bytes"]:
            return None
        return record if sha256_file(final) == record["sha256"] else None
    except (OSError, ValueError, KeyError):
        return None
