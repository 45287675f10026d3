"""The benchmark scripts, end to end on CPU at the tiny size (their figures are taken by hand)."""

import json
import logging
import os
import sys
import threading

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: bench/

from bench import bench_dit_gpu  # noqa: E402

TINY = ["--variant", "tiny", "--height", "8", "--width", "8", "--text-len", "16", "--reps", "1"]


@pytest.mark.torch
def test_bench_dit_gpu_runs_both_frameworks(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    out = tmp_path / "results.json"
    results = bench_dit_gpu.main([*TINY, "--batches", "1,2", "--json", str(out)])
    assert [run["batch"] for run in results["jax"]] == [1, 2]
    assert [run["batch"] for run in results["torch"]] == [1, 2]
    assert results["tokens"] == 2 * 8 * 8 // 4 and results["jax_attention"] == "xla"
    assert results["residual_dtype"] == "float32"  # the model's default, as the original WAN code
    assert results["flops_per_example"] > 0 and results["torch_device"] == "cpu"
    for run in results["jax"] + results["torch"]:
        assert run["ms"] > 0 and run["tokens_per_s"] == pytest.approx(run["batch"] * 32 / (run["ms"] / 1e3))
        assert run["tflops_per_s"] == pytest.approx(
            results["flops_per_example"] * run["batch"] / (run["ms"] / 1e3) / 1e12)
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))


def test_bench_dit_gpu_records_failures_and_keeps_the_other_figures(tmp_path, monkeypatch):
    """Out of memory ends a sweep with a record; a failed diffusers child is an error entry, not a crash;
    the JSON on disk holds every batch measured so far."""
    real = bench_dit_gpu.median_ms
    seen = []

    def median_ms(fn, reps):
        seen.append(json.loads((tmp_path / "results.json").read_text()))  # written before each batch
        if len(seen) == 2:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.0GiB")
        return real(fn, reps)

    monkeypatch.setattr(bench_dit_gpu, "median_ms", median_ms)
    child = {"torch": [{"batch": 1, "ms": 2.0}], "torch_device": "cpu",
             "error": "exit 1: ModuleNotFoundError: No module named 'x'"}
    monkeypatch.setattr(bench_dit_gpu, "torch_in_child", lambda argv, timeout_s, out=None: child)
    results = bench_dit_gpu.main([*TINY, "--batches", "1,2,4", "--json", str(tmp_path / "results.json")])
    assert [run["batch"] for run in results["jax"]] == [1, 2]
    assert "ms" in results["jax"][0] and results["jax"][1]["error"] == "out of memory"
    assert results["torch"][0]["tokens_per_s"] == 1 * 32 / 2e-3 and "No module" in results["torch_error"]
    assert [run["batch"] for run in seen[1]["jax"]] == [1] and seen[0]["torch_error"]
    assert json.loads((tmp_path / "results.json").read_text())["jax"][1]["error"] == "out of memory"


def test_bench_dit_gpu_falls_back_to_xla_when_the_kernel_fails_before_timing(tmp_path):
    """cuDNN fails at trace time here (no GPU), as it would on a card it does not support: the failure is
    the first batch's record, the sweep runs again with XLA attention, and the FLOPs are still counted."""
    results = bench_dit_gpu.main([*TINY, "--batches", "1", "--attention", "cudnn", "--only", "jax",
                                  "--json", str(tmp_path / "results.json")])
    assert results["jax"][0]["attention"] == "cudnn" and "error" in results["jax"][0]
    assert results["jax"][1]["attention"] == "xla" and results["jax"][1]["ms"] > 0
    assert results["flops_per_example"] > 0 and results["jax_attention"] == "xla"


@pytest.mark.torch
def test_bench_dit_gpu_child_timeout_is_recorded(tmp_path):
    results = bench_dit_gpu.torch_in_child([*TINY, "--batches", "1"], timeout_s=0.01)
    assert results["error"].startswith("timed out")


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
def test_bench_convert_measures_convert_load_and_export(tmp_path, layout, capsys):
    from bench import bench_convert

    out = tmp_path / "results.json"
    args = ["--variant", "tiny", "--layout", layout, "--scan-layers", "--run", "--json", str(out)]
    results = bench_convert.main(args)
    runs = results["tiny"]
    assert set(runs) == {"weights_gib", "convert", "load", "load+export", "run export"}
    assert runs["convert"]["said"].startswith("wrote ") and runs["load"]["said"] == "ndarray"
    assert json.loads(runs["convert"]["said"].split(", config ", 1)[1])["num_layers"] > 0  # the whole line
    printed = capsys.readouterr().out
    assert all(f"({run['said']})\n" in printed for run in runs.values() if isinstance(run, dict))
    assert runs["run export"]["said"].endswith("transformer")
    for step in ("convert", "load", "load+export", "run export"):
        assert runs[step]["anon_gib"] > 0 and runs[step]["seconds"] > 0, step
    assert json.loads(out.read_text())["results"]["tiny"]["weights_gib"] == runs["weights_gib"]


def test_bench_data_stops_each_iterators_threads_before_the_next_setting_and_the_data_deletion(caplog):
    """Left running, an iterator's prefetch threads read on while the next thread count is timed, and
    then read files the benchmark has deleted (skip warnings '... is gone')."""
    from bench import bench_data

    before = set(threading.enumerate())
    with caplog.at_level(logging.WARNING):
        bench_data.main(["--examples", "8", "--threads", "1,2", "--resolution", "32", "--batch", "4"])
        left = [thread for thread in set(threading.enumerate()) - before if not thread.daemon]
        for thread in left:
            thread.join(timeout=60)
    assert not left
    assert not [record.getMessage() for record in caplog.records if "skipped" in record.getMessage()]
