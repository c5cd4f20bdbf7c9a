"""``facesr prep`` logic: scan -> check every image -> plan splits and shards -> write missing shards -> manifest.

Work fans out through a *mapper*: ``mapper(fn, [args, ...])`` yields
``(index, fn(*args))`` in completion order. ``serial_map`` runs in this
process; ``cluster.shard_prep.ray_map`` runs each call as a Ray task, which is
how a prep spreads over every core of every node. Task functions are plain
module-level functions of ``shards.source`` / ``shards.writer`` and take and
return only small picklable values (paths, plans, records); workers read SRC
and write OUT themselves, so both must be on a path every node sees.

Two passes read every image: the check pass (a full decode, ~1 ms) must know
which images are usable before the class label set — and so every ``cls`` in
every shard — can be fixed. It costs under a tenth of the writing pass.
"""

from __future__ import annotations

import json
import os
import platform
import re
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

import facesr
from facesr.degrade import DEFAULT, DegradeConfig
from facesr.progress import bar as progress_bar
from facesr.vocab import LEVELS, SIZES

from .plan import SPLITS, UNLABELLED, SplitConfig, label_set, plan_shards, sample_splits, split_identities
from .source import KINDS, Reject, check_chunk, scan, source_roots, tsv_field
from .store import StoreError, check_reachable, is_uri, path as store_path
from .writer import PARTS, TMP_MARK, atomic_write, finished_record, write_shard

FORMAT_VERSION = 1  # bump when the shard or manifest layout changes
SHARD_NAME = re.compile(r"^(train|val|test|prior_val)-\d{6}\.tar$")
Mapper = Callable[[Callable, list[tuple]], Iterator[tuple[int, object]]]


class PrepError(Exception):
    """A run that cannot start or produce anything: missing/empty SRC, unwritable OUT."""


@dataclass(frozen=True)
class PrepConfig:
    src: str | tuple[str, ...]  # folder of identity folders (CASIA-WebFace layout), or several combined
    out: str  # shard folder shared by all nodes on a cluster, or an object-store URI (s3://bucket/prefix)
    split: SplitConfig = field(default_factory=SplitConfig)
    shard_size: int = 1000  # samples per shard: ~75 MB, ~12 core-seconds of work per task
    check_chunk: int = 500  # images per check task (~0.5 core-second: keeps the progress bar live)
    png_level: int = 1  # zlib level: 2.6× faster than PIL's default 6 for 9% larger files
    members: str = "png"  # png = lossless PNG levels; raw = uint8 (3, S, S) bytes, 2.3x larger, ~100x faster to stream
    degrade: DegradeConfig = DEFAULT
    progress: bool = True  # tqdm bars (images/s, ETA) on stderr
    # another shard set (folder or URI with a manifest): the identities its val and test splits hold, in the
    # source folders both read, are left out, so that a face set for a recognizer can take every person but those
    # that set evaluates on (launch/configs/identity-term.yaml's stage1.shards); "" = none
    exclude: str = ""

    def settings(self) -> dict:
        """What shard bytes depend on; part of every shard's fingerprint."""
        fp = {"format": FORMAT_VERSION, "degrade": self.degrade.to_dict(), "png_level": self.png_level}
        return fp if self.members == "png" else {**fp, "members": self.members}  # png shards keep their prints


def serial_map(fn: Callable, arglist: list[tuple]) -> Iterator[tuple[int, object]]:
    """The mapper without Ray: in this process, in order (tests, debugging, the baseline)."""
    for i, args in enumerate(arglist):
        yield i, fn(*args)


