"""`facesr bench step` runs end to end and writes what the closing notes quote (structure, not timings)."""

import json

from facesr.hardware import ISA_FLAGS
from launch.cli import main


def test_bench_step_tiny_writes_machine_peaks_and_ratio(tmp_path):
    out = tmp_path / "step.json"
    assert main(["bench", "step", "--preset", "tiny", "--batch", "2", "--seconds", "0",
                 "--peak-seconds", "0", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["machine"]["cpu"] and set(r["machine"]["isa"]) <= set(ISA_FLAGS)
    assert r["machine"]["amx"] == ("amx_bf16" in r["machine"]["isa"])
    assert r["peaks"]["bf16"]["dtype"] == "torch.bfloat16" and r["peaks"]["fp32"]["dtype"] == "torch.float32"
    v = r["variants"]
    assert set(v) == {"fp32_nchw", "fp32_channels_last", "bf16_channels_last"} and r["step_gflop"] > 0
    ratio = v["bf16_channels_last"]["images_per_s"] / v["fp32_nchw"]["images_per_s"]
    assert abs(r["speedup_bf16_cl_over_fp32"] - ratio) < 1e-9
    assert abs(r["speedup_bound_here"] - r["peaks"]["bf16"]["gflops_per_s"] / v["fp32_nchw"]["gflops_per_s"]) < 1e-9
    for name, x in v.items():  # MFU is against the peak of the variant's own dtype
        peak = r["peaks"]["bf16" if name.startswith("bf16") else "fp32"]["gflops_per_s"]
        assert abs(x["mfu"] - x["gflops_per_s"] / peak) < 1e-9
    native = bool({"amx_bf16", "avx512_bf16"} & set(r["machine"]["isa"]))
    assert r["auto"]["variant"] == ("bf16_channels_last" if native else "fp32_channels_last")
    assert r["host_syncs_per_step"]["facesr"] == 0 < r["host_syncs_per_step"]["naive"]
    assert r["targets"] is None  # the targets are for the paper preset only

