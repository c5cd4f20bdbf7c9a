"""Baseline JPEG round trip (encode + decode) as batched integer torch ops, each image at its own quality.

Why not libjpeg/nvjpeg (``torchvision.io``): an encoded image's length is data-dependent, so nvjpeg hands it to
the host, and the decode needs those bytes back: every compressed micro-batch made the GPU wait twice. This is
libjpeg-turbo's arithmetic with the defaults torchvision's ``encode_jpeg`` + ``decode_jpeg`` use, step by step:

* RGB <-> YCbCr in libjpeg's 16-bit fixed point (``jccolor.c``, ``jdcolor.c``);
* 4:2:0 chroma: 2x2 sums with the alternating 1, 2 rounding bias (``jcsample.c``), edges replicated where
  libjpeg replicates them (full-resolution columns, chroma rows: ``jcprepct.c``); decoded with the "fancy"
  triangle upsampling (``jdsample.c``: 3/4 nearer + 1/4 farther sample per axis, biases 8 and 7);
* the integer ``islow`` DCT and IDCT (``jfdctint.c``, ``jidctint.c``) and libjpeg-turbo's reciprocal quantiser
  (``jcdctmgr.c``), with the Annex K tables scaled as ``jpeg_set_quality(q, force_baseline=TRUE)``.

Entropy coding is lossless and not modelled. The decoded pixels equal libjpeg-turbo's bit for bit
(tests/test_jpeg.py: real faces and noise, qualities 1-100, odd sizes), so a model trains on the JPEG artefacts
it trained on before. Images need sides of at least 5 px (libjpeg upsamples narrower chroma by repetition).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# Annex K.1 / K.2 quantisation tables (natural order), libjpeg's std_luminance/chrominance_quant_tbl
LUMA = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99], dtype=np.int64).reshape(8, 8)
CHROMA = np.array([
    17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99, 24, 26, 56, 99, 99, 99, 99, 99,
    47, 66, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99], dtype=np.int64).reshape(8, 8)

SCALEBITS = 16  # libjpeg's colour conversion fixed point
HALF = 1 << (SCALEBITS - 1)


def _fix(x: float) -> int:
    return int(x * (1 << SCALEBITS) + 0.5)


def quant_tables(quality) -> np.ndarray:
    """(B, 2, 8, 8) luma and chroma tables for each quality 1..100, as ``jpeg_set_quality(q, force_baseline=TRUE)``."""
    q = np.clip(np.asarray(quality, dtype=np.int64), 1, 100)
    scale = np.where(q < 50, 5000 // q, 200 - 2 * q)[:, None, None, None]  # jpeg_quality_scaling
    base = np.stack([LUMA, CHROMA])[None]  # (1, 2, 8, 8)
    return np.clip((base * scale + 50) // 100, 1, 255)


# libjpeg's islow DCT constants: FIX(x) = round(x * 2^13)
CONST_BITS, PASS1_BITS = 13, 2
C = {v: int(float(v) * (1 << CONST_BITS) + 0.5) for v in (
    "0.298631336", "0.390180644", "0.541196100", "0.765366865", "0.899976223", "1.175875602",
    "1.501321110", "1.847759065", "1.961570560", "2.053119869", "2.562915447", "3.072711026")}


def _descale(x: torch.Tensor, n: int) -> torch.Tensor:
    return (x + (1 << (n - 1))) >> n


def _odd(t4, t5, t6, t7):
    """The odd part of libjpeg's islow (Loeffler-Ligtenberg-Moschytz) butterfly, shared by both directions."""
    z1, z2, z3, z4 = t4 + t7, t5 + t6, t4 + t6, t5 + t7
    z5 = (z3 + z4) * C["1.175875602"]
    t4, t5 = t4 * C["0.298631336"], t5 * C["2.053119869"]
    t6, t7 = t6 * C["3.072711026"], t7 * C["1.501321110"]
    z1, z2 = z1 * -C["0.899976223"], z2 * -C["2.562915447"]
    z3, z4 = z3 * -C["1.961570560"] + z5, z4 * -C["0.390180644"] + z5
    return t4 + z1 + z3, t5 + z2 + z4, t6 + z2 + z3, t7 + z1 + z4