def check_paths(cfg: PrepConfig) -> None:
    """Fail fast (PrepError) on a missing SRC or an unwritable OUT, before any cluster is started."""
    try:
        roots = source_roots(cfg.src)
    except ValueError as exn:
        raise PrepError(f"SRC: {exn}") from None
    for root in roots.values():
        src = Path(root)
        if not src.exists():
            raise PrepError(f"SRC {src} does not exist")
        if not src.is_dir():
            raise PrepError(f"SRC {src} is not a folder (expected a folder of identity folders)")
    if cfg.exclude:
        _excluded_manifest(cfg)
    if is_uri(cfg.out):  # endpoint, bucket and credentials, with a probe object written and deleted
        try:
            check_reachable(cfg.out, "OUT", write=True)
        except StoreError as exn:
            raise PrepError(str(exn)) from None
        return
    try:
        os.makedirs(cfg.out, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cfg.out, prefix=".write-probe"):
            pass
    except OSError as exn:
        raise PrepError(f"OUT {cfg.out} is not writable: {exn.strerror or exn}") from None


EXCLUDED_SPLITS = ("val", "test")


def _excluded_manifest(cfg: PrepConfig) -> dict:
    """``cfg.exclude``'s manifest; PrepError naming it when unreadable."""
    from .manifest import ManifestError, read_manifest

    try:
        return read_manifest(cfg.exclude, check_files=False)
    except (ManifestError, OSError, StoreError) as exn:
        raise PrepError(f"--exclude {cfg.exclude}: no readable shard manifest ({exn})") from None


def excluded_identities(cfg: PrepConfig, candidates: list[tuple[str, str]]) -> set[str]:
    """This prep's names of the identities that ``cfg.exclude``'s val/test splits hold, matched on the source
    folder (resolved) both preps read; PrepError when the manifest is unreadable or shares no source folder."""
    other = _excluded_manifest(cfg)
    src = other.get("source", {})
    theirs = {"": src["root"]} if "root" in src else dict(src.get("roots", {}))
    held = set()  # (resolved source folder, identity folder name)
    for name, info in other["identities"].items():
        if info.get("split") in EXCLUDED_SPLITS:
            label, _, bare = name.partition("/") if "" not in theirs else ("", "", name)
            if label in theirs:
                held.add((os.path.realpath(theirs[label]), bare))
    ours = {label: os.path.realpath(root) for label, root in source_roots(cfg.src).items()}
    if not set(ours.values()) & {os.path.realpath(r) for r in theirs.values()}:
        raise PrepError(f"--exclude {cfg.exclude}: its source folders ({', '.join(theirs.values()) or 'none'}) are "
                        f"not among SRC ({_show(cfg.src)}), so no identity of its val/test splits could be matched")
    out = set()
    for ident, _ in candidates:
        label, _, bare = ident.partition("/") if "" not in ours else ("", "", ident)
        if (ours[label], bare) in held:
            out.add(ident)
    return out


def _sweep(out, keep: set[str]) -> None:
    """Remove temporaries of killed runs, and our shards/records that the current plan no longer has."""
    for d in (out, out / PARTS):
        if d.is_dir():
            for p in d.iterdir():
                if TMP_MARK in p.name and p.name.startswith("."):
                    p.unlink(missing_ok=True)
    for p in out.glob("*.tar"):
        if SHARD_NAME.match(p.name) and p.name not in keep:
            p.unlink(missing_ok=True)
            (out / PARTS / f"{p.stem}.json").unlink(missing_ok=True)


def _bar(cfg: PrepConfig, total: int, desc: str, initial: int = 0) -> tqdm:
    """A progress line with rate and ETA on stderr: redrawn in place on a terminal, else a line a minute."""
    return progress_bar(total, desc, "img", initial=initial, disable=not cfg.progress, smoothing=0.1)


