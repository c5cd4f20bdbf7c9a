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



def test_bench_eval_times_naive_as_it_ran_before_and_with_the_allocator_setting(tmp_path):
    """`facesr bench eval` scores the same real faces three ways and they agree: naive in a fresh process with
    glibc's allocator as it comes (the headline ratio), naive here after retain_freed_memory, and facesr's path."""
    from tests.conftest import LFW

    out = tmp_path / "eval.json"
    assert main(["bench", "eval", "--faces", str(LFW), "-n", "4", "--batch-size", "4", "--precision", "fp32",
                 "--degradations", "paper,bicubic_aa", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["faces"] == 4 and r["rows"] == ["paper", "bicubic_aa"] and r["facesr_models"] == "fp32"
    assert r["machine"]["freed_memory_retained"] is True  # the CLI retains it for every command
    assert r["naive_default_allocator_freed_memory_retained"] is False  # the baseline's process does not
    assert r["max_x8_psnr_difference_db"] < 1e-3  # the same numbers from all three
    for k in ("naive_default_allocator", "naive", "facesr"):
        assert abs(r[f"{k}_face_rows_per_s"] - 8 / r[f"{k}_s"]) < 1e-6
    assert abs(r["speedup"] - r["naive_default_allocator_s"] / r["facesr_s"]) < 1e-9
    assert abs(r["speedup_same_allocator"] - r["naive_s"] / r["facesr_s"]) < 1e-9


def test_bench_roofline_counts_the_steps_flops_and_bounds_it_on_a_datasheet_gpu(tmp_path):
    """`facesr bench roofline --gpu H200` on the tiny step: its FLOPs are the ones FlopCounterMode counts for the
    same step, every class moves bytes, normalisation and activations compute none, the bounds are ordered
    (FLOPs alone <= convolutions only <= each op its own kernel) and nothing is measured (the target is not here)."""
    from launch.bench.step import StepBench, step_flops

    out = tmp_path / "roof.json"
    assert main(["bench", "roofline", "--preset", "tiny", "--batch", "4", "--gpu", "NVIDIA H200", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert abs(r["step_gflop"] - step_flops(StepBench(preset="tiny", batch=4)) / 1e9) < 1e-6 * r["step_gflop"]
    assert r["target"]["flops_per_s"] == 989.4e12 and r["target"]["bytes_per_s"] == 4.8e12
    c = r["classes"]
    assert c["conv"]["gflop"] > 0.9 * r["step_gflop"] - c.get("matmul", {"gflop": 0})["gflop"]
    assert c["norm"]["gflop"] == 0 < c["norm"]["gbytes"] and c["activation"]["gflop"] == 0 < c["activation"]["gbytes"]
    assert all(v["gbytes"] > 0 and v["bound_ms"] > 0 for v in c.values())
    b = r["bound"]
    assert b["flops_only_ms"] <= b["conv_only_ms"] <= b["every_op_ms"]
    assert abs(b["every_op_ms"] - sum(v["bound_ms"] for v in c.values())) < 1e-9 * b["every_op_ms"] + 1e-12
    assert 0 < b["mfu_max_every_op"] <= b["mfu_max_conv_only"] <= 1 and r["measured"] is None


def test_bench_roofline_refuses_a_gpu_it_has_no_datasheet_for(tmp_path, capsys):
    """One line naming the GPU and the ones it knows, before any step runs; nothing written."""
    assert main(["bench", "roofline", "--preset", "tiny", "--batch", "2", "--gpu", "Quantum 9000",
                 "--out", str(tmp_path / "x.json")]) != 0
    err = capsys.readouterr().err
    assert "--gpu 'Quantum 9000': not in the datasheet tables" in err and "h200" in err
    assert not (tmp_path / "x.json").exists()
