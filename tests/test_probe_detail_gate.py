"""The issue-25 probe `launch/probe_detail_gate.py`: the gated output is bicubic plus the predicted strength times
the correction, per face, clamped to [0, 1], the same full and deployed; the gate sees only the 24² input."""

from __future__ import annotations

import torch

from facesr.quality import upscale
from launch.probe_detail_gate import Gated, make_gate
from tests.test_detail import _drawing


class _Fixed(torch.nn.Module):
    """A gate answering a given strength for each face of the batch."""

    def __init__(self, values):
        super().__init__()
        self.values = torch.tensor(values).view(-1, 1)

    def forward(self, x):
        return self.values


def test_each_face_gets_its_own_clamped_strength():
    net = _drawing().eval()
    lr = torch.rand(3, 3, 24, 24, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = net(lr)["hr"]
    bic = upscale(lr, 192, "bicubic")
    gated = Gated(net, _Fixed([0.5, 2.0, -1.0]), k=0.8)
    out = gated(lr)["hr"]
    for i, d in enumerate([0.4, 1.0, 0.0]):  # k x prediction, clamped to [0, 1]
        torch.testing.assert_close(out[i], bic[i] + d * (full[i] - bic[i]), atol=1e-6, rtol=0)
    torch.testing.assert_close(gated.deploy()(lr), out, atol=0, rtol=0)


def test_the_gate_maps_a_batch_of_inputs_to_one_strength_each():
    gate = make_gate()
    assert gate(torch.rand(5, 3, 24, 24)).shape == (5, 1)
    assert sum(p.numel() for p in gate.parameters()) == 14_369
