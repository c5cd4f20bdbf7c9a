"""Reading a face folder: scan ``SRC/<identity>/<image>`` and accept or reject each file with a reason.

Several folders can be combined (``facesr prep LFW CELEBA OUT``): each is
named by its folder name, its identities become ``<name>/<identity>`` (two
sources may both hold a "George_W_Bush" who is not the same person) and its
paths ``<name>/<identity>/<file>``. One folder keeps plain names and paths.

Every file a prep run cannot use becomes a ``Reject`` (path relative to SRC,
kind, detail) instead of an exception, so one bad JPEG in 494,414 never stops
a run. ``KINDS`` is the closed list of reasons; ``rejects.tsv`` and the closing
summary count by it.
"""

from __future__ import annotations

import errno
import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facesr.degrade import DEFAULT, DegradeConfig
from facesr.imageio import FORMATS, ImageReadError, open_image

KINDS = {
    "stray-file": "file at the top level of SRC (expected only identity folders)",
    "hidden": "hidden entry (name starts with '.')",
    "empty-identity": "identity folder with no files",
    "not-a-file": "entry in an identity folder that is not a regular file (a folder, a device)",
    "unreadable": "the file cannot be opened or read (permissions, dangling symlink, I/O error)",
    "zero-byte": "empty file",
    "not-an-image": f"not an image in an accepted format ({', '.join(FORMATS)}), judged by content",
    "corrupt": "truncated or corrupt image data",
    "too-large": "more pixels than the reader's limit (facesr.imageio.MAX_PIXELS; a decompression bomb)",
    "greyscale": "single-channel image (mode L, 1, I, F)",
    "cmyk": "CMYK image",
    "alpha": "image with an alpha channel or transparency",
    "palette": "palette image (mode P)",
    "colour-mode": "other non-RGB colour mode (YCbCr, LAB, HSV)",
    "too-small": "shorter side under the hr crop",
}
GREY_MODES = {"1", "L", "I", "I;16", "I;16B", "I;16L", "F"}


@dataclass(frozen=True, order=True)
class Reject:
    path: str  # relative to SRC, '/'-separated
    kind: str  # a key of KINDS
    detail: str = ""


