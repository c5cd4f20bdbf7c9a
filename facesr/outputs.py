"""Where `facesr sr` reads and writes: inputs listed with nothing dropped silently, output names that never
collide, OUT kept apart from IN, writes that never follow a link planted in OUT, names printed escaped.

* ``list_inputs`` walks IN without following links to folders (a loop cannot trap it) and returns every
  non-folder entry, FIFOs, devices and links to folders included, so the image reader refuses each with a
  ``skipped`` line instead of it vanishing.
* ``output_names`` gives each input its output stem: ``a.jpg`` -> ``a``, but when two inputs of one folder
  share a stem (``a.jpg``, ``a.png``) both keep their extension (``a.jpg``, ``a.png``), so neither overwrites
  the other.
* ``check_apart`` refuses OUT = IN, OUT inside IN (the outputs would mix with, and be read back as, inputs)
  and an output path that is an input file.
* ``write_atomic`` writes a temporary file inside the destination folder (``O_EXCL``: never an existing
  name or link) and renames it over the destination: a symlink planted at the destination is replaced, not
  followed. Folders under OUT are created one by one, and one that is a link is refused.
* ``shown`` escapes control characters and undecodable bytes in a name, so a file name cannot forge a line.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections import Counter
from pathlib import Path


class OutputError(ValueError):
    """OUT cannot be written as asked (inside IN, a link planted in it): the message names the path."""


def shown(text: str | os.PathLike) -> str:
    """``text`` with control characters, and bytes that were not UTF-8, written as escapes (\\n, \\x1b, \\udcff)."""
    out = []
    for c in os.fspath(text):
        if c.isprintable() and not 0xD800 <= ord(c) <= 0xDFFF:
            out.append(c)
        else:
            out.append(c.encode("unicode_escape", "backslashreplace").decode("ascii")
                       if ord(c) < 0xD800 else f"\\u{ord(c):04x}")
    return "".join(out)


def list_inputs(src: str | Path) -> list[Path]:
    """``src`` itself, or every entry under it that is not a folder (hidden names skipped), sorted."""
    src = Path(src)
    try:
        st = src.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"{shown(src)}: no such file or folder") from None
    if not stat.S_ISDIR(st.st_mode):
        return [src]
    found, stack = [], [src]
    while stack:
        folder = stack.pop()
        with os.scandir(folder) as it:
            for e in it:
                if e.name.startswith("."):
                    continue
                if e.is_dir(follow_symlinks=False):
                    stack.append(Path(e.path))
                else:  # files, links (to folders too), FIFOs, devices: the reader decides, with a reason
                    found.append(Path(e.path))
    return sorted(found)


def output_names(src: Path, files: list[Path]) -> dict[Path, Path]:
    """input -> output path relative to OUT, without suffix; unique even when stems collide in a folder."""
    root = src if src.is_dir() else src.parent
    rel = {f: f.relative_to(root) for f in files}
    stems = Counter(r.with_suffix("") for r in rel.values())
    names = {f: r.with_suffix("") if stems[r.with_suffix("")] == 1 else r for f, r in rel.items()}
    groups: dict[Path, list[Path]] = {}
    for f, n in names.items():
        groups.setdefault(n, []).append(f)
    for n, same in groups.items():  # a.jpg.bmp beside a.jpg and a.png: still distinct, by a number
        if len(same) > 1:
            for i, f in enumerate(sorted(same)):
                names[f] = n.with_name(f"{n.name}-{i}")
    return names


def check_apart(src: Path, out: Path, outputs: list[Path] = ()) -> None:
    """Refuse OUT = IN, OUT inside the folder IN, and any output that is an existing input file."""
    s, o = src.resolve(), out.resolve()
    if src.is_dir() and (o == s or s in o.parents):
        raise OutputError(f"{shown(out)}: OUT is {'IN' if o == s else 'inside IN'} ({shown(src)}); "
                          "the outputs would mix with the inputs: give a folder outside IN")
    for p in outputs:
        if p.exists() and (p.resolve() == s or (src.is_dir() and s in p.resolve().parents)):
            raise OutputError(f"{shown(p)}: this output would overwrite an input; give another OUT")


def check_links(out: Path, paths: list[Path]) -> None:
    """Before any work: refuse when a folder on the way from OUT to an output is a link (planted to send the
    writes elsewhere). A link at an output file itself is harmless: ``write_atomic`` replaces it."""
    seen: set[Path] = set()
    for p in paths:
        for folder in reversed(p.relative_to(out).parents[:-1]):  # a, a/b, ... (not OUT itself)
            cur = out / folder
            if cur not in seen:
                seen.add(cur)
                if cur.is_symlink():
                    raise OutputError(f"{shown(cur)}: a link inside OUT; outputs are never written through one")


def make_dirs(out: Path, folder: Path) -> None:
    """Create ``folder`` (inside ``out``) one level at a time; a level that exists as a link is refused."""
    rel = folder.relative_to(out)
    cur = out
    out.mkdir(parents=True, exist_ok=True)
    for part in rel.parts:
        cur = cur / part
        if cur.is_symlink():
            raise OutputError(f"{shown(cur)}: a link inside OUT; not followed")
        cur.mkdir(exist_ok=True)


def write_atomic(path: Path, write, out: Path) -> None:
    """``write(file_object)`` into a temporary file beside ``path``, then rename it to ``path``."""
    make_dirs(out, path.parent)
    fd, tmp = tempfile.mkstemp(prefix=".facesr-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
