"""The GPU benchmark script, end to end on CPU at the tiny size (its figures are taken by hand on a GPU)."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: bench/

from bench import bench_dit_gpu  # noqa: E402


@pytest.mark.torch
def test_bench_dit_gpu_runs_both_frameworks(tmp_path):
    out = tmp_path / "results.json"
    results = bench_dit_gpu.main(["--variant", "tiny", "--height", "8", "--width", "8", "--text-len", "16",
                                  "--batches", "1,2", "--reps", "1", "--json", str(out)])
    assert [batch for batch, _ in results["jax"]] == [1, 2]
    assert [batch for batch, _ in results["torch"]] == [1, 2]
    assert results["tokens"] == 2 * 8 * 8 // 4 and results["attention"] == "xla"
    assert results["flops_per_example"] > 0
    assert json.loads(out.read_text())["jax"] == [list(run) for run in results["jax"]]


def test_peak_table_prefers_the_most_specific_name():
    assert bench_dit_gpu.peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert bench_dit_gpu.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bench_dit_gpu.peak_tflops("TPU v5p") == 459.0
    assert bench_dit_gpu.peak_tflops("cpu") is None
