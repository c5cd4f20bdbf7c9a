"""Reading a prep's ``manifest.json``: validation with errors that name the file at fault.

``read_manifest(root)`` always checks the manifest's own consistency and that
every listed shard exists with the recorded size; ``verify=True`` also
recomputes every shard's sha256 and counts its samples (reads every byte: do it
once per run on rank 0, not in every worker).
"""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path

from .plan import SPLITS
from .store import ObjectPath, StoreError, is_uri, path as store_path

FORMAT = "facesr-shards"
SUPPORTED_VERSIONS = (1,)
SHARD_FILE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,200}\.tar")  # a plain name in the shard folder: no '/', no '..'
REQUIRED = ("format", "version", "classes", "num_classes", "identities", "splits", "degrade")


class ManifestError(ValueError):
    """The manifest or a shard it lists is missing, malformed or does not match."""


def _load(path) -> dict:
    try:
        exists = path.exists()
    except StoreError as exn:  # endpoint, bucket or credentials: say so rather than "no manifest"
        raise ManifestError(str(exn)) from None
    if not exists:
        hint = " (is this a folder written by `facesr prep`? an interrupted prep writes it last)"
        raise ManifestError(f"{path}: no manifest{hint}")
    try:
        m = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exn:
        raise ManifestError(f"{path}: cannot read manifest: {exn}") from None
    if not isinstance(m, dict):
        raise ManifestError(f"{path}: expected a JSON object")
    missing = [k for k in REQUIRED if k not in m]
    if missing:
        raise ManifestError(f"{path}: missing keys {missing}")
    if m["format"] != FORMAT or m["version"] not in SUPPORTED_VERSIONS:
        raise ManifestError(f"{path}: format {str(m['format'])[:40]!r} v{str(m['version'])[:20]}, this reader knows "
                            f"{FORMAT!r} v{SUPPORTED_VERSIONS}")
    _check_shape(path, m)
    return m


def _expect(path, where: str, value, tp, what: str):
    if not isinstance(value, tp) or isinstance(value, bool) and tp is not bool:
        raise ManifestError(f"{path}: {where}: expected {what}, got {type(value).__name__}")
    return value


def _check_shape(path, m: dict) -> None:
    """Types of everything the readers index into, and shard names that stay inside the shard folder: a
    manifest listing ``../../../../etc/passwd`` is refused here, before any shard path is made or opened."""
    classes = _expect(path, "classes", m["classes"], list, "a list of names")
    if not all(isinstance(c, str) for c in classes):
        raise ManifestError(f"{path}: classes: expected a list of names")
    _expect(path, "num_classes", m["num_classes"], int, "an integer")
    for name, info in _expect(path, "identities", m["identities"], dict, "a mapping name -> {split, images, cls}").items():
        _expect(path, f"identities[{name[:60]!r}]", info, dict, "a mapping {split, images, cls}")
        for key in ("cls", "images", "prior_val"):
            if key in info:
                _expect(path, f"identities[{name[:60]!r}].{key}", info[key], int, "an integer")
    for split, d in _expect(path, "splits", m["splits"], dict, "a mapping split -> {samples, shards}").items():
        where = f"splits.{str(split)[:20]}"
        _expect(path, where, d, dict, "a mapping {samples, shards}")
        _expect(path, f"{where}.samples", d.get("samples"), int, "an integer")
        for i, s in enumerate(_expect(path, f"{where}.shards", d.get("shards"), list, "a list of shards")):
            _expect(path, f"{where}.shards[{i}]", s, dict, "a mapping {name, samples, bytes, sha256}")
            name = _expect(path, f"{where}.shards[{i}].name", s.get("name"), str, "a file name")
            if not SHARD_FILE.fullmatch(name):
                raise ManifestError(f"{path}: {where}.shards[{i}].name {name[:80]!r} is not a shard file name in "
                                    "its folder (a plain name ending .tar): refused, not opened")
            for key in ("samples", "bytes"):
                _expect(path, f"{where}.shards[{i}].{key}", s.get(key), int, "an integer")


def _object_sizes(root: ObjectPath) -> dict[str, int]:
    """Sizes of the objects directly under ``root``: one listing instead of a request per shard."""
    try:
        return root.sizes()
    except StoreError as exn:
        raise ManifestError(str(exn)) from None


