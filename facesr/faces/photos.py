"""`facesr sr` on photos: every face found (or given by ``--boxes``) super-resolved and pasted back.

Per input ``a.jpg`` it writes, under OUT (names by ``facesr.outputs``):

* ``a.png``: the photo enlarged (x8 bicubic, or ``--scale``) with each face replaced by the network's output;
* ``a-faces/<i>.png``: face i aligned, 192×192 (``<i>-lr.png``: the 24×24 it was given; with ``--compare``
  ``<i>-compare.png``: input, bicubic, facesr and the photo in the same framing);
* ``a.json``: the photo's size, the scale, each face's box, size (outer eye corners), scores, landmarks,
  where it was pasted, or why it failed; the smallest face the detectors find in this photo.

A photo with no face writes only its JSON (``"faces": []``, and why) and says so; a 24×24 input is taken as an
aligned face (the network's input) and written as its 192×192 output. A face that fails is reported and the
others of the photo are still written.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from ..imageio import ImageReadError, read_rgb
from ..infer import ModelOutputError, comparison_panel, write_png
from ..outputs import check_apart, check_links, list_inputs, output_names, shown, write_atomic
from .align import LR


class BoxesError(ValueError):
    """A --boxes file that cannot be used: the message names the file and the entry."""


def read_boxes(path: str | Path, src: Path, files: list[Path]) -> dict[Path, list[tuple[float, ...]]]:
    """input -> its boxes, from JSON: a list of [left, top, right, bottom] (IN is one photo), or an object
    mapping a photo (path relative to IN, or its name) to such a list."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BoxesError(f"{shown(path)}: not a readable JSON boxes file ({type(e).__name__}: {str(e)[:120]})")
    if isinstance(data, list):
        if len(files) != 1:
            raise BoxesError(f"{shown(path)}: a bare list of boxes needs IN to be one photo; map photo names to "
                             "their boxes instead ({\"a.jpg\": [[l, t, r, b]]})")
        data = {files[0].name: data}
    if not isinstance(data, dict):
        raise BoxesError(f"{shown(path)}: expected a list of boxes or an object of photo -> boxes")
    root = src if src.is_dir() else src.parent
    by_key = {}
    for f in files:
        by_key.setdefault(f.relative_to(root).as_posix(), f)
        by_key.setdefault(f.name, f)
    out: dict[Path, list[tuple[float, ...]]] = {}
    for key, boxes in data.items():
        if key not in by_key:
            raise BoxesError(f"{shown(path)}: {shown(repr(key)[:80])} names no photo in {shown(src)}")
        if not isinstance(boxes, list):
            raise BoxesError(f"{shown(path)}: {shown(repr(key)[:80])}: expected a list of [left, top, right, bottom]")
        for i, b in enumerate(boxes):
            ok = (isinstance(b, list) and len(b) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                              and math.isfinite(v) for v in b))
            if not ok or b[2] <= b[0] or b[3] <= b[1]:
                raise BoxesError(f"{shown(path)}: {shown(repr(key)[:80])} box {i}: {shown(repr(b)[:80])} is not "
                                 "[left, top, right, bottom] with right > left and bottom > top")
        out[by_key[key]] = [tuple(float(v) for v in b) for b in boxes]
    return out


@dataclass
class PhotoReport:
    written: list[Path] = field(default_factory=list)  # every file written (PNGs and JSONs)
    photos: int = 0  # photos with at least one face written
    faces: int = 0  # faces written
    no_face: list[Path] = field(default_factory=list)  # photos where none was found
    failed: list[tuple[Path, int, str]] = field(default_factory=list)  # (photo, face index, why)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (input, reason) not read


def _plus(stem: Path, ext: str) -> Path:
    """``stem`` + ``ext``; not ``with_suffix``, which would eat the ``.png`` of a colliding name like ``a.png``."""
    return stem.parent / f"{stem.name}{ext}"


def _panel(face) -> Image.Image:
    """The 24x24 input, its bicubic x8 and the network's x8, side by side."""
    lr = torch.from_numpy(face.lr).permute(2, 0, 1)[None].float() / 255
    sr = torch.from_numpy(face.sr).permute(2, 0, 1)[None].float() / 255
    return comparison_panel(lr, sr, None)


