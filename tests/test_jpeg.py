"""facesr.jpeg: the device-side JPEG round trip equals torchvision's libjpeg-turbo encode + decode, bit for bit."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

from facesr.degrade import crop_hr, degrade, to_uint8
from facesr.jpeg import jpeg_round_trip, quant_tables
from facesr.syncs import SyncCounter

from .conftest import LFW


def _libjpeg(u8: torch.Tensor, qualities) -> torch.Tensor:
    with warnings.catch_warnings():  # torchvision flags its codecs as deprecated (torchcodec); they work
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.stack([decode_jpeg(encode_jpeg(im.contiguous(), quality=int(q)), mode=ImageReadMode.RGB)
                            for im, q in zip(u8, qualities)])


@pytest.fixture(scope="module")
def faces_lr() -> torch.Tensor:
    """24 real LFW faces as the paper's 24x24 lr, uint8."""
    paths = sorted(LFW.glob("*/*.jpg"))[::400][:24]
    imgs = np.stack([np.array(Image.open(p).convert("RGB")) for p in paths])
    return to_uint8(degrade(crop_hr(torch.from_numpy(imgs).permute(0, 3, 1, 2)))["lr"])


@pytest.mark.parametrize("quality", [1, 10, 40, 50, 75, 95, 100])
def test_equals_libjpeg_on_real_faces(faces_lr, quality):
    """At each quality, every decoded pixel of 24 real faces equals libjpeg-turbo's (torchvision)."""
    qs = [quality] * len(faces_lr)
    assert torch.equal(jpeg_round_trip(faces_lr, qs), _libjpeg(faces_lr, qs))


@pytest.mark.parametrize("size", [(24, 24), (23, 21), (17, 40), (8, 8), (33, 9)])
def test_equals_libjpeg_on_noise_of_any_size_with_a_quality_per_image(size):
    """Uniform noise (the hardest case for the quantiser and the clamps), sizes not multiple of the 16-px MCU,
    six images at six qualities in one call: identical to libjpeg-turbo."""
    g = torch.Generator().manual_seed(sum(size))
    x = torch.randint(0, 256, (6, 3, *size), generator=g, dtype=torch.uint8)
    qs = [1, 13, 40, 77, 95, 100]
    assert torch.equal(jpeg_round_trip(x, qs), _libjpeg(x, qs))


def test_quality_tables_follow_jpeg_set_quality():
    """Quality 50 is the Annex K table itself, 100 is all ones, and tables are clamped to 1..255 (baseline)."""
    t = quant_tables([50, 100, 1])
    assert t[0, 0, 0, 0] == 16 and t[0, 1, 0, 0] == 17 and (t[1] == 1).all() and t[2].max() == 255


def test_reads_nothing_back():
    """The round trip makes no call that would wait for a device (the tables go up, nothing comes back)."""
    x = torch.randint(0, 256, (4, 3, 24, 24), dtype=torch.uint8)
    with SyncCounter() as c:
        jpeg_round_trip(x, np.array([40, 60, 80, 95]))
    assert c.total == 0, c.where