class Rejected(Exception):
    """An image that cannot become a sample; ``kind`` is a key of ``KINDS``."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind, self.detail = kind, detail


@dataclass
class Scan:
    candidates: list[tuple[str, str]]  # (identity, path relative to SRC), sorted by path
    rejects: list[Reject]  # what the scan alone can refuse (stray files, empty folders, ...)


Src = str | tuple[str, ...]  # one identity-folder root, or several combined


@functools.lru_cache(maxsize=16)  # source_file asks once per image: resolve each root once per process
def source_roots(src: Src) -> dict[str, str]:
    """label -> root folder: ``{"": root}`` for one source, ``{folder name: root}`` for several (do not mutate)."""
    if isinstance(src, (str, os.PathLike)):
        return {"": os.fspath(src)}
    if len(src) == 1:
        return {"": os.fspath(src[0])}
    roots: dict[str, str] = {}
    for root in src:
        label = Path(root).resolve().name
        if label in roots:
            raise ValueError(f"sources {roots[label]} and {root} share the folder name {label!r}, which names "
                             "their identities; rename or link one of them")
        roots[label] = os.fspath(root)
    return roots


def source_file(src: Src, rel: str) -> str:
    """The file behind a sample path (``scan``'s naming)."""
    roots = source_roots(src)
    if "" in roots:
        return os.path.join(roots[""], rel)
    label, rest = rel.split("/", 1)
    return os.path.join(roots[label], rest)


def scan(src: Src) -> Scan:
    """List ``SRC/<identity>/<file>`` of every source in a deterministic (sorted) order; refuse what is not a candidate."""
    roots = source_roots(src)
    if "" in roots:
        return _scan(roots[""])
    candidates, rejects = [], []
    for label, root in sorted(roots.items()):
        one = _scan(root)
        candidates += [(f"{label}/{i}", f"{label}/{p}") for i, p in one.candidates]
        rejects += [Reject(f"{label}/{r.path}", r.kind, r.detail) for r in one.rejects]
    return Scan(candidates, rejects)


def _kind(entry: os.DirEntry) -> str:
    """``dir``, ``file``, ``other`` (dangling link, device, FIFO) or the reason it cannot be known: following a
    link can fail (a symlink loop: ELOOP), which must reject that entry, not end the scan."""
    try:
        return "dir" if entry.is_dir() else "file" if entry.is_file() else "other"
    except OSError as exn:
        return f"{'symlink loop' if exn.errno == errno.ELOOP else 'cannot follow'}: {exn.strerror or exn}"


def _scan(src: str | os.PathLike) -> Scan:
    src = Path(src)
    candidates, rejects = [], []
    for top in sorted(os.scandir(src), key=lambda e: e.name):
        if top.name.startswith("."):
            rejects.append(Reject(top.name, "hidden"))
            continue
        kind = _kind(top)  # follows symlinks: a linked identity folder is fine
        if kind != "dir":
            rejects.append(Reject(top.name, "stray-file" if kind == "file" else "unreadable",
                                  "" if kind == "file" else "not a file or folder (dangling symlink?)"
                                  if kind == "other" else kind))
            continue
        try:
            entries = sorted(os.scandir(top.path), key=lambda e: e.name)
        except OSError as exn:
            rejects.append(Reject(top.name, "unreadable", exn.strerror or str(exn)))
            continue
        if not entries:
            rejects.append(Reject(top.name, "empty-identity"))
            continue
        for e in entries:
            rel = f"{top.name}/{e.name}"
            kind = _kind(e)
            if e.name.startswith("."):
                rejects.append(Reject(rel, "hidden"))
            elif kind == "dir":
                rejects.append(Reject(rel, "not-a-file", "a folder"))
            elif kind not in ("file", "other"):
                rejects.append(Reject(rel, "unreadable", kind))
            else:  # files, symlinks, specials: open_face finds out what they really are
                candidates.append((top.name, rel))
    return Scan(candidates, rejects)


def open_face(path: str | os.PathLike, cfg: DegradeConfig = DEFAULT) -> np.ndarray:
    """Decode one source image fully -> uint8 (H, W, 3) RGB, or raise ``Rejected`` saying why not.

    The file is read by ``facesr.imageio.open_image`` (formats by content, pixel limit, full decode, EXIF
    orientation); what it refuses keeps its kind here. Prep is stricter than ``facesr sr`` about colour: a
    training face must be stored as plain RGB, so other modes are rejected rather than converted.
    """
    try:
        img = open_image(path)
    except ImageReadError as exn:
        raise Rejected(exn.kind, exn.reason[:160]) from None
    mode = img.mode
    if mode == "P":
        raise Rejected("palette", f"mode {mode}")
    if "A" in mode or "transparency" in img.info:
        raise Rejected("alpha", f"mode {mode}")
    if mode == "CMYK":
        raise Rejected("cmyk", f"mode {mode}")
    if mode in GREY_MODES:
        raise Rejected("greyscale", f"mode {mode}")
    if mode != "RGB":
        raise Rejected("colour-mode", f"mode {mode}")
    w, h = img.size
    if min(w, h) < cfg.crop:
        raise Rejected("too-small", f"{w}x{h} < {cfg.crop}px crop")
    return np.asarray(img)  # (H, W, 3) uint8


def check_chunk(src: Src, paths: list[str], cfg: DegradeConfig = DEFAULT) -> list[tuple[str, str, str] | None]:
    """Ray/serial task: decode every path; ``None`` where accepted, else (path, kind, detail)."""
    out = []
    for rel in paths:
        try:
            open_face(source_file(src, rel), cfg)
            out.append(None)
        except Rejected as r:
            out.append((rel, r.kind, r.detail))
    return out


def tsv_field(s: str) -> str:
    """Escape a path or detail for one TSV cell of valid UTF-8: tabs, newlines and every other control character
    as ``\\t``, ``\\n``, ``\\xNN``; bytes of a name that are not UTF-8 (os.fsdecode's surrogates) as ``\\xNN``."""
    return "".join(_escape(c) for c in s)


def _escape(c: str) -> str:
    if c == "\\":
        return "\\\\"
    if c.isprintable():
        return c
    if "\udc80" <= c <= "\udcff":  # an undecodable byte of a file name
        return f"\\x{ord(c) - 0xDC00:02x}"
    return {"\t": "\\t", "\n": "\\n", "\r": "\\r"}.get(c) or c.encode("unicode_escape").decode("ascii")
