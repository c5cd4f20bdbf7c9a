"""What the machine computes natively, read at run time (never assumed): CPU model, ISA flags, GPU, and
its practical conv peak (``conv_peak``, measured: the denominator of MFU in training and benchmarks).

Precision ``auto`` is decided here: bf16 autocast only where the hardware has bf16 arithmetic
(CUDA devices with bf16 tensor cores, i.e. compute capability ≥ 8.0; CPUs with AMX-BF16 or
AVX512-BF16). Elsewhere bf16 is emulated: on an AVX2-only EPYC a bf16 convolution ran at
9 GFLOP/s against 72 in fp32, a 6× slower training step.
"""

from __future__ import annotations

import os
import platform
import time
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # either gives native bf16 dot products to oneDNN


@lru_cache(maxsize=1)
def _cpuinfo() -> dict:
    """The first processor's block of /proc/cpuinfo (Linux); empty elsewhere."""
    path = Path("/proc/cpuinfo")
    if not path.exists():
        return {}
    block = path.read_text().split("\n\n")[0]
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in block.splitlines())}


def cpu_flags() -> set[str]:
    return set(_cpuinfo().get("flags", "").split())


def machine_info(device: str | torch.device = "cpu") -> dict:
    """What figures depend on: CPU model and the ISA extensions oneDNN dispatches on (and the GPU on cuda)."""
    flags = cpu_flags()
    info = {"cpu": _cpuinfo().get("model name") or platform.processor() or platform.machine(),
            "isa": [f for f in ISA_FLAGS if f in flags],
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if onednn_isa_cap():
        info["onednn_max_cpu_isa"] = onednn_isa_cap()  # figures taken under a cap say so
    info["amx"] = "amx_bf16" in info["isa"]
    info["freed_memory_retained"] = _RETAINED  # retain_freed_memory() ran in this process: figures depend on it
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return info


def onednn_isa_cap() -> str | None:
    """oneDNN's ISA cap (``ONEDNN_MAX_CPU_ISA``, or its older name ``DNNL_MAX_CPU_ISA``), upper-case; None = none."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return cap.strip().upper() if cap and cap.strip() else None


def _cap_allows_bf16(cap: str | None) -> bool:
    """Whether oneDNN, capped at ``cap``, may use bf16 dot products: caps at AVX512_CORE_BF16 and above (their
    names say BF16, AMX, FP16 or AVX10) or none; SSE41 … AVX2_VNNI(_2), AVX512_CORE(_VNNI) emulate bf16."""
    if cap is None or cap in ("ALL", "DEFAULT"):
        return True
    return any(k in cap for k in ("BF16", "AMX", "FP16", "AVX10"))


def native_bf16(device: str | torch.device) -> bool:
    """True where bf16 arithmetic is hardware, not emulation, on ``device``. On a CPU: the flags say AMX-BF16 or
    AVX512-BF16 and oneDNN is not capped below them (``ONEDNN_MAX_CPU_ISA=AVX2`` makes such a CPU compute as
    an AVX2-only one, and then fp32 is what ``auto`` must choose)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_capability(dev)[0] >= 8  # Ampere and later: bf16 tensor cores
    if dev.type == "cpu":
        return any(f in cpu_flags() for f in BF16_CPU_FLAGS) and _cap_allows_bf16(onednn_isa_cap())
    return False


_RETAINED = False
MALLOC_TRIM_THRESHOLD = 1 << 30  # freed heap memory up to 1 GiB stays mapped for the next batch's tensors


def retain_freed_memory() -> bool:
    """Keep freed tensor memory in the process (glibc's malloc) instead of handing it back to the kernel.

    glibc serves blocks above its mmap threshold (at most 32 MiB) with fresh ``mmap``s, unmaps them when
    freed and trims the heap's free top, so a forward pass's activations, a few to tens of MiB each, are
    faulted in page by page again every batch: on 2 cores an out-of-place add of two (32, 8, 192, 192) tensors
    took 12 ms, 4-5 ms with the memory kept, and an evaluation ran ~30% faster. This is what PyTorch's CPU
    tuning guide buys with jemalloc or tcmalloc, here with the allocator every Linux Python already has: every
    block from the heap (glibc still maps memory directly where the heap cannot grow) and up to 1 GiB of freed
    heap kept. Returns whether it was applied (glibc only; elsewhere the allocator stays as it is)."""
    if platform.system() != "Linux":
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4  # mallopt parameters (malloc.h)
        applied = bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, MALLOC_TRIM_THRESHOLD))
    except (OSError, AttributeError):  # not glibc (musl, …)
        return False
    global _RETAINED
    _RETAINED = _RETAINED or applied
    return applied


