"""Reading a user's image file: the one reader behind prep, `facesr sr`, eval, identity and the demo.

Every file a user points us at goes through ``open_image`` (prep, which keeps
its own colour-mode policy) or ``read_rgb`` (everything else). The rules:

* **Formats by content, from an allowlist** (``FORMATS``): PIL tries only these
  decoders, on the file's bytes, whatever the file is called. PIL's other
  plugins never see the data — EPS/PostScript above all, which PIL renders by
  running Ghostscript; a PostScript file named ``face.png`` is "not an image".
* **A pixel-count limit per call** (``max_pixels``, default ``MAX_PIXELS``),
  checked on the header's size before any pixel is decoded, so a decompression
  bomb (a few bytes declaring 30000×30000) is refused with a message, not a
  PIL warning or an out-of-memory kill. PIL's global ``MAX_IMAGE_PIXELS`` is
  neither read nor written here (were another module to lower it, PIL's own
  refusal is reported the same way).
* **Fully decoded**: a truncated or corrupt file is refused here, never padded
  with grey (``ImageFile.LOAD_TRUNCATED_IMAGES`` is never set).
* **EXIF orientation applied** (``ImageOps.exif_transpose``): a phone photo
  stored sideways comes out upright.
* **To RGB** (``to_rgb``, used by ``read_rgb``): RGB as stored; greyscale
  (1, L) repeated over three channels; 16-bit samples scaled to 8 bit by
  keeping their high byte (v // 256: 65535 → 255, 32768 → 128, not clipped at
  255) — what PIL itself does for 16-bit RGB PNGs, so 16-bit greyscale (I;16*,
  and I taken as 16-bit, values outside 0..65535 clipped) and RGB agree; palette,
  CMYK (PIL's plain formula, no ICC colour management), YCbCr, HSV and LAB by
  PIL's ``convert``; anything with alpha or a transparent colour (RGBA, LA,
  PA, P or L/RGB with ``transparency``) composited over black, so hidden
  colour under transparent pixels never shows. Float images (mode F) have no
  agreed brightness range and are refused.

Refusals raise ``ImageReadError``: a ``ValueError`` whose message is
``"<path>: <reason>"``, with ``kind`` (a key of prep's rejects vocabulary:
``unreadable``, ``not-a-file``, ``zero-byte``, ``not-an-image``, ``corrupt``,
``too-large``, ``colour-mode``) and ``reason`` for callers that tabulate.
"""

from __future__ import annotations

import errno
import os
import stat
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

# Decoders PIL may use, chosen by the file's content. Plain raster formats only.
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")
# PIL's own default bomb threshold (~89.5 Mpx, 0.25 GiB as RGB): far above any face photo, below an OOM.
MAX_PIXELS = 89_478_485
SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


class ImageReadError(ValueError):
    """A file the reader refuses: ``str(e)`` is ``"<path>: <reason>"``; ``kind`` says which rule refused it."""

    def __init__(self, path: str | os.PathLike, kind: str, reason: str):
        super().__init__(f"{os.fspath(path)}: {reason}")
        self.path, self.kind, self.reason = os.fspath(path), kind, reason


def _decode_error(path: str, exn: Exception) -> ImageReadError:
    if isinstance(exn, OSError) and exn.errno in (errno.EACCES, errno.EIO):
        return ImageReadError(path, "unreadable", exn.strerror or str(exn))
    msg = str(exn)
    if "truncated" in msg.lower():
        return ImageReadError(path, "corrupt", f"truncated image data ({msg[:100]})")
    return ImageReadError(path, "corrupt", f"corrupt image data ({type(exn).__name__}: {msg[:100]})")


def open_image(path: str | os.PathLike, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open, check and fully decode one image file, upright, in its stored mode; raise ``ImageReadError`` if refused."""
    path = os.fspath(path)
    try:
        st = os.stat(path)  # follows symlinks
    except FileNotFoundError:
        why = "dangling symlink" if os.path.islink(path) else "no such file"
        raise ImageReadError(path, "unreadable", why) from None
    except OSError as exn:
        raise ImageReadError(path, "unreadable", exn.strerror or str(exn)) from None
    if not stat.S_ISREG(st.st_mode):  # never open a FIFO: reading it would block forever
        raise ImageReadError(path, "not-a-file", "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file")
    if st.st_size == 0:
        raise ImageReadError(path, "zero-byte", "empty file")
    try:
        f = open(path, "rb")
    except OSError as exn:
        raise ImageReadError(path, "unreadable", exn.strerror or str(exn)) from None
    with f:
        try:
            with warnings.catch_warnings():  # our limit below decides, with our message
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(f, formats=FORMATS)
        except UnidentifiedImageError:
            raise ImageReadError(path, "not-an-image", f"not an image in an accepted format ({', '.join(FORMATS)}; "
                                                       "judged by content, not by name)") from None
        except Image.DecompressionBombError as exn:  # PIL's global limit, if someone lowered it under ours
            raise ImageReadError(path, "too-large", f"over the pixel limit, a decompression bomb? ({exn})") from None
        except Exception as exn:  # PIL raises assorted errors on malformed headers
            raise _decode_error(path, exn) from None
        w, h = img.size
        if w * h > max_pixels:
            raise ImageReadError(path, "too-large", f"{w}x{h} is {w * h:,} pixels, over the limit of {max_pixels:,} "
                                                    "(a decompression bomb?)")
        try:
            img.load()  # full decode: truncated files fail here, not at open
            return ImageOps.exif_transpose(img)  # a loaded copy, upright; independent of f
        except Exception as exn:
            raise _decode_error(path, exn) from None


def to_rgb(img: Image.Image, path: str | os.PathLike = "<image>") -> np.ndarray:
    """A decoded image in any mode -> uint8 (H, W, 3) RGB by the rules in the module docstring."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return np.asarray(img)
    if mode in SIXTEEN_BIT:
        v = np.asarray(img)  # (H, W) uint16 (I;16*) or int32 (I); no wider copy: a 9450² image is 179 MB as uint16
        if v.dtype != np.uint16:
            v = v.clip(0, 65535)
        grey = (v >> 8).astype(np.uint8)  # the high byte, as PIL decodes 16-bit RGB
        return np.broadcast_to(grey[:, :, None], (*grey.shape, 3))  # a view; read_rgb makes the one copy
    if mode == "F":
        raise ImageReadError(path, "colour-mode", "32-bit float pixels (mode F): no agreed brightness range")
    try:
        if mode in ALPHA_MODES or "transparency" in img.info:
            rgba = np.asarray(img.convert("RGBA")).astype(np.uint16)  # (H, W, 4)
            rgb, a = rgba[:, :, :3], rgba[:, :, 3:]
            return ((rgb * a + 127) // 255).astype(np.uint8)  # over black
        return np.asarray(img.convert("RGB"))
    except ValueError as exn:  # a mode PIL cannot convert
        raise ImageReadError(path, "colour-mode", f"mode {mode} cannot be converted to RGB ({exn})") from None


def read_rgb(path: str | Path, *, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """An image file -> uint8 (3, H, W) RGB, upright. Raises ``ImageReadError`` naming the file and the reason."""
    arr = to_rgb(open_image(path, max_pixels=max_pixels), path)  # (H, W, 3)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)  # (3, H, W)