def _fdct_1d(x: torch.Tensor, first: bool) -> torch.Tensor:
    """jfdctint.c along the last axis (int64, 8 samples); ``first``: the row pass (scaled by 2^PASS1_BITS)."""
    d = x.unbind(-1)
    t0, t7, t1, t6 = d[0] + d[7], d[0] - d[7], d[1] + d[6], d[1] - d[6]
    t2, t5, t3, t4 = d[2] + d[5], d[2] - d[5], d[3] + d[4], d[3] - d[4]
    t10, t13, t11, t12 = t0 + t3, t0 - t3, t1 + t2, t1 - t2
    n = CONST_BITS - PASS1_BITS if first else CONST_BITS + PASS1_BITS
    out0 = (t10 + t11) << PASS1_BITS if first else _descale(t10 + t11, PASS1_BITS)
    out4 = (t10 - t11) << PASS1_BITS if first else _descale(t10 - t11, PASS1_BITS)
    z1 = (t12 + t13) * C["0.541196100"]
    out2 = _descale(z1 + t13 * C["0.765366865"], n)
    out6 = _descale(z1 - t12 * C["1.847759065"], n)
    o7, o5, o3, o1 = (_descale(v, n) for v in _odd(t4, t5, t6, t7))
    return torch.stack([out0, o1, out2, o3, out4, o5, out6, o7], -1)


def _idct_1d(x: torch.Tensor, first: bool) -> torch.Tensor:
    """jidctint.c along the last axis (int64 coefficients, dequantised); ``first``: the column pass."""
    d = x.unbind(-1)
    z1 = (d[2] + d[6]) * C["0.541196100"]
    t2, t3 = z1 - d[6] * C["1.847759065"], z1 + d[2] * C["0.765366865"]
    t0, t1 = (d[0] + d[4]) << CONST_BITS, (d[0] - d[4]) << CONST_BITS
    t10, t13, t11, t12 = t0 + t3, t0 - t3, t1 + t2, t1 - t2
    o0, o1, o2, o3 = _odd(d[7], d[5], d[3], d[1])  # i0..i3 = y7, y5, y3, y1
    n = CONST_BITS - PASS1_BITS if first else CONST_BITS + PASS1_BITS + 3
    outs = [t10 + o3, t11 + o2, t12 + o1, t13 + o0, t13 - o0, t12 - o1, t11 - o2, t10 - o3]
    return torch.stack([_descale(v, n) for v in outs], -1)