def use_device(device: str | torch.device, threads: int | None = None) -> torch.device:
    """Set this process up to compute on ``device`` as a training worker does, so that what a benchmark times is
    what trains: on CUDA that GPU current and cuDNN's autotuner on (a step's sizes are fixed, so each
    convolution's fastest algorithm is timed once, in the first steps, instead of picked by heuristics); on the
    CPU ``threads`` intra-op threads where given. The worker loop, `bench step` (and its conv peak) and
    gpu_check's worker step call it."""
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is None:  # torch.cuda.set_device refuses a device without an index
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    elif threads:
        torch.set_num_threads(max(1, int(threads)))
    return device


def conv_peak(seconds: float = 3.0, bf16: bool = True, device: str = "cpu", batch: int = 16) -> dict:
    """Throughput of a large 3×3 convolution (forward), the machine's practical conv peak."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    x = torch.randn(batch, 256, 56, 56).to(device, dtype, memory_format=torch.channels_last)
    w = torch.randn(256, 256, 3, 3).to(device, dtype, memory_format=torch.channels_last)
    flops = 2 * batch * 256 * 256 * 9 * 56 * 56
    for _ in range(2):
        F.conv2d(x, w, padding=1)
    synchronize(device)
    n, t0 = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - t0 < seconds:
        F.conv2d(x, w, padding=1)
        n += 1
    synchronize(device)
    dt = (time.perf_counter() - t0) / n
    return {"dtype": str(dtype), "gflops_per_s": flops / dt / 1e9, "shape": f"{batch}x256x56x56 * 256x256x3x3"}


def memory_bandwidth(seconds: float = 3.0, device: str = "cpu", mib: int = 256) -> dict:
    """Bytes a device moves a second copying one large tensor into another (read + write), the roofline's
    memory side where no datasheet gives it (``launch/bench/roofline.py``)."""
    n = mib * 2**20 // 4
    src, dst = torch.rand(n, device=device), torch.empty(n, device=device)
    for _ in range(2):
        dst.copy_(src)
    synchronize(device)
    k, t0 = 0, time.perf_counter()
    while k < 3 or time.perf_counter() - t0 < seconds:
        dst.copy_(src)
        k += 1
    synchronize(device)
    dt = (time.perf_counter() - t0) / k
    return {"gbytes_per_s": 2 * n * 4 / dt / 1e9, "tensor_mib": mib}


def synchronize(device: str | torch.device) -> None:
    """Wait for queued device work (timing); nothing to wait for on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def cuda_status(smi_timeout: float = 60.0) -> dict:
    """Whether this machine can train on CUDA, checked the way training would use it: the NVIDIA driver answers
    (``nvidia-smi``), this torch is built with CUDA and sees a device, and a tensor op runs there.

    Returns ``{"problems": [...], "nvidia_smi": str, "torch": str, "cuda": str | None, "devices": int}``; each
    problem names what is missing and what it means, and an empty list means CUDA works."""
    import shutil
    import subprocess

    problems, smi_text = [], ""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        problems.append("nvidia-smi not found on PATH: no NVIDIA driver installed")
    else:
        try:
            res = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=smi_timeout)
            smi_text = (res.stdout or res.stderr).strip()
            if res.returncode != 0:
                first = smi_text.splitlines()[0] if smi_text else "no output"
                problems.append(f"nvidia-smi failed (exit {res.returncode}: {first}): the NVIDIA driver does not answer")
        except subprocess.TimeoutExpired:
            problems.append(f"nvidia-smi hung for {smi_timeout:.0f}s: the NVIDIA driver does not answer")
    devices = 0
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is built without CUDA (install a CUDA build of torch)")
    elif not torch.cuda.is_available():
        problems.append(f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device")
    else:
        devices = torch.cuda.device_count()
        try:
            x = torch.ones(1024, device="cuda")
            if float(x.sum()) != 1024.0:
                problems.append("a CUDA tensor op returned a wrong result")
        except RuntimeError as e:
            problems.append(f"a CUDA tensor op failed: {str(e).splitlines()[0]}")
    return {"problems": problems, "nvidia_smi": smi_text, "torch": torch.__version__, "cuda": torch.version.cuda,
            "devices": devices}