def enhance_photos(upscaler, src: str | Path, out: str | Path, *, boxes_file: str | Path | None = None,
                   scale: float = 8.0, compare: bool = False,
                   log: Callable[[str], None] = print) -> PhotoReport:
    """Run ``upscaler.enhance`` on ``src`` (a photo or a folder of them) and write the results under ``out``."""
    src, out = Path(src), Path(out)
    files = list_inputs(src)
    if src.is_file() and out.suffix.lower() == ".png":  # OUT names the picture; the rest goes beside it
        stems, out = {src: out.with_suffix("")}, out.parent
    else:
        stems = {f: out / n for f, n in output_names(src, files).items()}
    planned = [p.parent / f"{p.name}{ext}" for p in stems.values() for ext in (".png", ".json", "-faces/0.png")]
    check_apart(src, out, planned)
    check_links(out, planned)
    boxes = read_boxes(boxes_file, src, files) if boxes_file else {}
    report = PhotoReport()
    for f in files:
        try:
            img = read_rgb(f)  # (3, H, W) uint8
        except ImageReadError as e:
            report.skipped.append((f, str(e)))
            log(f"skipped {shown(str(e))}")
            continue
        stem = stems[f]
        if tuple(img.shape[1:]) == (LR, LR) and f not in boxes:  # already the network's input
            sr = upscaler.faces(img[None])[0].cpu()
            write_png(sr, _plus(stem, ".png"), out)
            report.written.append(_plus(stem, ".png"))
            report.photos, report.faces = report.photos + 1, report.faces + 1
            continue
        photo = img.permute(1, 2, 0).numpy()
        try:
            result = upscaler.enhance(photo, boxes.get(f), scale)
        except ModelOutputError:
            raise  # the model's fault: every photo would fail the same way
        except (ValueError, RuntimeError, MemoryError) as e:  # this photo's; the others go on
            report.skipped.append((f, str(e)))
            log(f"skipped {shown(str(f))}: {shown(str(e))}")
            continue
        _write_photo(f, stem, out, photo, result, report, compare, f in boxes, log)
    return report


def _write_photo(f: Path, stem: Path, out: Path, photo: np.ndarray, result, report: PhotoReport, compare: bool,
                 given: bool, log: Callable[[str], None]) -> None:
    h, w = photo.shape[:2]
    faces_dir = stem.parent / f"{stem.name}-faces"
    written = []
    for i, face in enumerate(result.faces):
        if face.sr is not None:
            try:
                write_png(Image.fromarray(face.sr), faces_dir / f"{i}.png", out)
                write_png(Image.fromarray(face.lr), faces_dir / f"{i}-lr.png", out)
                written += [faces_dir / f"{i}.png", faces_dir / f"{i}-lr.png"]
                if compare:
                    write_png(_panel(face), faces_dir / f"{i}-compare.png", out)
                    written.append(faces_dir / f"{i}-compare.png")
            except (OSError, ValueError) as e:
                face.error = f"not written: {e}"
        if face.error:
            report.failed.append((f, i, face.error))
            log(f"warning: {shown(f)}: face {i}: {shown(face.error)}")
    ok = [face for face in result.faces if face.error is None and face.sr is not None]
    smaller = [i for i, face in enumerate(result.faces)
               if face.eye_px is not None and face.eye_px < result.detectable_eye_px]
    notes = list(result.notes)
    if not result.faces and given:
        notes.append("no boxes given for this photo in the boxes file")
    elif not result.faces:
        notes.append(f"no face found: the detectors find faces from about {result.detectable_eye_px:.1f} px between "
                     "the outer eye corners in this photo; give smaller ones with --boxes FILE")
    elif smaller and given:
        notes.append(f"faces {smaller} are smaller than the detectors find here (about "
                     f"{result.detectable_eye_px:.1f} px between the outer eye corners): boxes given by the user")
    if ok and result.image is not None:
        write_png(Image.fromarray(result.image), _plus(stem, ".png"), out)
        written.insert(0, _plus(stem, ".png"))
    summary = {"photo": f.name, "size": [w, h], "scale": result.scale,
               "detectable_eye_px": round(result.detectable_eye_px, 2),
               "boxes": "given" if given else "detected", "faces": [face.summary() for face in result.faces],
               "outputs": [p.relative_to(out).as_posix() for p in written], "notes": notes}
    blob = (json.dumps(summary, indent=1) + "\n").encode()
    write_atomic(_plus(stem, ".json"), lambda fh: fh.write(blob), out)
    report.written += written + [_plus(stem, ".json")]
    report.faces += len(ok)
    report.photos += bool(ok)
    for note in notes:
        log(f"{shown(f)}: {note}")
    if not result.faces:
        report.no_face.append(f)
    else:
        sizes = ", ".join(f"{face.eye_px:.1f}" for face in result.faces if face.eye_px is not None)
        log(f"{shown(f)}: {len(ok)} of {len(result.faces)} faces super-resolved (outer eye corners {sizes} px)")