def _reciprocals(divisor: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """libjpeg-turbo's quantiser: x / divisor rounded as ((x + corr) * recip) >> shift (jcdctmgr.c)."""
    d = divisor.astype(np.int64)
    b = np.floor(np.log2(d)).astype(np.int64)
    r = 16 + b
    fq, fr = (np.int64(1) << r) // d, (np.int64(1) << r) % d
    c = d // 2
    pow2 = fr == 0
    fq, r = np.where(pow2, fq >> 1, fq), np.where(pow2, r - 1, r)
    c = np.where(~pow2 & (fr <= d // 2), c + 1, c)
    fq = np.where(~pow2 & (fr > d // 2), fq + 1, fq)
    return fq, c, r


def codec_tables(quality) -> np.ndarray:
    """(B, 2, 4, 8, 8) int64 for each quality 1..100: for luma and chroma, the quantisation table and its
    quantiser's (multiplier, correction, shift); computed on the host, uploaded once per batch."""
    tables = quant_tables(quality)  # (B, 2, 8, 8)
    fq, c, r = _reciprocals(tables << 3)  # islow leaves coefficients scaled by 8
    return np.stack([tables, fq, c, r], 2)


def _blocks(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W) -> (B, H/8, W/8, 8, 8)."""
    b, h, w = x.shape
    return x.reshape(b, h // 8, 8, w // 8, 8).transpose(2, 3)


def _unblocks(x: torch.Tensor) -> torch.Tensor:
    b, bh, bw = x.shape[:3]
    return x.transpose(2, 3).reshape(b, bh * 8, bw * 8)


def _code(plane: torch.Tensor, codec: torch.Tensor) -> torch.Tensor:
    """One component (B, H, W) of 0..255 int64 samples (H, W multiples of 8) through libjpeg's islow FDCT,
    quantisation, dequantisation and islow IDCT, with each image's table and quantiser ``codec`` (B, 4, 8, 8)."""
    x = _blocks(plane - 128)  # (B, H/8, W/8, 8, 8) rows along the last axis
    x = _fdct_1d(_fdct_1d(x, True).transpose(-1, -2), False).transpose(-1, -2)  # rows, then columns
    table, fq, corr, shift = (codec[:, i, None, None] for i in range(4))  # (B, 1, 1, 8, 8)
    q = ((x.abs() + corr) * fq) >> shift
    coef = torch.where(x < 0, -q, q) * table  # dequantised
    y = _idct_1d(_idct_1d(coef.transpose(-1, -2), True).transpose(-1, -2), False)  # columns, then rows
    return _unblocks(y + 128).clamp(0, 255)


def _fancy_up(c: torch.Tensor) -> torch.Tensor:
    """libjpeg's h2v2 fancy upsampling of (B, h, w) integer samples -> (B, 2h, 2w), edges replicated."""
    p = F.pad(c[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]  # (B, h + 2, w + 2)
    up, mid, down = p[:, :-2], p[:, 1:-1], p[:, 2:]
    rows = torch.stack([3 * mid + up, 3 * mid + down], 2).flatten(1, 2)  # (B, 2h, w + 2): colsums, top row first
    left, centre, right = rows[..., :-2], rows[..., 1:-1], rows[..., 2:]
    even = torch.div(3 * centre + left + 8, 16, rounding_mode="floor")
    odd = torch.div(3 * centre + right + 7, 16, rounding_mode="floor")
    return torch.stack([even, odd], -1).flatten(-2)  # (B, 2h, 2w)


def jpeg_round_trip(u8: torch.Tensor, quality) -> torch.Tensor:
    """(B, 3, H, W) uint8 RGB -> the same after baseline 4:2:0 JPEG at ``quality`` (B host ints, 1..100; each
    image its own), uint8 on u8's device. Sizes need not be multiples of 16: edges are replicated, as libjpeg's."""
    b, _, h, w = u8.shape
    codec = torch.from_numpy(codec_tables(quality)).to(u8.device, non_blocking=True)  # (B, 2, 4, 8, 8)
    x = u8.to(torch.int64)
    r, g, bl = x[:, 0], x[:, 1], x[:, 2]
    y = (_fix(0.299) * r + _fix(0.587) * g + _fix(0.114) * bl + HALF) >> SCALEBITS
    offset = (128 << SCALEBITS) + HALF - 1
    cb = (-_fix(0.16874) * r - _fix(0.33126) * g + _fix(0.5) * bl + offset) >> SCALEBITS
    cr = (_fix(0.5) * r - _fix(0.41869) * g - _fix(0.08131) * bl + offset) >> SCALEBITS
    # edges replicated as libjpeg does: full-resolution columns to whole MCUs (16 px) and rows to an even count
    # before the 4:2:0 means, then the chroma rows to whole blocks (jcsample.c, jcprepct.c)
    ph, pw = -h % 2, -w % 16
    ycc = F.pad(torch.stack([y, cb, cr], 1).float(), (0, pw, 0, ph), mode="replicate").to(torch.int64)
    hh, ww = h + ph, w + pw
    # 4:2:0: sum of each 2x2 plus a bias alternating 1, 2 along the row, / 4 (h2v2_downsample)
    bias = 1 + torch.arange(ww // 2, device=u8.device) % 2
    chroma = (ycc[:, 1:].reshape(b, 2, hh // 2, 2, ww // 2, 2).sum((3, 5)) + bias) >> 2  # (B, 2, hh/2, ww/2)
    chroma = F.pad(chroma.float(), (0, 0, 0, -(hh // 2) % 8), mode="replicate").to(torch.int64)
    luma = F.pad(y[:, None].float(), (0, -w % 8, 0, -h % 8), mode="replicate")[:, 0].to(torch.int64)
    yd = _code(luma, codec[:, 0])[:, :h, :w]
    ch, cw = chroma.shape[-2:]
    cd = _code(chroma.reshape(b * 2, ch, cw), codec[:, 1].repeat_interleave(2, 0))
    cd = cd.reshape(b, 2, ch, cw)[:, :, : (h + 1) // 2, : (w + 1) // 2]  # the image's own samples
    cb_up, cr_up = (_fancy_up(cd[:, i])[:, :h, :w] - 128 for i in range(2))
    red = yd + ((_fix(1.402) * cr_up + HALF) >> SCALEBITS)
    green = yd + ((-_fix(0.34414) * cb_up - _fix(0.71414) * cr_up + HALF) >> SCALEBITS)
    blue = yd + ((_fix(1.772) * cb_up + HALF) >> SCALEBITS)
    return torch.stack([red, green, blue], 1).clamp(0, 255).to(torch.uint8)