def prepare(cfg: PrepConfig, mapper: Mapper = serial_map) -> dict:
    """Run (or finish) a prep; returns the summary. Raises PrepError when nothing can be produced."""
    t0 = time.perf_counter()
    check_paths(cfg)
    out = store_path(cfg.out)
    found = scan(cfg.src)
    rejects = list(found.rejects)
    excluded = {"shards": str(cfg.exclude), "splits": list(EXCLUDED_SPLITS), "identities": 0, "images": 0}
    if cfg.exclude:
        drop = excluded_identities(cfg, found.candidates)
        kept = [c for c in found.candidates if c[0] not in drop]
        excluded.update(identities=len(drop), images=len(found.candidates) - len(kept))
        found = dataclasses.replace(found, candidates=kept)
    if not found.candidates:
        _write_rejects(out, rejects)
        raise PrepError(f"SRC {_show(cfg.src)} holds no image files in identity folders "
                        f"({len(rejects)} entries refused, see {out / 'rejects.tsv'})")

    # 1. check: decode every candidate once, in parallel
    paths = [p for _, p in found.candidates]
    chunks = [paths[i : i + cfg.check_chunk] for i in range(0, len(paths), cfg.check_chunk)]
    bad: dict[str, Reject] = {}
    t_check = time.perf_counter()
    with _bar(cfg, len(paths), "check") as bar:
        for i, result in mapper(check_chunk, [(cfg.src, c, cfg.degrade) for c in chunks]):
            bad.update({r[0]: Reject(*r) for r in result if r is not None})
            bar.update(len(chunks[i]))
    check_s = time.perf_counter() - t_check
    rejects += bad.values()
    accepted = [(ident, p) for ident, p in found.candidates if p not in bad]
    if not accepted:
        _write_rejects(out, rejects)
        raise PrepError(f"SRC {_show(cfg.src)} holds no usable image: all {len(paths)} files refused, "
                        f"see {out / 'rejects.tsv'}")

    # 2. plan: splits, classes, shards
    counts = Counter(ident for ident, _ in accepted)
    split_of = split_identities(list(counts), cfg.split)
    classes = label_set(counts, split_of, cfg.split.min_images)
    where = sample_splits(accepted, split_of, classes, cfg.split)
    plans = plan_shards(accepted, where, classes, cfg.shard_size, cfg.split.seed)
    prints = [p.fingerprint(cfg.settings()) for p in plans]
    _sweep(out, {p.name for p in plans})

    # 3. write what is missing; shards whose record and sha256 match the plan are kept
    records: dict[int, dict] = {}
    for i, rec in mapper(finished_record, [(cfg.out, p, f) for p, f in zip(plans, prints)]):
        if rec is not None:
            records[i] = rec
    todo = [i for i in range(len(plans)) if i not in records]
    n_done = sum(len(plans[i].samples) for i in records)
    t_write = time.perf_counter()
    with _bar(cfg, len(accepted), "shard", initial=n_done) as bar:
        bar.set_postfix(kept=len(records), todo=len(todo))
        args = [(cfg.src, cfg.out, plans[i], prints[i], cfg.degrade, cfg.png_level, cfg.members) for i in todo]
        for j, rec in mapper(write_shard, args):
            records[todo[j]] = rec
            bar.update(rec["samples"])
    write_s = time.perf_counter() - t_write

    # 4. manifest and rejects, published last: a manifest means every shard it lists is complete
    manifest = _manifest(cfg, found, accepted, rejects, counts, split_of, where, classes, plans, records)
    if cfg.exclude:
        manifest["excluded"] = excluded
    _write_rejects(out, rejects)
    atomic_write(out / "manifest.json", (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    written = sum(len(plans[i].samples) for i in todo)
    return {
        "accepted": len(accepted), "rejected": len(rejects), "rejects_by_kind": manifest["rejects"]["by_kind"],
        "shards": len(plans), "shards_written": len(todo), "shards_kept": len(plans) - len(todo),
        "images_checked": len(paths), "check_s": check_s, "images_written": written, "write_s": write_s, "total_s": time.perf_counter() - t0,
        "splits": {s: {k: v for k, v in d.items() if k != "shards"} for s, d in manifest["splits"].items()},
        "num_classes": manifest["num_classes"], "out": str(out), "excluded": excluded if cfg.exclude else None,
    }


def _show(src) -> str:
    return " + ".join(source_roots(src).values())


def _roots(src) -> dict:
    roots = source_roots(src)
    if "" in roots:
        return {"root": os.path.abspath(roots[""])}
    return {"roots": {label: os.path.abspath(r) for label, r in roots.items()}}


def _write_rejects(out, rejects: list[Reject]) -> None:
    lines = ["path\tkind\tdetail"] + [f"{tsv_field(r.path)}\t{r.kind}\t{tsv_field(r.detail)}" for r in sorted(rejects)]
    atomic_write(out / "rejects.tsv", ("\n".join(lines) + "\n").encode("utf-8"))  # tsv_field escaped every surrogate


def _software() -> dict:
    import numpy
    import PIL
    import torch

    return {"facesr": facesr.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "pillow": PIL.__version__, "numpy": numpy.__version__}


def _manifest(cfg, found, accepted, rejects, counts, split_of, where, classes, plans, records) -> dict:
    cls_of = {name: i for i, name in enumerate(classes)}
    held = Counter(i for i, p in accepted if where[p] == "prior_val")
    splits = {}
    for s in SPLITS:
        idx = [i for i, p in enumerate(plans) if p.split == s]
        per_id = Counter(i for i, p in accepted if where[p] == s)
        if s == "prior_val" and not idx:
            continue  # no holdout asked for: the manifest keeps its three splits
        splits[s] = {
            "identities": len(per_id),
            "samples": sum(per_id.values()),
            "labelled": sum(n for i, n in per_id.items() if i in cls_of),
            # labelled samples of its most common class: majority-class rate = largest_class / labelled
            "largest_class": max((n for i, n in per_id.items() if i in cls_of), default=0),
            "shards": [{k: records[i][k] for k in ("name", "samples", "sha256", "bytes")} for i in idx],
        }
    return {
        "format": "facesr-shards",
        "version": FORMAT_VERSION,
        "software": _software(),
        "source": {**_roots(cfg.src), "files": len(found.candidates), "accepted": len(accepted)},
        "degrade": cfg.degrade.to_dict(),
        "encoding": {
            "members": ({f"{k}.png": f"{SIZES[k]}x{SIZES[k]} RGB PNG" for k in LEVELS} if cfg.members == "png" else
                        {f"{k}.u8": f"uint8 (3, {SIZES[k]}, {SIZES[k]}) raw bytes" for k in LEVELS})
            | {"cls": f"ASCII integer: index into classes, {UNLABELLED} when not in the label set",
               "json": "{identity, path (relative to source root), cls}"},
            "png_compress_level": cfg.png_level,
            "shard_size": cfg.shard_size,
        },
        "split": asdict(cfg.split),
        "classes": classes,
        "num_classes": len(classes),
        "identities": {i: {"split": split_of[i], "images": counts[i], "cls": cls_of.get(i, UNLABELLED)}
                       | ({"prior_val": held[i]} if held[i] else {}) for i in sorted(counts)},
        "splits": splits,
        "rejects": {"total": len(rejects), "file": "rejects.tsv",
                    "by_kind": dict(sorted(Counter(r.kind for r in rejects).items()))},
    }


def format_summary(summary: dict) -> str:
    """The closing lines a prep run prints."""
    lines = [f"accepted {summary['accepted']:,} images, rejected {summary['rejected']:,} "
             f"(see {summary['out']}/rejects.tsv)"]
    for kind, n in summary["rejects_by_kind"].items():
        lines.append(f"  {n:>7,}  {kind:<15} {KINDS.get(kind, '')}")
    if summary.get("excluded"):
        e = summary["excluded"]
        lines.append(f"left out {e['identities']:,} identities ({e['images']:,} images) that {e['shards']} "
                     f"holds in {' and '.join(e['splits'])}")
    for s, d in summary["splits"].items():
        lines.append(f"{s:>5}: {d['identities']:,} identities, {d['samples']:,} samples "
                     f"({d['labelled']:,} labelled)")
    rate = summary["images_written"] / summary["write_s"] if summary["write_s"] > 0 else 0.0
    lines.append(f"{summary['num_classes']:,} classes; {summary['shards']} shards "
                 f"({summary['shards_written']} written, {summary['shards_kept']} already complete); "
                 f"{summary['images_written']:,} images in {summary['write_s']:.1f} s ({rate:.1f} img/s), "
                 f"total {summary['total_s']:.1f} s")
    return "\n".join(lines)
