"""Precision ``auto`` follows what the CPU computes natively, and a oneDNN ISA cap counts: a bf16 CPU capped at
AVX2 is an AVX2 CPU to oneDNN (bf16 emulated), so ``auto`` is fp32 there (how the AVX2 demo figure is taken)."""

import pytest
import torch

from facesr import hardware
from facesr.step import resolve_precision


@pytest.mark.parametrize("cap, native", [
    (None, True), ("ALL", True), ("avx512_core_amx", True), ("AVX512_CORE_BF16", True), ("AVX10_1_512", True),
    ("AVX2", False), ("avx2_vnni", False), ("AVX512_CORE", False), ("AVX512_CORE_VNNI", False), ("SSE41", False),
])
def test_auto_precision_follows_flags_and_the_onednn_cap(monkeypatch, cap, native):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16", "amx_bf16"})
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    if cap is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert hardware.native_bf16("cpu") is native
    assert resolve_precision("auto", torch.device("cpu")).bf16 is native
    assert (hardware.machine_info().get("onednn_max_cpu_isa") == cap.upper()) if cap else True


def test_a_cpu_without_bf16_flags_is_fp32_whatever_the_cap(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2", "fma"})
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "ALL")
    assert not hardware.native_bf16("cpu")


_RSS_PROBE = """
import sys, torch
from facesr.hardware import retain_freed_memory
from facesr.hardware import machine_info
if sys.argv[1] == "retain":
    assert retain_freed_memory()
assert machine_info()["freed_memory_retained"] is (sys.argv[1] == "retain")
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
returned = 0
for i in range(6):  # one 48 MiB activation (an evaluation batch's x8 feature maps), made and freed six times
    x = torch.empty(48 << 18).fill_(1.0)
    held = rss()
    del x
    returned += rss() < held - (32 << 20)
print(returned)
"""


@pytest.mark.skipif(not hardware.platform.system() == "Linux", reason="glibc's mallopt")
def test_freed_tensor_memory_stays_in_the_process_once_retained():
    """By default glibc trims freed tensor memory back to the kernel (the next batch's tensors are faulted in
    again, page by page); after ``retain_freed_memory`` it stays resident for them."""
    import subprocess
    import sys

    def returned(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", _RSS_PROBE, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.strip())

    assert returned("default") == 6  # above glibc's mmap threshold: unmapped at every free
    assert returned("retain") == 0


def test_use_device_sets_the_threads_on_the_cpu_and_leaves_cudnn_alone():
    """The worker loop and `bench step` set up their device through one function (on CUDA: cuDNN's autotuner,
    tests/test_gpu.py); on the CPU it sets the intra-op threads asked for and touches nothing of cuDNN."""
    before, bench = torch.get_num_threads(), torch.backends.cudnn.benchmark
    try:
        assert hardware.use_device("cpu", threads=1) == torch.device("cpu")
        assert torch.get_num_threads() == 1
        hardware.use_device("cpu")  # no threads given: PyTorch's own count stays
        assert torch.get_num_threads() == 1 and torch.backends.cudnn.benchmark == bench
    finally:
        torch.set_num_threads(before)