def _count_samples(path) -> int:
    keys = set()
    with (path.open_input() if isinstance(path, ObjectPath) else open(path, "rb")) as f, \
            tarfile.open(fileobj=f, mode="r|") as tar:  # streaming: no seeks, member data not read
        for ti in tar:
            keys.add(ti.name.split("/")[-1].split(".", 1)[0])
    return len(keys)


def _sha256(path: Path) -> str:
    from .writer import sha256_file

    return sha256_file(path)


def read_manifest(root: str | Path, verify: bool = False, check_files: bool = True) -> dict:
    """Load and validate ``root/manifest.json``; raises ManifestError naming the file at fault.

    ``check_files=False`` skips the per-shard presence and size checks: a running training
    re-reads the manifest every epoch, and a shard damaged after the start must then be skipped
    and counted by the stream (decode errors), not stop the run.
    """
    root = store_path(root)
    path = root / "manifest.json"
    m = _load(path)
    objects = _object_sizes(root) if isinstance(root, ObjectPath) and (check_files or verify) else None
    if m["num_classes"] != len(m["classes"]):
        raise ManifestError(f"{path}: num_classes {m['num_classes']} != {len(m['classes'])} classes listed")
    for name, info in m["identities"].items():
        c = info.get("cls", -1)
        if c != -1 and (not 0 <= c < m["num_classes"] or m["classes"][c] != name):
            raise ManifestError(f"{path}: identity {name!r} has cls {c}, which the class map gives to another")
    for split, d in m["splits"].items():
        if split not in SPLITS:
            raise ManifestError(f"{path}: unknown split {split!r}")
        listed = sum(s["samples"] for s in d["shards"])
        if listed != d["samples"]:
            raise ManifestError(f"{path}: split {split} says {d['samples']} samples, its shards hold {listed}")
        for s in d["shards"] if check_files or verify else ():
            shard = root / s["name"]
            size = objects.get(s["name"]) if objects is not None else shard.stat().st_size if shard.is_file() else None
            if size is None:
                raise ManifestError(f"{shard}: shard listed in {path} is missing")
            if size != s["bytes"]:
                raise ManifestError(f"{shard}: {size} bytes, {path} says {s['bytes']} (truncated or replaced?)")
            if verify:
                if _sha256(shard) != s["sha256"]:
                    raise ManifestError(f"{shard}: sha256 does not match {path}")
                n = _count_samples(shard)
                if n != s["samples"]:
                    raise ManifestError(f"{shard}: holds {n} samples, {path} says {s['samples']}")
    return m


def shard_urls(root: str | Path, split: str, url: str | None = None, manifest: dict | None = None) -> list[str]:
    """The split's shards as local paths, or formatted with ``url`` (e.g. ``"pipe:aws s3 cp s3://b/faces/{name} -"``).

    ``manifest`` skips re-reading it when the caller already has it.
    """
    m = manifest if manifest is not None else read_manifest(root)
    if split not in m["splits"]:
        raise ManifestError(f"{store_path(root) / 'manifest.json'}: no split {split!r} (has {sorted(m['splits'])})")
    names = [s["name"] for s in m["splits"][split]["shards"]]
    if url is not None:
        return [url.format(name=n) for n in names]
    if is_uri(root):  # workers stream these objects (shards.stream)
        return [str(store_path(root) / n) for n in names]
    return [str((Path(root) / n).resolve()) for n in names]


def split_samples(manifest: dict, split: str, labelled_only: bool = False) -> int:
    """Samples in a split (``labelled_only``: those with cls >= 0), for ``StreamConfig.num_samples``."""
    d = manifest["splits"][split]
    return d["labelled"] if labelled_only else d["samples"]


def class_counts(manifest: dict, split: str) -> list[int]:
    """Labelled samples of each class (index = ``cls``) in ``train`` or ``prior_val``: class-balanced weights,
    the majority-class rate. A class identity's images are all in train except its ``prior_val`` holdout."""
    if split not in ("train", "prior_val"):
        raise ValueError(f"class counts are known for train and prior_val, not {split!r}")
    counts = [0] * manifest["num_classes"]
    for info in manifest["identities"].values():
        if info.get("cls", -1) >= 0:
            held = info.get("prior_val", 0)
            counts[info["cls"]] = held if split == "prior_val" else info["images"] - held
    return counts
