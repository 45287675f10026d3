"""bench_dit_gpu's FLOP counts: MFU divides by the model's FLOPs, whatever `--remat` recomputes."""

import dataclasses
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: bench/

from bench import bench_dit_gpu  # noqa: E402
from genmask_jax.models.dit import DiTConfig  # noqa: E402

SHAPE = (2, 8, 8, 16)  # frames, latent height, width, text tokens


@pytest.mark.parametrize("scan_layers", [True, False])
def test_model_flops_are_the_same_under_every_remat_policy(scan_layers):
    """The count kept the config's policy: with nothing_saveable it added the recomputed forward, and the
    same step time showed a higher MFU."""
    config = DiTConfig.from_variant("tiny", scan_layers=scan_layers)
    remat = lambda policy: dataclasses.replace(config, remat_policy=policy)
    policies = ("none", "nothing_saveable", "dots_with_no_batch_dims_saveable")
    model = {p: bench_dit_gpu.step_flops(remat(p), SHAPE) for p in policies}
    assert len(set(model.values())) == 1 and model["none"] > 0
    executed = bench_dit_gpu.step_flops(remat("nothing_saveable"), SHAPE, executed=True)
    assert executed > model["none"]  # the forward run again in the backward
    assert bench_dit_gpu.step_flops(config, SHAPE, executed=True) == model["none"]  # no remat: nothing again


def test_hfu_counts_the_executed_flops_and_mfu_the_model_flops():
    run = bench_dit_gpu.derive({"batch": 2, "ms": 1000.0}, 3e12, 32, 10.0, executed=4e12)
    assert run["mfu"] == pytest.approx(0.6) and run["hfu"] == pytest.approx(0.8)
    assert "hfu" not in bench_dit_gpu.derive({"batch": 2, "ms": 1000.0}, 3e12, 32, 10.0)


def test_the_bench_reports_both_counts_under_remat(tmp_path, monkeypatch):
    timed = lambda config, shape, batches, reps, record: record({"batch": 1, "ms": 10.0})  # not compiled
    monkeypatch.setattr(bench_dit_gpu, "jax_runs", timed)
    args = ["--variant", "tiny", "--height", "8", "--width", "8", "--text-len", "16", "--batches", "1",
            "--only", "jax", "--attention", "xla", "--peak-tflops", "1", "--json", str(tmp_path / "r.json")]
    plain = bench_dit_gpu.main(args)
    remat = bench_dit_gpu.main([*args, "--remat", "nothing_saveable"])
    assert remat["flops_per_example"] == plain["flops_per_example"]
    assert remat["jax"][0]["mfu"] == plain["jax"][0]["mfu"]
    assert remat["executed_flops_per_example"] > remat["flops_per_example"]
    assert remat["jax"][0]["hfu"] > remat["jax"][0]["mfu"]
    assert plain["executed_flops_per_example"] == plain["flops_per_example"]
    assert plain["jax"][0]["hfu"] == plain["jax"][0]["mfu"]
