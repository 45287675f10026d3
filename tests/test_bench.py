"""The benchmark scripts, end to end on CPU at the tiny size (their figures are taken by hand)."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: bench/

from bench import bench_dit_gpu  # noqa: E402


@pytest.mark.torch
def test_bench_dit_gpu_runs_both_frameworks(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    out = tmp_path / "results.json"
    results = bench_dit_gpu.main(["--variant", "tiny", "--height", "8", "--width", "8", "--text-len", "16",
                                  "--batches", "1,2", "--reps", "1", "--json", str(out)])
    assert [batch for batch, _ in results["jax"]] == [1, 2]
    assert [batch for batch, _ in results["torch"]] == [1, 2]
    assert results["tokens"] == 2 * 8 * 8 // 4 and results["attention"] == "xla"
    assert results["flops_per_example"] > 0
    assert json.loads(out.read_text())["jax"] == [list(run) for run in results["jax"]]


def test_profile_names_the_model_parts():
    from bench import profile_dit

    results = profile_dit.main(["--tiny", "--steps", "1"])
    assert results["wall_ms"] > 0
    assert {"feed-forward dots", "self-attention projections", "self-attention cores (QK^T, softmax, PV)",
            "cross-attention cores", profile_dit.ELEMENTWISE} <= set(results["categories"])
    assert results["gflop"]["feed-forward dots"] > 0 and not results["gflop"].get(profile_dit.ELEMENTWISE)
    assert profile_dit.category("dot.3", "transpose(jvp(WanDiT))/blocks_1/ffn/proj_in/transpose") == (
        "backward: feed-forward dots")
    elementwise = profile_dit.category("add_bitcast_fusion.2", "WanDiT/blocks_0/attn1/to_q/add")
    assert elementwise == profile_dit.ELEMENTWISE


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc")
@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_bench_convert_measures_convert_load_and_export(tmp_path, layout):
    from bench import bench_convert

    out = tmp_path / "results.json"
    args = ["--variant", "tiny", "--layout", layout, "--scan-layers", "--run", "--json", str(out)]
    results = bench_convert.main(args)
    runs = results["tiny"]
    assert set(runs) == {"weights_gib", "convert", "load", "load+export", "run export"}
    assert runs["convert"]["said"].startswith("wrote ") and runs["load"]["said"] == "ndarray"
    assert runs["run export"]["said"].endswith("transformer")
    for step in ("convert", "load", "load+export", "run export"):
        assert runs[step]["anon_gib"] > 0 and runs[step]["seconds"] > 0, step
    assert json.loads(out.read_text())["results"]["tiny"]["weights_gib"] == runs["weights_gib"]
